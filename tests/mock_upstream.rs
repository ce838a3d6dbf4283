//! Tests of the mock upstream itself (tests/support/upstream.rs), so the gateway's tests can
//! trust it: default answers, recording, scripts, aborts, hangs and the control endpoints.

#[path = "support/upstream.rs"]
mod upstream;

use std::time::Duration;

use base64::Engine as _;
use futures_util::StreamExt;
use serde_json::{json, Value};
use upstream::{MockUpstream, Scripted, StreamEnd};

fn client() -> reqwest::Client {
    reqwest::Client::builder()
        .timeout(Duration::from_secs(10))
        .build()
        .unwrap()
}

/// The `data:` payloads of an SSE body, in order.
fn sse_data(body: &str) -> Vec<String> {
    body.split("\n\n")
        .filter(|e| !e.trim().is_empty())
        .flat_map(|e| {
            e.lines()
                .filter_map(|l| l.strip_prefix("data: ").map(str::to_string))
                .collect::<Vec<_>>()
        })
        .collect()
}

#[tokio::test]
async fn default_chat_answer_echoes_model_and_records_the_request() {
    let mock = MockUpstream::start().await;
    let body = json!({"model": "gpt-4o-upstream", "messages": [{"role": "user", "content": "Say hello!!"}]});
    let resp = client()
        .post(format!("{}/v1/chat/completions", mock.url()))
        .bearer_auth("upstream-secret")
        .json(&body)
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    assert!(resp.headers()["content-type"]
        .to_str()
        .unwrap()
        .starts_with("application/json"));
    let v: Value = resp.json().await.unwrap();
    assert_eq!(v["object"], "chat.completion");
    assert_eq!(v["model"], "gpt-4o-upstream");
    assert_eq!(v["choices"][0]["message"]["content"], "Hello from mock");
    assert_eq!(v["choices"][0]["finish_reason"], "stop");
    let prompt = upstream::prompt_tokens_for("Say hello!!".len());
    assert_eq!(prompt, 3);
    assert_eq!(v["usage"]["prompt_tokens"], prompt);
    assert_eq!(v["usage"]["completion_tokens"], 4);
    assert_eq!(v["usage"]["total_tokens"], prompt + 4);

    assert_eq!(mock.request_count(), 1);
    let r = &mock.requests()[0];
    assert_eq!(r.method, "POST");
    assert_eq!(r.path, "/v1/chat/completions");
    assert_eq!(r.query, None);
    assert_eq!(r.header("Authorization"), Some("Bearer upstream-secret"));
    assert_eq!(r.json(), body);
    assert_eq!(mock.in_flight(), 0);
}

#[tokio::test]
async fn azure_path_uses_the_deployment_and_keeps_the_query() {
    let mock = MockUpstream::start().await;
    let resp = client()
        .post(format!(
            "{}/openai/deployments/my-dep/chat/completions?api-version=2024-10-21",
            mock.url()
        ))
        .header("api-key", "k")
        .json(&json!({"messages": [{"role": "user", "content": "hi"}]}))
        .send()
        .await
        .unwrap();
    let v: Value = resp.json().await.unwrap();
    assert_eq!(v["model"], "my-dep");
    let r = &mock.requests()[0];
    assert_eq!(r.query.as_deref(), Some("api-version=2024-10-21"));
    assert_eq!(r.header("api-key"), Some("k"));
}

