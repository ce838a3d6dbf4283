//! `kind: mock`: answers every endpoint in process, deterministically, in the shapes the real
//! API uses, for demos, tests and load tests. Its options set latency, stream chunks and the
//! delay between them, the reply text and a failure every Nth request. Usage numbers follow
//! the request (prompt tokens from its text, completion tokens = words answered).

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{SystemTime, UNIX_EPOCH};

use base64::Engine;
use bytes::Bytes;
use futures_util::stream;
use http::StatusCode;
use serde_json::{json, Value};
use sha2::{Digest, Sha256};

use super::AttemptError;
use crate::api::{ApiRequest, Operation, Payload};
use crate::config::MockCfg;
use crate::error::GatewayError;
use crate::server::body::{full, streaming, BoxError, ResponseBody};

const DEFAULT_REPLY: &str = "Hello from the Switchyard mock provider, answering deterministically";

/// A 1×1 transparent PNG.
const PNG_1X1: &[u8] = &[
    0x89, 0x50, 0x4E, 0x47, 0x0D, 0x0A, 0x1A, 0x0A, 0x00, 0x00, 0x00, 0x0D, 0x49, 0x48, 0x44, 0x52,
    0x00, 0x00, 0x00, 0x01, 0x00, 0x00, 0x00, 0x01, 0x08, 0x06, 0x00, 0x00, 0x00, 0x1F, 0x15, 0xC4,
    0x89, 0x00, 0x00, 0x00, 0x0D, 0x49, 0x44, 0x41, 0x54, 0x78, 0x9C, 0x63, 0x00, 0x01, 0x00, 0x00,
    0x05, 0x00, 0x01, 0x0D, 0x0A, 0x2D, 0xB4, 0x00, 0x00, 0x00, 0x00, 0x49, 0x45, 0x4E, 0x44, 0xAE,
    0x42, 0x60, 0x82,
];

pub struct MockProvider {
    cfg: MockCfg,
    words: Vec<String>,
    requests: AtomicU64,
}

impl MockProvider {
    pub fn new(cfg: MockCfg) -> MockProvider {
        let words = cfg
            .reply
            .as_deref()
            .unwrap_or(DEFAULT_REPLY)
            .split_whitespace()
            .map(String::from)
            .collect::<Vec<_>>();
        let words = if words.is_empty() {
            vec!["ok".to_string()]
        } else {
            words
        };
        MockProvider {
            cfg,
            words,
            requests: AtomicU64::new(0),
        }
    }

    pub async fn send(
        &self,
        req: &ApiRequest,
        model: &str,
    ) -> Result<http::Response<ResponseBody>, AttemptError> {
        let n = self.requests.fetch_add(1, Ordering::Relaxed) + 1;
        if !self.cfg.latency.0.is_zero() {
            tokio::time::sleep(self.cfg.latency.0).await;
        }
        if self.cfg.fail_every > 0 && n.is_multiple_of(self.cfg.fail_every) {
            return Err(AttemptError::Status {
                error: GatewayError::new(
                    StatusCode::SERVICE_UNAVAILABLE,
                    "api_error",
                    "upstream_error",
                    format!(
                        "mock failure: every {}th request fails",
                        self.cfg.fail_every
                    ),
                ),
                retry_after: None,
            });
        }
        let body: Value = match &req.payload {
            // As an upstream would see it, asked for usage on streams.
            Payload::Json { .. } => {
                serde_json::from_slice(&req.upstream_body(None, true, model, true))
                    .unwrap_or(Value::Null)
            }
            // A form's text fields, numbers as numbers.
            Payload::Multipart { parts, .. } => Value::Object(
                parts
                    .iter()
                    .filter(|p| !p.file)
                    .map(|p| {
                        let v = crate::api::multipart::text(&req.body, p.value.clone());
                        let v = v.parse::<u64>().map_or(Value::String(v), Value::from);
                        (p.name().to_string(), v)
                    })
                    .collect(),
            ),
        };
        let answer = Answer {
            mock: self,
            model,
            body: &body,
            id: format!("mock-{n}"),
            created: SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .map(|d| d.as_secs())
                .unwrap_or(0),
        };
        Ok(match req.op {
            Operation::ChatCompletions | Operation::Completions | Operation::Responses
                if req.stream =>
            {
                answer.stream(req.op)
            }
            Operation::ChatCompletions => json_ok(answer.chat()),
            Operation::Completions => json_ok(answer.completion()),
            Operation::Responses => json_ok(answer.response()),
            Operation::Embeddings => json_ok(answer.embeddings()),
            Operation::ImagesGenerations | Operation::ImagesEdits | Operation::ImagesVariations => {
                json_ok(answer.images())
            }
            Operation::Moderations => json_ok(answer.moderation()),
            Operation::AudioSpeech => answer.speech(),
            Operation::AudioTranscriptions | Operation::AudioTranslations => {
                answer.transcription(req)
            }
        })
    }

