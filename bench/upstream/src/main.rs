//! A small, fast mock of an OpenAI upstream for the load benchmark.
//!
//! `POST …/chat/completions` answers a fixed small chat completion (with `usage`). With
//! `"stream": true` it answers `--chunks` SSE chunks `--chunk-delay-ms` apart (the first at
//! once), then, when the request asked for `stream_options.include_usage`, a usage chunk
//! (and, as OpenAI does then, `"usage":null` in every content chunk), then `data: [DONE]`.
//! Everything else is a 404. One thread (pin it with taskset).
//!
//!   bench-upstream --listen 127.0.0.1:0 --ready-file /tmp/up.addr [--chunks 20] [--chunk-delay-ms 5]

use std::convert::Infallible;
use std::net::SocketAddr;
use std::time::Duration;

use bytes::Bytes;
use futures_util::stream;
use http_body_util::{combinators::UnsyncBoxBody, BodyExt, Full, StreamBody};
use hyper::body::{Frame, Incoming};
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper::{Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use tokio::net::TcpListener;
use tokio::time::Instant;

type Body = UnsyncBoxBody<Bytes, Infallible>;

const ANSWER: &str = r#"{"id":"chatcmpl-bench","object":"chat.completion","created":1700000000,"model":"bench-model","choices":[{"index":0,"message":{"role":"assistant","content":"Hello from the benchmark upstream."},"logprobs":null,"finish_reason":"stop"}],"usage":{"prompt_tokens":12,"completion_tokens":7,"total_tokens":19}}"#;
const CHUNK: &str = "data: {\"id\":\"chatcmpl-bench\",\"object\":\"chat.completion.chunk\",\"created\":1700000000,\"model\":\"bench-model\",\"choices\":[{\"index\":0,\"delta\":{\"content\":\"tok \"},\"logprobs\":null,\"finish_reason\":null}]}\n\n";
const LAST_CHUNK: &str = "data: {\"id\":\"chatcmpl-bench\",\"object\":\"chat.completion.chunk\",\"created\":1700000000,\"model\":\"bench-model\",\"choices\":[{\"index\":0,\"delta\":{},\"logprobs\":null,\"finish_reason\":\"stop\"}]}\n\n";
// With `stream_options.include_usage`, OpenAI adds `"usage":null` to every content chunk.
const CHUNK_WITH_USAGE: &str = "data: {\"id\":\"chatcmpl-bench\",\"object\":\"chat.completion.chunk\",\"created\":1700000000,\"model\":\"bench-model\",\"choices\":[{\"index\":0,\"delta\":{\"content\":\"tok \"},\"logprobs\":null,\"finish_reason\":null}],\"usage\":null}\n\n";
const LAST_CHUNK_WITH_USAGE: &str = "data: {\"id\":\"chatcmpl-bench\",\"object\":\"chat.completion.chunk\",\"created\":1700000000,\"model\":\"bench-model\",\"choices\":[{\"index\":0,\"delta\":{},\"logprobs\":null,\"finish_reason\":\"stop\"}],\"usage\":null}\n\n";
const USAGE_CHUNK: &str = "data: {\"id\":\"chatcmpl-bench\",\"object\":\"chat.completion.chunk\",\"created\":1700000000,\"model\":\"bench-model\",\"choices\":[],\"usage\":{\"prompt_tokens\":12,\"completion_tokens\":20,\"total_tokens\":32}}\n\n";
const DONE: &str = "data: [DONE]\n\n";

#[derive(Clone, Copy)]
struct Opts {
    chunks: u32,
    delay: Duration,
}

/// `"key"` followed by optional blanks, `:`, optional blanks and `true`.
fn flag_true(body: &[u8], key: &[u8]) -> bool {
    let mut i = 0;
    while let Some(pos) = find(&body[i..], key) {
        let mut j = i + pos + key.len();
        while j < body.len() && body[j].is_ascii_whitespace() {
            j += 1;
        }
        if j < body.len() && body[j] == b':' {
            j += 1;
            while j < body.len() && body[j].is_ascii_whitespace() {
                j += 1;
            }
            if body[j..].starts_with(b"true") {
                return true;
            }
        }
        i = i + pos + key.len();
    }
    false
}

fn find(hay: &[u8], needle: &[u8]) -> Option<usize> {
    hay.windows(needle.len()).position(|w| w == needle)
}

fn full(status: StatusCode, ct: &'static str, body: &'static str) -> Response<Body> {
    Response::builder()
        .status(status)
        .header("content-type", ct)
        .body(Full::new(Bytes::from_static(body.as_bytes())).boxed_unsync())
        .expect("static response")
}

async fn handle(req: Request<Incoming>, opts: Opts) -> Result<Response<Body>, Infallible> {
    let is_chat =
        req.method() == hyper::Method::POST && req.uri().path().ends_with("/chat/completions");
    let body = match req.into_body().collect().await {
        Ok(b) => b.to_bytes(),
        Err(_) => return Ok(full(StatusCode::BAD_REQUEST, "text/plain", "bad body\n")),
    };
    if !is_chat {
        return Ok(full(
            StatusCode::NOT_FOUND,
            "application/json",
            r#"{"error":{"message":"not found","type":"invalid_request_error","param":null,"code":null}}"#,
        ));
    }
    if !flag_true(&body, b"\"stream\"") {
        return Ok(full(StatusCode::OK, "application/json", ANSWER));
    }
    let usage = flag_true(&body, b"\"include_usage\"");
    let start = Instant::now();
    let n = opts.chunks;
    let delay = opts.delay;
    // State: index of the next frame. Frames 0..n are content chunks (the last one carries
    // finish_reason), frame n the usage chunk (when asked), then [DONE].
    let frames = stream::unfold(0u32, move |i| async move {
        let total = n + u32::from(usage) + 1;
        if i >= total {
            return None;
        }
        let text: &'static str = if i < n {
            if i > 0 {
                tokio::time::sleep_until(start + delay * i).await;
            }
            match (i + 1 == n, usage) {
                (true, false) => LAST_CHUNK,
                (true, true) => LAST_CHUNK_WITH_USAGE,
                (false, false) => CHUNK,
                (false, true) => CHUNK_WITH_USAGE,
            }
        } else if usage && i == n {
            USAGE_CHUNK
        } else {
            DONE
        };
        Some((
            Ok::<_, Infallible>(Frame::data(Bytes::from_static(text.as_bytes()))),
            i + 1,
        ))
    });
    Ok(Response::builder()
        .header("content-type", "text/event-stream")
        .header("cache-control", "no-cache")
        .body(StreamBody::new(frames).boxed_unsync())
        .expect("static response"))
}