#[tokio::test]
async fn stream_with_include_usage_ends_with_a_usage_chunk() {
    let mock = MockUpstream::start().await;
    let resp = client()
        .post(format!("{}/v1/chat/completions", mock.url()))
        .json(
            &json!({"model": "m", "stream": true, "stream_options": {"include_usage": true},
                      "messages": [{"role": "user", "content": "abcd"}]}),
        )
        .send()
        .await
        .unwrap();
    assert_eq!(resp.headers()["content-type"], "text/event-stream");
    let text = resp.text().await.unwrap();
    let data = sse_data(&text);
    assert_eq!(data.last().unwrap(), "[DONE]");
    let chunks: Vec<Value> = data[..data.len() - 1]
        .iter()
        .map(|d| serde_json::from_str(d).unwrap())
        .collect();
    let (last, earlier) = chunks.split_last().unwrap();
    assert_eq!(last["choices"], json!([]));
    assert_eq!(last["usage"]["prompt_tokens"], 1);
    assert_eq!(last["usage"]["completion_tokens"], 4);
    let mut content = String::new();
    for c in earlier {
        assert_eq!(c["object"], "chat.completion.chunk");
        assert!(c["usage"].is_null() && c.get("usage").is_some());
        if let Some(s) = c["choices"][0]["delta"]["content"].as_str() {
            content.push_str(s);
        }
    }
    assert_eq!(content, "Hello from mock");
    assert_eq!(
        earlier.last().unwrap()["choices"][0]["finish_reason"],
        "stop"
    );
}

#[tokio::test]
async fn stream_without_include_usage_has_no_usage() {
    let mock = MockUpstream::start().await;
    let text = client()
        .post(format!("{}/v1/chat/completions", mock.url()))
        .json(
            &json!({"model": "m", "stream": true, "messages": [{"role": "user", "content": "x"}]}),
        )
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    let data = sse_data(&text);
    assert_eq!(data.len(), 6, "role, 3 content, finish, [DONE]: {data:?}");
    assert!(!text.contains("usage"));
}

#[tokio::test]
async fn tools_get_a_tool_call() {
    let mock = MockUpstream::start().await;
    let tools = json!([{"type": "function", "function": {"name": "get_weather", "parameters": {"type": "object"}}}]);
    let v: Value = client()
        .post(format!("{}/v1/chat/completions", mock.url()))
        .json(
            &json!({"model": "m", "tools": tools, "messages": [{"role": "user", "content": "x"}]}),
        )
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(v["choices"][0]["finish_reason"], "tool_calls");
    let call = &v["choices"][0]["message"]["tool_calls"][0];
    assert_eq!(call["type"], "function");
    assert_eq!(call["function"]["name"], "get_weather");
    assert_eq!(call["function"]["arguments"], upstream::TOOL_ARGUMENTS);

    let text = client()
        .post(format!("{}/v1/chat/completions", mock.url()))
        .json(&json!({"model": "m", "stream": true, "tools": tools, "messages": [{"role": "user", "content": "x"}]}))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    let mut args = String::new();
    let mut name = None;
    for d in sse_data(&text).iter().filter(|d| *d != "[DONE]") {
        let c: Value = serde_json::from_str(d).unwrap();
        if let Some(tc) = c["choices"][0]["delta"]["tool_calls"].get(0) {
            if let Some(n) = tc["function"]["name"].as_str() {
                name = Some(n.to_string());
            }
            args.push_str(tc["function"]["arguments"].as_str().unwrap_or(""));
        }
    }
    assert_eq!(name.as_deref(), Some("get_weather"));
    assert_eq!(args, upstream::TOOL_ARGUMENTS);
}

#[tokio::test]
async fn scripted_429_then_default() {
    let mock = MockUpstream::start().await;
    mock.script(Scripted::Respond {
        status: 429,
        headers: vec![("retry-after-ms".into(), "10".into())],
        body: r#"{"error":{"message":"slow down","type":"tokens","param":null,"code":"rate_limit_exceeded"}}"#.into(),
    });
    let url = format!("{}/v1/chat/completions", mock.url());
    let req = json!({"model": "m", "messages": [{"role": "user", "content": "x"}]});
    let first = client().post(&url).json(&req).send().await.unwrap();
    assert_eq!(first.status(), 429);
    assert_eq!(first.headers()["retry-after-ms"], "10");
    assert_eq!(first.headers()["content-type"], "application/json");
    let v: Value = first.json().await.unwrap();
    assert_eq!(v["error"]["code"], "rate_limit_exceeded");
    let second = client().post(&url).json(&req).send().await.unwrap();
    assert_eq!(second.status(), 200);
    assert_eq!(mock.request_count(), 2);
}