    /// Words answered: `stream_chunks`, capped by the request's `max_tokens`.
    fn reply_words(&self, body: &Value) -> Vec<&str> {
        let cap = ["max_tokens", "max_completion_tokens", "max_output_tokens"]
            .iter()
            .find_map(|k| body.get(*k).and_then(Value::as_u64))
            .unwrap_or(u64::MAX);
        let n = (self.cfg.stream_chunks.max(1) as u64).min(cap.max(1)) as usize;
        (0..n)
            .map(|i| self.words[i % self.words.len()].as_str())
            .collect()
    }
}

fn json_ok(v: Value) -> http::Response<ResponseBody> {
    crate::server::body::json_response(StatusCode::OK, &v)
}

struct Answer<'a> {
    mock: &'a MockProvider,
    model: &'a str,
    body: &'a Value,
    id: String,
    created: u64,
}

/// Tokens of a text, roughly as a BPE tokenizer counts English: about four characters each.
fn tokens_of(text: &str) -> u64 {
    (text.chars().count() as u64).div_ceil(4).max(1)
}

/// Every string inside a JSON value, concatenated (message contents, prompts, inputs).
fn text_of(v: &Value, out: &mut String) {
    match v {
        Value::String(s) => {
            out.push_str(s);
            out.push(' ');
        }
        Value::Array(a) => a.iter().for_each(|x| text_of(x, out)),
        Value::Object(o) => {
            for (k, x) in o {
                // An image's data URL is not text.
                if k != "image_url" && k != "url" {
                    text_of(x, out);
                }
            }
        }
        _ => {}
    }
}

