//! The floor: what Switchyard's stack costs before any gateway work. A hyper 1 server
//! (hyper-util's auto builder, as the gateway uses) that reads each request body whole (a
//! gateway must, to read `model`) and sends it with hyper-util's pooled client (as the
//! gateway does) to one upstream, passing the answer's body through as it comes. No
//! routing, keys, limits, ledger, log, metrics or cache.
//!
//!   bench-floor --listen 127.0.0.1:0 --upstream 127.0.0.1:PORT --ready-file FILE

use std::convert::Infallible;
use std::net::SocketAddr;

use bytes::Bytes;
use http_body_util::{combinators::BoxBody, BodyExt, Full};
use hyper::body::Incoming;
use hyper::{Request, Response, StatusCode};
use hyper_util::client::legacy::{connect::HttpConnector, Client};
use hyper_util::rt::{TokioExecutor, TokioIo};

type Upstream = Client<HttpConnector, Full<Bytes>>;
type Body = BoxBody<Bytes, hyper::Error>;

fn arg(name: &str) -> Option<String> {
    let mut args = std::env::args();
    while let Some(a) = args.next() {
        if a == name {
            return args.next();
        }
    }
    None
}

async fn proxy(client: Upstream, base: &'static str, req: Request<Incoming>) -> Response<Body> {
    let (parts, body) = req.into_parts();
    let Ok(body) = body.collect().await.map(|b| b.to_bytes()) else {
        return status(StatusCode::BAD_REQUEST);
    };
    let path = parts.uri.path_and_query().map_or("/", |p| p.as_str());
    let Ok(uri) = format!("{base}{path}").parse::<hyper::Uri>() else {
        return status(StatusCode::BAD_REQUEST);
    };
    let mut up = Request::builder().method(parts.method).uri(uri);
    for name in [hyper::header::CONTENT_TYPE, hyper::header::AUTHORIZATION] {
        if let Some(v) = parts.headers.get(&name) {
            up = up.header(name, v);
        }
    }
    let Ok(up) = up.body(Full::new(body)) else {
        return status(StatusCode::BAD_REQUEST);
    };
    match client.request(up).await {
        Ok(res) => res.map(|b| b.boxed()),
        Err(_) => status(StatusCode::BAD_GATEWAY),
    }
}

fn status(code: StatusCode) -> Response<Body> {
    let mut r = Response::new(Full::new(Bytes::new()).map_err(|e| match e {}).boxed());
    *r.status_mut() = code;
    r
}

/// The runtime Switchyard picks (src/main.rs): one thread when given one core, a worker per
/// core otherwise, so that the floor stays the floor.
fn main() {
    let mut builder = if std::thread::available_parallelism().map_or(1, |n| n.get()) == 1 {
        tokio::runtime::Builder::new_current_thread()
    } else {
        tokio::runtime::Builder::new_multi_thread()
    };
    builder.enable_all().build().expect("runtime").block_on(serve());
}

async fn serve() {
    let listen: SocketAddr = arg("--listen")
        .unwrap_or("127.0.0.1:0".into())
        .parse()
        .expect("--listen");
    let upstream = arg("--upstream").expect("--upstream HOST:PORT");
    let base: &'static str = Box::leak(format!("http://{upstream}").into_boxed_str());
    let mut http = HttpConnector::new();
    http.set_nodelay(true);
    let client: Upstream = Client::builder(TokioExecutor::new())
        .pool_idle_timeout(std::time::Duration::from_secs(90))
        .build(http);
    let listener = tokio::net::TcpListener::bind(listen).await.expect("bind");
    let addr = listener.local_addr().expect("local addr");
    if let Some(f) = arg("--ready-file") {
        std::fs::write(f, addr.to_string()).expect("ready file");
    }
    loop {
        let Ok((sock, _)) = listener.accept().await else {
            continue;
        };
        let _ = sock.set_nodelay(true);
        let client = client.clone();
        tokio::spawn(async move {
            let svc = hyper::service::service_fn(move |req| {
                let client = client.clone();
                async move { Ok::<_, Infallible>(proxy(client, base, req).await) }
            });
            let _ = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new())
                .serve_connection(TokioIo::new(sock), svc)
                .await;
        });
    }
}