#[tokio::test]
async fn scripted_stream_is_written_verbatim() {
    let mock = MockUpstream::start().await;
    let raw = [
        (0, "data: {\"choices\":[{\"delta\":{\"con"),
        (30, "tent\":\"é\"}}]}"),
        (30, "\n\n"),
        (0, ": keep-alive\r\n\r\ndata: [DONE]\r\n\r\n"),
    ];
    mock.script(Scripted::stream(&raw, StreamEnd::Finish));
    let resp = client()
        .post(format!("{}/v1/chat/completions", mock.url()))
        .json(&json!({"model": "m", "messages": []}))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.headers()["content-type"], "text/event-stream");
    let mut stream = resp.bytes_stream();
    let mut pieces = Vec::new();
    while let Some(b) = stream.next().await {
        pieces.push(b.unwrap());
    }
    assert!(pieces.len() >= 3, "delayed chunks arrive separately");
    let all: Vec<u8> = pieces.concat();
    let expected: String = raw.iter().map(|(_, s)| *s).collect();
    assert_eq!(String::from_utf8(all).unwrap(), expected);
}

#[tokio::test]
async fn abort_ends_the_stream_with_a_client_error() {
    let mock = MockUpstream::start().await;
    mock.script(Scripted::stream(
        &[(0, "data: {\"a\":1}\n\n"), (10, "data: {\"a\":2}\n\n")],
        StreamEnd::Abort,
    ));
    let resp = client()
        .post(format!("{}/v1/chat/completions", mock.url()))
        .json(&json!({"model": "m", "messages": []}))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    let mut stream = resp.bytes_stream();
    let mut got = Vec::new();
    let mut error = None;
    while let Some(b) = stream.next().await {
        match b {
            Ok(b) => got.extend_from_slice(&b),
            Err(e) => {
                error = Some(e);
                break;
            }
        }
    }
    assert!(
        error.is_some(),
        "the client must see an error, not a clean end"
    );
    assert_eq!(
        String::from_utf8(got).unwrap(),
        "data: {\"a\":1}\n\ndata: {\"a\":2}\n\n"
    );
    assert!(mock.wait_in_flight(0, Duration::from_secs(2)).await);
}

#[tokio::test]
async fn hang_stays_in_flight_until_the_client_goes_away() {
    let mock = MockUpstream::start().await;
    mock.script(Scripted::Hang);
    let url = format!("{}/v1/chat/completions", mock.url());
    let req = client()
        .post(&url)
        .json(&json!({"model": "m", "messages": []}))
        .send();
    let task = tokio::spawn(req);
    assert!(mock.wait_in_flight(1, Duration::from_secs(2)).await);
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert_eq!(mock.in_flight(), 1);
    task.abort(); // drops the request: the client closes the connection
    assert!(
        mock.wait_in_flight(0, Duration::from_secs(2)).await,
        "a hang ends when the client disconnects"
    );
}

#[tokio::test]
async fn a_dropped_stream_is_no_longer_in_flight() {
    let mock = MockUpstream::start().await;
    mock.script(Scripted::stream(
        &[(0, "data: {}\n\n"), (60_000, "data: [DONE]\n\n")],
        StreamEnd::Finish,
    ));
    let resp = client()
        .post(format!("{}/v1/chat/completions", mock.url()))
        .json(&json!({"model": "m", "messages": []}))
        .send()
        .await
        .unwrap();
    let mut stream = resp.bytes_stream();
    stream.next().await.unwrap().unwrap();
    assert_eq!(mock.in_flight(), 1);
    drop(stream);
    assert!(mock.wait_in_flight(0, Duration::from_secs(2)).await);
}

#[tokio::test]
async fn delay_then_respond() {
    let mock = MockUpstream::start().await;
    mock.script(Scripted::Delay(
        Duration::from_millis(200),
        Box::new(Scripted::respond(502, "<html>Bad Gateway</html>")),
    ));
    let started = std::time::Instant::now();
    let resp = client()
        .post(format!("{}/v1/chat/completions", mock.url()))
        .json(&json!({"model": "m", "messages": []}))
        .send()
        .await
        .unwrap();
    assert!(started.elapsed() >= Duration::from_millis(200));
    assert_eq!(resp.status(), 502);
    assert!(resp.headers()["content-type"]
        .to_str()
        .unwrap()
        .starts_with("text/plain"));
}