impl Answer<'_> {
    fn prompt_tokens(&self, field: &str) -> u64 {
        let mut text = String::new();
        if let Some(v) = self.body.get(field) {
            text_of(v, &mut text);
        }
        let per_message = match self.body.get(field) {
            Some(Value::Array(a)) if field == "messages" => 3 * a.len() as u64,
            _ => 0,
        };
        tokens_of(&text) + per_message
    }

    fn content(&self) -> (String, u64) {
        let words = self.pieces();
        (words.join(" "), words.len() as u64)
    }

    /// What the answer says, one piece per stream chunk: the reply's words or, when the request
    /// asks for JSON (`response_format`, or the Responses API's `text.format`), one JSON text:
    /// an instance of the schema given, else `{"reply": …}`.
    fn pieces(&self) -> Vec<String> {
        let format = self
            .body
            .get("response_format")
            .or_else(|| self.body.pointer("/text/format"));
        let words = self.mock.reply_words(self.body);
        let json = match format.and_then(|f| f.get("type")).and_then(Value::as_str) {
            Some("json_schema") => {
                let f = format.unwrap_or(&Value::Null);
                let schema = f
                    .pointer("/json_schema/schema")
                    .or_else(|| f.get("schema"))
                    .unwrap_or(&Value::Null);
                instance(schema, schema, 0)
            }
            Some("json_object") => json!({"reply": words.join(" ")}),
            _ => return words.into_iter().map(String::from).collect(),
        };
        vec![json.to_string()]
    }

    fn chat(&self) -> Value {
        let (content, completion) = self.content();
        let prompt = self.prompt_tokens("messages");
        let tool = self.first_tool();
        let (message, finish) = match &tool {
            Some(name) => (
                json!({"role": "assistant", "content": null, "refusal": null, "tool_calls": [
                    {"id": format!("call_{}", self.id), "type": "function",
                     "function": {"name": name, "arguments": "{}"}}]}),
                "tool_calls",
            ),
            None => (
                json!({"role": "assistant", "content": content, "refusal": null}),
                "stop",
            ),
        };
        let n = self.choices();
        let choices: Vec<Value> = (0..n)
            .map(|i| json!({"index": i, "message": message, "logprobs": null, "finish_reason": finish}))
            .collect();
        json!({
            "id": format!("chatcmpl-{}", self.id),
            "object": "chat.completion",
            "created": self.created,
            "model": self.model,
            "system_fingerprint": "fp_mock",
            "choices": choices,
            "usage": usage(prompt, completion * n),
        })
    }

    /// `n`, as the API takes it (1 to 128; 1 when not set).
    fn choices(&self) -> u64 {
        self.body
            .get("n")
            .and_then(Value::as_u64)
            .unwrap_or(1)
            .clamp(1, 128)
    }

    fn first_tool(&self) -> Option<String> {
        let tools = self.body.get("tools")?.as_array()?;
        let first = tools.first()?;
        first
            .pointer("/function/name")
            .and_then(Value::as_str)
            .map(String::from)
    }

    fn completion(&self) -> Value {
        let (content, completion) = self.content();
        json!({
            "id": format!("cmpl-{}", self.id),
            "object": "text_completion",
            "created": self.created,
            "model": self.model,
            "choices": [{"index": 0, "text": content, "logprobs": null, "finish_reason": "stop"}],
            "usage": usage(self.prompt_tokens("prompt"), completion),
        })
    }

    fn response(&self) -> Value {
        let (content, completion) = self.content();
        let mut input = self.prompt_tokens("input");
        if self.body.get("instructions").is_some() {
            input += self.prompt_tokens("instructions");
        }
        json!({
            "id": format!("resp_{}", self.id),
            "object": "response",
            "created_at": self.created,
            "status": "completed",
            "model": self.model,
            "output": [{
                "type": "message", "id": format!("msg_{}", self.id), "status": "completed",
                "role": "assistant",
                "content": [{"type": "output_text", "text": content, "annotations": []}],
            }],
            "usage": {
                "input_tokens": input, "input_tokens_details": {"cached_tokens": 0},
                "output_tokens": completion, "output_tokens_details": {"reasoning_tokens": 0},
                "total_tokens": input + completion,
            },
        })
    }

    fn embeddings(&self) -> Value {
        let inputs: Vec<String> = match self.body.get("input") {
            Some(Value::Array(items)) if items.iter().all(Value::is_string) => items
                .iter()
                .filter_map(|s| s.as_str().map(String::from))
                .collect(),
            Some(Value::Array(items)) if items.iter().all(Value::is_number) => {
                vec![Value::Array(items.clone()).to_string()]
            }
            Some(Value::Array(items)) => items.iter().map(|i| i.to_string()).collect(),
            Some(Value::String(s)) => vec![s.clone()],
            Some(other) => vec![other.to_string()],
            None => vec![],
        };
        let dims = self
            .body
            .get("dimensions")
            .and_then(Value::as_u64)
            .map(|d| d as usize)
            .unwrap_or(self.mock.cfg.embedding_dimensions)
            .clamp(1, 8192);
        let base64 = self.body.get("encoding_format").and_then(Value::as_str) == Some("base64");
        let mut prompt = 0;
        let data: Vec<Value> = inputs
            .iter()
            .enumerate()
            .map(|(i, text)| {
                prompt += tokens_of(text);
                let v = embedding(text, dims);
                let embedding = if base64 {
                    let bytes: Vec<u8> = v.iter().flat_map(|f| f.to_le_bytes()).collect();
                    Value::String(base64::engine::general_purpose::STANDARD.encode(bytes))
                } else {
                    json!(v)
                };
                json!({"object": "embedding", "index": i, "embedding": embedding})
            })
            .collect();
        json!({
            "object": "list",
            "data": data,
            "model": self.model,
            "usage": {"prompt_tokens": prompt, "total_tokens": prompt},
        })
    }

    fn images(&self) -> Value {
        let n = self
            .body
            .get("n")
            .and_then(Value::as_u64)
            .unwrap_or(1)
            .clamp(1, 10);
        let prompt = self
            .body
            .get("prompt")
            .and_then(Value::as_str)
            .unwrap_or("");
        let b64 = base64::engine::general_purpose::STANDARD.encode(PNG_1X1);
        let as_url = self.body.get("response_format").and_then(Value::as_str) == Some("url");
        let data: Vec<Value> = (0..n)
            .map(|_| {
                if as_url {
                    json!({"url": format!("data:image/png;base64,{b64}"), "revised_prompt": prompt})
                } else {
                    json!({"b64_json": b64, "revised_prompt": prompt})
                }
            })
            .collect();
        json!({"created": self.created, "data": data})
    }

    fn moderation(&self) -> Value {
        let cats = [
            "harassment",
            "harassment/threatening",
            "hate",
            "hate/threatening",
            "illicit",
            "illicit/violent",
            "self-harm",
            "self-harm/instructions",
            "self-harm/intent",
            "sexual",
            "sexual/minors",
            "violence",
            "violence/graphic",
        ];
        let categories: serde_json::Map<String, Value> =
            cats.iter().map(|c| (c.to_string(), json!(false))).collect();
        let scores: serde_json::Map<String, Value> = cats
            .iter()
            .map(|c| (c.to_string(), json!(0.0001)))
            .collect();
        let inputs = match self.body.get("input") {
            Some(Value::Array(a)) => a.len().max(1),
            _ => 1,
        };
        let results: Vec<Value> = (0..inputs)
            .map(|_| json!({"flagged": false, "categories": categories, "category_scores": scores}))
            .collect();
        json!({"id": format!("modr-{}", self.id), "model": self.model, "results": results})
    }

    fn speech(&self) -> http::Response<ResponseBody> {
        let input = self.body.get("input").and_then(Value::as_str).unwrap_or("");
        // Some deterministic bytes, longer for longer input, like real audio.
        let len = 1024 + input.len() * 64;
        let seed = Sha256::digest(input.as_bytes());
        let audio: Vec<u8> = (0..len).map(|i| seed[i % 32] ^ (i as u8)).collect();
        let ct = match self.body.get("response_format").and_then(Value::as_str) {
            Some("wav") => "audio/wav",
            Some("opus") => "audio/opus",
            Some("aac") => "audio/aac",
            Some("flac") => "audio/flac",
            Some("pcm") => "audio/pcm",
            _ => "audio/mpeg",
        };
        let mut resp = http::Response::new(full(audio));
        resp.headers_mut().insert(
            http::header::CONTENT_TYPE,
            http::HeaderValue::from_static(ct),
        );
        resp
    }

    fn transcription(&self, req: &ApiRequest) -> http::Response<ResponseBody> {
        let format = req
            .form_field("response_format")
            .map(|r| crate::api::multipart::text(&req.body, r));
        let (text, _) = self.content();
        // The file's length when the gateway could read it, else its bytes as 16 kHz 16-bit mono.
        let duration = req
            .audio
            .seconds
            .unwrap_or((req.body.len() as f64 / 32_000.0).max(0.1));
        let text_body = |ct: &'static str, body: String| {
            let mut resp = http::Response::new(full(body));
            resp.headers_mut().insert(
                http::header::CONTENT_TYPE,
                http::HeaderValue::from_static(ct),
            );
            resp
        };
        match format.as_deref() {
            Some("text") => text_body("text/plain; charset=utf-8", text),
            Some("srt") => text_body(
                "text/plain; charset=utf-8",
                format!(
                    "1\n00:00:00,000 --> 00:00:{:02},000\n{text}\n",
                    duration.ceil() as u64
                ),
            ),
            Some("vtt") => text_body(
                "text/plain; charset=utf-8",
                format!(
                    "WEBVTT\n\n00:00:00.000 --> 00:00:{:02}.000\n{text}\n",
                    duration.ceil() as u64
                ),
            ),
            Some("verbose_json") => json_ok(json!({
                "task": if req.op == Operation::AudioTranslations { "translate" } else { "transcribe" },
                "language": "english", "duration": duration, "text": text, "segments": [],
            })),
            _ => json_ok(json!({"text": text})),
        }
    }

    /// A stream in the upstream's own framing: chat and completion chunks, or Responses API
    /// events, spaced by `chunk_delay`, with the usage chunk when the client asked for it.
    fn stream(&self, op: Operation) -> http::Response<ResponseBody> {
        let words = self.pieces();
        let include_usage = self
            .body
            .pointer("/stream_options/include_usage")
            .and_then(Value::as_bool)
            .unwrap_or(false);
        let mut events: Vec<String> = Vec::new();
        let sse = |v: Value| format!("data: {v}\n\n");
        match op {
            Operation::ChatCompletions => {
                let prompt = self.prompt_tokens("messages");
                let id = format!("chatcmpl-{}", self.id);
                let n = self.choices();
                // With `n`, each step goes out once per choice, as the API interleaves them.
                let chunks = |events: &mut Vec<String>, delta: Value, finish: Value| {
                    for index in 0..n {
                        let mut c = json!({"id": id, "object": "chat.completion.chunk", "created": self.created,
                            "model": self.model, "system_fingerprint": "fp_mock",
                            "choices": [{"index": index, "delta": delta, "logprobs": null, "finish_reason": finish}]});
                        if include_usage {
                            c["usage"] = Value::Null;
                        }
                        events.push(sse(c));
                    }
                };
                chunks(
                    &mut events,
                    json!({"role": "assistant", "content": "", "refusal": null}),
                    Value::Null,
                );
                match self.first_tool() {
                    Some(name) => {
                        chunks(
                            &mut events,
                            json!({"tool_calls": [{"index": 0, "id": format!("call_{}", self.id),
                            "type": "function", "function": {"name": name, "arguments": ""}}]}),
                            Value::Null,
                        );
                        chunks(
                            &mut events,
                            json!({"tool_calls": [{"index": 0, "function": {"arguments": "{}"}}]}),
                            Value::Null,
                        );
                        chunks(&mut events, json!({}), json!("tool_calls"));
                    }
                    None => {
                        for (i, w) in words.iter().enumerate() {
                            let piece = if i == 0 {
                                w.to_string()
                            } else {
                                format!(" {w}")
                            };
                            chunks(&mut events, json!({"content": piece}), Value::Null);
                        }
                        chunks(&mut events, json!({}), json!("stop"));
                    }
                }
                if include_usage {
                    events.push(sse(
                        json!({"id": id, "object": "chat.completion.chunk", "created": self.created,
                        "model": self.model, "system_fingerprint": "fp_mock", "choices": [],
                        "usage": usage(prompt, words.len() as u64 * n)}),
                    ));
                }
                events.push("data: [DONE]\n\n".into());
            }
            Operation::Completions => {
                let prompt = self.prompt_tokens("prompt");
                let id = format!("cmpl-{}", self.id);
                for (i, w) in words.iter().enumerate() {
                    let piece = if i == 0 {
                        w.to_string()
                    } else {
                        format!(" {w}")
                    };
                    let finish = if i + 1 == words.len() {
                        json!("stop")
                    } else {
                        Value::Null
                    };
                    events.push(sse(json!({"id": id, "object": "text_completion", "created": self.created,
                        "model": self.model, "choices": [{"index": 0, "text": piece, "logprobs": null, "finish_reason": finish}]})));
                }
                if include_usage {
                    events.push(sse(json!({"id": id, "object": "text_completion", "created": self.created,
                        "model": self.model, "choices": [], "usage": usage(prompt, words.len() as u64)})));
                }
                events.push("data: [DONE]\n\n".into());
            }
            _ => {
                let full = self.response();
                let item_id = format!("msg_{}", self.id);
                let mut seq = 0u64;
                let mut event = |kind: &str, mut data: Value| {
                    data["type"] = json!(kind);
                    data["sequence_number"] = json!(seq);
                    seq += 1;
                    format!("event: {kind}\ndata: {data}\n\n")
                };
                let mut created = full.clone();
                created["status"] = json!("in_progress");
                created["output"] = json!([]);
                created["usage"] = Value::Null;
                // The whole sequence the API sends, which the SDK's `responses.stream` helper
                // checks: the item and its content part open before any text, close after it.
                events.push(event(
                    "response.created",
                    json!({"response": created.clone()}),
                ));
                events.push(event("response.in_progress", json!({"response": created})));
                let item = full["output"][0].clone();
                let part = item["content"][0].clone();
                let mut open_item = item.clone();
                open_item["status"] = json!("in_progress");
                open_item["content"] = json!([]);
                events.push(event(
                    "response.output_item.added",
                    json!({"output_index": 0, "item": open_item}),
                ));
                events.push(event(
                    "response.content_part.added",
                    json!({"item_id": item_id, "output_index": 0, "content_index": 0,
                           "part": {"type": "output_text", "text": "", "annotations": []}}),
                ));
                for (i, w) in words.iter().enumerate() {
                    let piece = if i == 0 {
                        w.to_string()
                    } else {
                        format!(" {w}")
                    };
                    events.push(event(
                        "response.output_text.delta",
                        json!({"item_id": item_id, "output_index": 0, "content_index": 0,
                               "delta": piece, "logprobs": []}),
                    ));
                }
                events.push(event(
                    "response.output_text.done",
                    json!({"item_id": item_id, "output_index": 0, "content_index": 0,
                           "text": part["text"], "logprobs": []}),
                ));
                events.push(event(
                    "response.content_part.done",
                    json!({"item_id": item_id, "output_index": 0, "content_index": 0,
                           "part": part}),
                ));
                events.push(event(
                    "response.output_item.done",
                    json!({"output_index": 0, "item": item}),
                ));
                events.push(event("response.completed", json!({"response": full})));
            }
        }
        let delay = self.mock.cfg.chunk_delay.0;
        let s = stream::unfold(
            (events.into_iter(), true),
            move |(mut it, first)| async move {
                let next = it.next()?;
                if !first && !delay.is_zero() {
                    tokio::time::sleep(delay).await;
                }
                Some((Ok::<Bytes, BoxError>(Bytes::from(next)), (it, false)))
            },
        );
        let mut resp = http::Response::new(streaming(s));
        let h = resp.headers_mut();
        h.insert(
            http::header::CONTENT_TYPE,
            http::HeaderValue::from_static("text/event-stream"),
        );
        h.insert(
            http::header::CACHE_CONTROL,
            http::HeaderValue::from_static("no-cache"),
        );
        resp
    }
}