fn main() {
    let mut listen = "127.0.0.1:0".to_string();
    let mut ready: Option<String> = None;
    let mut opts = Opts {
        chunks: 20,
        delay: Duration::from_millis(5),
    };
    let mut args = std::env::args().skip(1);
    while let Some(a) = args.next() {
        let mut val = || args.next().unwrap_or_else(|| panic!("{a} needs a value"));
        match a.as_str() {
            "--listen" => listen = val(),
            "--ready-file" => ready = Some(val()),
            "--chunks" => opts.chunks = val().parse().expect("--chunks N"),
            "--chunk-delay-ms" => {
                opts.delay = Duration::from_secs_f64(
                    val().parse::<f64>().expect("--chunk-delay-ms MS") / 1000.0,
                )
            }
            _ => panic!("unknown argument {a}"),
        }
    }
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    rt.block_on(async move {
        let addr: SocketAddr = listen.parse().expect("--listen ADDR:PORT");
        let listener = TcpListener::bind(addr).await.expect("bind");
        let bound = listener.local_addr().expect("local addr");
        if let Some(path) = ready {
            let tmp = format!("{path}.tmp");
            std::fs::write(&tmp, bound.to_string()).expect("ready file");
            std::fs::rename(&tmp, &path).expect("ready file");
        }
        eprintln!("bench-upstream listening on {bound}");
        loop {
            let (sock, _) = match listener.accept().await {
                Ok(s) => s,
                Err(e) => {
                    eprintln!("accept: {e}");
                    tokio::time::sleep(Duration::from_millis(10)).await;
                    continue;
                }
            };
            let _ = sock.set_nodelay(true);
            tokio::spawn(async move {
                let svc = service_fn(move |req| handle(req, opts));
                let _ = http1::Builder::new()
                    .serve_connection(TokioIo::new(sock), svc)
                    .await;
            });
        }
    });
}