#[tokio::test]
async fn embeddings_float_and_base64_agree() {
    let mock = MockUpstream::start().await;
    let url = format!("{}/v1/embeddings", mock.url());
    let float: Value = client()
        .post(&url)
        .json(&json!({"model": "e", "input": ["a", "bb"], "encoding_format": "float"}))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let b64: Value = client()
        .post(&url)
        .json(&json!({"model": "e", "input": ["a", "bb"], "encoding_format": "base64"}))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(float["data"].as_array().unwrap().len(), 2);
    assert_eq!(float["usage"]["prompt_tokens"], 2);
    for i in 0..2 {
        let floats: Vec<f32> = float["data"][i]["embedding"]
            .as_array()
            .unwrap()
            .iter()
            .map(|f| f.as_f64().unwrap() as f32)
            .collect();
        let bytes = base64::engine::general_purpose::STANDARD
            .decode(b64["data"][i]["embedding"].as_str().unwrap())
            .unwrap();
        let decoded: Vec<f32> = bytes
            .chunks(4)
            .map(|c| f32::from_le_bytes(c.try_into().unwrap()))
            .collect();
        assert_eq!(floats.len(), 8);
        assert_eq!(floats, decoded);
    }
    let dims: Value = client()
        .post(&url)
        .json(&json!({"model": "e", "input": "a", "dimensions": 3}))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(dims["data"][0]["embedding"].as_array().unwrap().len(), 3);
}

#[tokio::test]
async fn transcription_parses_multipart() {
    let mock = MockUpstream::start().await;
    let form = || {
        reqwest::multipart::Form::new()
            .text("model", "whisper-1")
            .part(
                "file",
                reqwest::multipart::Part::bytes(vec![7u8; 1234]).file_name("a.wav"),
            )
    };
    let url = format!("{}/v1/audio/transcriptions", mock.url());
    let v: Value = client()
        .post(&url)
        .multipart(form())
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(v["text"], "mock transcript of 1234 bytes");
    let resp = client()
        .post(&url)
        .multipart(form().text("response_format", "text"))
        .send()
        .await
        .unwrap();
    assert!(resp.headers()["content-type"]
        .to_str()
        .unwrap()
        .starts_with("text/plain"));
    assert_eq!(
        resp.text().await.unwrap(),
        "mock transcript of 1234 bytes\n"
    );
    let missing = client()
        .post(&url)
        .multipart(reqwest::multipart::Form::new().text("model", "w"))
        .send()
        .await
        .unwrap();
    assert_eq!(missing.status(), 400);
}