/// A value that fits a JSON schema as structured outputs use them: every property of an
/// object, one item of an array, the first of an `enum` or `anyOf`, `$ref`s to the schema's
/// own `$defs`; strings are `"mock"`, numbers 0, booleans false.
fn instance(schema: &Value, root: &Value, depth: u32) -> Value {
    if depth > 16 {
        return Value::Null;
    }
    if let Some(r) = schema.get("$ref").and_then(Value::as_str) {
        let target = r.strip_prefix('#').and_then(|p| root.pointer(p));
        return target.map_or(Value::Null, |t| instance(t, root, depth + 1));
    }
    if let Some(first) = schema.get("enum").and_then(|e| e.get(0)) {
        return first.clone();
    }
    if let Some(c) = schema.get("const") {
        return c.clone();
    }
    for key in ["anyOf", "oneOf", "allOf"] {
        if let Some(first) = schema.get(key).and_then(|a| a.get(0)) {
            return instance(first, root, depth + 1);
        }
    }
    let kind = match schema.get("type") {
        Some(Value::Array(kinds)) => kinds
            .iter()
            .filter_map(Value::as_str)
            .find(|k| *k != "null")
            .unwrap_or("null"),
        Some(Value::String(k)) => k.as_str(),
        _ if schema.get("properties").is_some() => "object",
        _ => "string",
    };
    match kind {
        "object" => Value::Object(
            schema
                .get("properties")
                .and_then(Value::as_object)
                .map(|props| {
                    props
                        .iter()
                        .map(|(k, v)| (k.clone(), instance(v, root, depth + 1)))
                        .collect()
                })
                .unwrap_or_default(),
        ),
        "array" => json!([instance(
            schema.get("items").unwrap_or(&Value::Null),
            root,
            depth + 1
        )]),
        "integer" | "number" => json!(0),
        "boolean" => json!(false),
        "null" => Value::Null,
        _ => json!("mock"),
    }
}

fn usage(prompt: u64, completion: u64) -> Value {
    json!({
        "prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion,
        "prompt_tokens_details": {"cached_tokens": 0},
        "completion_tokens_details": {"reasoning_tokens": 0},
    })
}

/// A unit vector that depends only on the text: the same input always embeds the same.
pub fn embedding(text: &str, dims: usize) -> Vec<f32> {
    let mut seed = u64::from_le_bytes(
        Sha256::digest(text.as_bytes())[..8]
            .try_into()
            .unwrap_or([1; 8]),
    ) | 1;
    let mut v: Vec<f32> = (0..dims)
        .map(|_| {
            // xorshift64*
            seed ^= seed >> 12;
            seed ^= seed << 25;
            seed ^= seed >> 27;
            let r = seed.wrapping_mul(0x2545_F491_4F6C_DD1D);
            (r >> 40) as f32 / (1u64 << 24) as f32 * 2.0 - 1.0
        })
        .collect();
    let norm = v
        .iter()
        .map(|x| x * x)
        .sum::<f32>()
        .sqrt()
        .max(f32::EPSILON);
    v.iter_mut().for_each(|x| *x /= norm);
    v
}