#[tokio::test]
async fn other_endpoints_have_their_shapes() {
    let mock = MockUpstream::start().await;
    let c = client();
    let u = mock.url();
    let post = |path: &str, body: Value| c.post(format!("{u}{path}")).json(&body).send();

    let v: Value = post("/v1/completions", json!({"model": "m", "prompt": "hi"}))
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(v["object"], "text_completion");
    assert_eq!(v["choices"][0]["text"], "Hello from mock");

    let v: Value = post(
        "/v1/images/generations",
        json!({"model": "dall-e-3", "prompt": "a cat"}),
    )
    .await
    .unwrap()
    .json()
    .await
    .unwrap();
    let png = base64::engine::general_purpose::STANDARD
        .decode(v["data"][0]["b64_json"].as_str().unwrap())
        .unwrap();
    assert!(png.starts_with(b"\x89PNG\r\n\x1a\n"));

    let resp = post(
        "/v1/audio/speech",
        json!({"model": "tts-1", "input": "hi", "voice": "alloy"}),
    )
    .await
    .unwrap();
    assert_eq!(resp.headers()["content-type"], "audio/mpeg");
    assert_eq!(resp.bytes().await.unwrap(), upstream::speech_bytes());

    let v: Value = post("/v1/moderations", json!({"input": ["a", "b"]}))
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(v["results"].as_array().unwrap().len(), 2);
    assert_eq!(v["results"][0]["flagged"], false);

    let v: Value = post("/v1/responses", json!({"model": "m", "input": "hello"}))
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(v["object"], "response");
    assert_eq!(v["output"][0]["content"][0]["text"], "Hello from mock");
    assert_eq!(v["usage"]["total_tokens"], 6);

    let text = post(
        "/v1/responses",
        json!({"model": "m", "input": "hello", "stream": true}),
    )
    .await
    .unwrap()
    .text()
    .await
    .unwrap();
    assert!(text.starts_with("event: response.created\ndata: "));
    let seqs: Vec<u64> = sse_data(&text)
        .iter()
        .map(|d| {
            serde_json::from_str::<Value>(d).unwrap()["sequence_number"]
                .as_u64()
                .unwrap()
        })
        .collect();
    assert_eq!(seqs, (0..seqs.len() as u64).collect::<Vec<_>>());
    assert!(text.contains("event: response.completed\n"));

    let v: Value = c
        .get(format!("{u}/v1/models"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(v["data"][0]["id"], "upstream-model");

    let resp = post("/v1/nope", json!({})).await.unwrap();
    assert_eq!(resp.status(), 404);
    let v: Value = resp.json().await.unwrap();
    assert!(v["error"]["message"].is_string());
    assert!(v["error"].get("type").is_some() && v["error"].get("code").is_some());
}

#[tokio::test]
async fn control_endpoints_script_list_and_reset() {
    let mock = MockUpstream::start().await;
    let c = client();
    let u = mock.url();
    let r = c
        .post(format!("{u}/__mock/script"))
        .json(&json!([
            {"respond": {"status": 500, "headers": [["x-a", "1"]], "body": {"error": {"message": "boom"}}}},
            {"delay": {"ms": 1, "then": {"stream": {"chunks": [[0, "data: [DONE]\n\n"]], "end": "finish"}}}},
        ]))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let bad = c
        .post(format!("{u}/__mock/script"))
        .json(&json!({"explode": 1}))
        .send()
        .await
        .unwrap();
    assert_eq!(bad.status(), 400);

    let req = json!({"model": "m", "messages": []});
    let first = c
        .post(format!("{u}/v1/chat/completions"))
        .json(&req)
        .send()
        .await
        .unwrap();
    assert_eq!(first.status(), 500);
    assert_eq!(first.headers()["x-a"], "1");
    assert_eq!(
        first.text().await.unwrap(),
        r#"{"error":{"message":"boom"}}"#
    );
    let second = c
        .post(format!("{u}/v1/chat/completions"))
        .json(&req)
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert_eq!(second, "data: [DONE]\n\n");

    // A binary body is listed as base64.
    c.post(format!("{u}/v1/audio/speech"))
        .body(vec![0xffu8, 0xfe, 0x00])
        .send()
        .await
        .unwrap();
    let list: Value = c
        .get(format!("{u}/__mock/requests"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let list = list.as_array().unwrap();
    assert_eq!(list.len(), 3, "control requests are not recorded");
    assert_eq!(list[0]["path"], "/v1/chat/completions");
    assert_eq!(list[0]["body_base64"], false);
    assert_eq!(
        serde_json::from_str::<Value>(list[0]["body"].as_str().unwrap()).unwrap(),
        req
    );
    assert_eq!(list[2]["body_base64"], true);
    assert_eq!(list[2]["body"], "//4A");

    c.post(format!("{u}/__mock/reset")).send().await.unwrap();
    assert_eq!(mock.request_count(), 0);
    let flight: Value = c
        .get(format!("{u}/__mock/in_flight"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(flight["in_flight"], 0);
}

#[test]
fn script_json_forms_parse() {
    let s = Scripted::from_json(&json!({"hang": null})).unwrap();
    assert!(matches!(s, Scripted::Hang));
    let s = Scripted::from_json(&json!({"delay": [5, {"respond": {"status": 429, "headers": {"retry-after": "1"}, "body": "x"}}]})).unwrap();
    match s {
        Scripted::Delay(d, inner) => {
            assert_eq!(d, Duration::from_millis(5));
            assert!(
                matches!(*inner, Scripted::Respond { status: 429, ref headers, .. } if headers[0].0 == "retry-after")
            );
        }
        other => panic!("{other:?}"),
    }
    let s =
        Scripted::from_json(&json!({"stream": {"chunks": [[0, "a"]], "end": "abort"}})).unwrap();
    assert!(matches!(
        s,
        Scripted::Stream {
            end: StreamEnd::Abort,
            ..
        }
    ));
    assert!(Scripted::from_json(&json!({"stream": {"chunks": [[0, "a"]], "end": "x"}})).is_err());
}

#[tokio::test]
async fn presets_have_the_upstreams_shapes() {
    let mock = MockUpstream::start().await;
    mock.script(Scripted::azure_content_filter());
    mock.script(Scripted::rate_limited(1500));
    mock.script(Scripted::tgi_error(422, "bad input", "validation"));
    mock.script(Scripted::vllm_error(400, "too long"));
    mock.script(Scripted::azure_stream("stop"));
    let c = client();
    let url = format!("{}/v1/chat/completions", mock.url());
    let req = json!({"model": "m", "messages": []});
    let send = || c.post(&url).json(&req).send();

    let r = send().await.unwrap();
    assert_eq!(r.status(), 400);
    let v: Value = r.json().await.unwrap();
    assert_eq!(v["error"]["code"], "content_filter");
    assert!(v["error"]["innererror"]["content_filter_result"].is_object());

    let r = send().await.unwrap();
    assert_eq!(r.status(), 429);
    assert_eq!(r.headers()["retry-after-ms"], "1500");
    assert_eq!(r.headers()["retry-after"], "2");

    let v: Value = send().await.unwrap().json().await.unwrap();
    assert_eq!(v, json!({"error": "bad input", "error_type": "validation"}));

    let v: Value = send().await.unwrap().json().await.unwrap();
    assert_eq!(v["error"]["code"], 400);

    let text = send().await.unwrap().text().await.unwrap();
    let data = sse_data(&text);
    let first: Value = serde_json::from_str(&data[0]).unwrap();
    assert_eq!(first["choices"], json!([]));
    assert!(first["prompt_filter_results"].is_array());
    let content: String = data
        .iter()
        .filter(|d| *d != "[DONE]")
        .filter_map(|d| {
            serde_json::from_str::<Value>(d).unwrap()["choices"][0]["delta"]["content"]
                .as_str()
                .map(str::to_string)
        })
        .collect();
    assert_eq!(content, "Hello from mock");
    assert_eq!(data.last().unwrap(), "[DONE]");
}

#[tokio::test]
async fn raw_byte_chunks_can_split_a_utf8_character() {
    let mock = MockUpstream::start().await;
    let e = "é".as_bytes();
    let b64 = |b: &[u8]| base64::engine::general_purpose::STANDARD.encode(b);
    let script = json!({"stream": {"chunks": [
        [0, {"base64": b64(&[b"data: \"".as_slice(), &e[..1]].concat())}],
        [30, {"base64": b64(&[&e[1..], b"\"\n\n".as_slice()].concat())}],
    ]}});
    let s = Scripted::from_json(&script).unwrap();
    assert!(matches!(s, Scripted::StreamBytes { .. }));
    mock.script(s);
    let resp = client()
        .post(format!("{}/v1/chat/completions", mock.url()))
        .json(&json!({"model": "m", "messages": []}))
        .send()
        .await
        .unwrap();
    let mut stream = resp.bytes_stream();
    let mut pieces = Vec::new();
    while let Some(b) = stream.next().await {
        pieces.push(b.unwrap());
    }
    assert!(pieces.len() >= 2);
    assert!(
        std::str::from_utf8(&pieces[0]).is_err(),
        "the first write ends mid-character"
    );
    assert_eq!(
        String::from_utf8(pieces.concat()).unwrap(),
        "data: \"é\"\n\n"
    );
}
