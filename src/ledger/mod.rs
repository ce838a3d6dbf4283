//! Usage, prices, cost and the ledger. `Tap` wraps a response body on its way to the client:
//! it passes every chunk through as it comes, reads the usage on the side (from the JSON
//! answer, or from the stream's usage chunk — dropped again when only the gateway asked for
//! it), and when the body ends (or the client goes away) it prices the request, settles the
//! budget reservation and queues the ledger row.

pub mod cost;
pub mod report;
pub mod store;

use std::pin::Pin;
use std::sync::{Arc, LazyLock};
use std::task::{Context, Poll};
use std::time::Instant;

use bytes::{Bytes, BytesMut};
use http_body::{Body, Frame, SizeHint};
use serde_json::Value;

use crate::api::Operation;
use crate::policy::{send_alerts, Actual, Admitted, Plan, PolicyState};
use crate::server::body::{BoxError, ResponseBody};
use crate::stream::sse::{ends_with_done, event_data, event_ends};
use crate::Name;
use cost::{count_tokens, Price, Usage};
pub use store::{LedgerRow, LedgerWriter};

/// Finds `"usage"` in stream events (built once, not per chunk).
static USAGE_KEY: LazyLock<memchr::memmem::Finder<'static>> =
    LazyLock::new(|| memchr::memmem::Finder::new(b"\"usage\""));

/// What settles a request: shared by every request of a gateway.
#[derive(Clone)]
pub struct Accounting {
    pub policy: Arc<dyn PolicyState>,
    pub ledger: LedgerWriter,
    pub http: reqwest::Client,
    pub webhook: Option<Arc<str>>,
}

pub fn now_ms() -> i64 {
    chrono::Utc::now().timestamp_millis()
}

/// One request's record, filled in as it goes and written once at its end. Dropped unfinished
/// (the client went away, or the gateway shut down, before the answer began), it is finished
/// as status 499: its row is written and its reservation and in-flight count are released,
/// so a cancelled request holds no budget or `max_parallel` slot; at no cost unless an
/// attempt was out upstream (`finish_abandoned`).
pub struct RequestRecord {
    /// `None` once finished.
    pub accounting: Option<Accounting>,
    pub plan: Plan,
    pub admitted: Option<Admitted>,
    pub row: LedgerRow,
    pub started: Instant,
    pub op: Operation,
    pub price: Price,
    /// The model name whose tokenizer counts tokens when the upstream reports none.
    pub tokenizer_model: Name,
    /// The request body, kept (not copied) for counting prompt tokens if needed.
    pub request_body: Bytes,
    /// In a form (an image edit), the range of its `prompt`, counted instead.
    pub form_prompt: Option<std::ops::Range<usize>>,
    /// The key's series on the serving deployment, when one served.
    pub counters: Option<Arc<crate::telemetry::metrics::KeyCounters>>,
    /// What the gateway measured of the request itself, priced when the upstream's answer
    /// reports no usage (`ApiRequest::measured_usage`).
    pub measured_usage: Option<Usage>,
    /// The attempts' facts while the route tries its deployments: a request dropped then
    /// (its client gone) is recorded with the deployment it was waiting on.
    pub served: crate::route::Served,
    /// Priced though not a success (`finish_billed_refusal`, `finish_abandoned`).
    pub billed_refusal: bool,
    /// Its config generation's token (`Runtime::requests`), let go once it is settled.
    pub generation: Option<Arc<()>>,
    /// The output tokens its reservation assumed (`Route::output_cap`, times the answers
    /// asked for): what a Responses request run in the background (answered `queued`, its
    /// usage to come later, upstream) and an abandoned one (`finish_abandoned`) are charged.
    pub output_cap: u64,
    /// The output cap sent upstream (the client's, or the one the gateway added), times the
    /// answers asked for: a usage saying more completion tokens than that is not believed.
    pub sent_cap: Option<u64>,
    /// A Responses request run in the background (`ApiRequest::background`).
    pub background: bool,
    /// Asked for as a stream.
    pub stream: bool,
    /// A cost set outright rather than priced from usage (an abandoned image request: its
    /// reservation's worst case).
    pub charge_usd: Option<f64>,
}

/// The status of a request whose client closed it before the answer began (nginx's).
pub const CLIENT_CLOSED: u16 = 499;

impl Drop for RequestRecord {
    fn drop(&mut self) {
        if self.accounting.is_none() {
            return;
        }
        if self.served.out || self.served.abandoned {
            // Its client gone while an attempt was out (or after one was given up on): the
            // upstream may go on and bill it.
            self.price = self.served.price;
            self.tokenizer_model
                .clone_from(&self.served.tokenizer_model);
            self.settle_abandoned(CLIENT_CLOSED);
        } else {
            self.settle(CLIENT_CLOSED, None, None);
        }
    }
}

impl RequestRecord {
    /// The row's route (a fallback's, when one served), deployment and provider from the
    /// attempts made so far.
    pub fn row_from_served(&mut self) {
        let s = &self.served;
        if !s.route.is_empty() {
            self.row.route.clone_from(&s.route);
        }
        self.row.deployment.clone_from(&s.deployment);
        self.row.provider.clone_from(&s.provider);
    }

    /// Prices the request, settles its reservation and queues its ledger row. Nothing here
    /// waits: the in-process state settles at once, Redis in a task of its own.
    pub fn finish(mut self, status: u16, usage: Option<Usage>, first_byte: Option<Instant>) {
        self.settle(status, usage, first_byte);
    }

    /// A refusal the upstream bills: Azure bills a prompt its content filter refuses (a
    /// 400) for its tokens, which the refusal does not report. Counted with the tokenizer,
    /// marked estimated, at the prompt's price.
    pub fn finish_billed_refusal(mut self, status: u16) {
        let usage = self.estimate("");
        self.billed_refusal = true;
        self.settle(status, Some(usage), None);
    }

    /// A request given up while its last attempt was out upstream, before the answer began:
    /// the route's timeout passed (504), or its client left (499). The upstream may go on and
    /// bill it (OpenAI and Azure do for a plain request whose client left), which the
    /// gateway would never see: charged what its reservation assumed, so that no budget can
    /// be spent without end by requests that time out (each, retried by the SDK, was free).
    pub fn finish_abandoned(mut self, status: u16) {
        self.settle_abandoned(status);
    }

    fn settle_abandoned(&mut self, status: u16) {
        let usage = if counts_tokens(self.op) {
            if self.stream {
                // An upstream stops making a stream whose connection closed; before its first
                // token here: its prompt.
                self.estimate("")
            } else {
                self.reserved_usage()
            }
        } else {
            // Audio by its measured length or text; images at the reservation's worst case.
            let mut u = self.measured_usage.unwrap_or_default();
            u.estimated = true;
            if is_image_op(self.op) {
                self.charge_usd = Some(self.plan.worst_usd);
            }
            u
        };
        self.billed_refusal = true;
        self.settle(status, Some(usage), None);
    }

    fn settle(&mut self, status: u16, usage: Option<Usage>, first_byte: Option<Instant>) {
        let Some(accounting) = self.accounting.take() else {
            return;
        };
        // Dropped while a deployment was being tried (its client gone): that one.
        if self.row.deployment.is_empty() {
            self.row_from_served();
        }
        let usage = usage.unwrap_or_default();
        let cost = if (200..300).contains(&status) || self.billed_refusal {
            self.charge_usd.unwrap_or_else(|| self.price.cost(&usage))
        } else {
            0.0
        };
        let r = &mut self.row;
        r.status = status;
        r.prompt_tokens = usage.prompt;
        r.cached_tokens = usage.cached.min(usage.prompt);
        r.completion_tokens = usage.completion;
        r.cost_usd = cost;
        r.estimated = usage.estimated;
        r.latency_ms = self.started.elapsed().as_secs_f64() * 1000.0;
        r.ttft_ms = first_byte.map(|t| (t - self.started).as_secs_f64() * 1000.0);
        if let Some(m) = crate::telemetry::metrics::metrics() {
            // Its client gone before the answer, the request writes no log line with its
            // route and key (the access log's 499 line has neither): counted here.
            if status == CLIENT_CLOSED {
                m.requests
                    .with_label_values(&[
                        if r.route.is_empty() {
                            "unknown"
                        } else {
                            &r.route
                        },
                        &r.deployment,
                        &r.endpoint,
                        "499",
                        &r.team,
                        &r.key,
                    ])
                    .inc();
            }
            let uncached = r.prompt_tokens - r.cached_tokens;
            match &self.counters {
                Some(c) => {
                    c.prompt.inc_by(uncached);
                    c.cached.inc_by(r.cached_tokens);
                    c.completion.inc_by(r.completion_tokens);
                    c.cost.inc_by(cost);
                }
                // No deployment served (refused, a cache hit): by the label values.
                None => {
                    let labels =
                        |kind: &'static str| [&*r.route, &*r.deployment, &*r.team, &*r.key, kind];
                    m.tokens
                        .with_label_values(&labels("prompt"))
                        .inc_by(uncached);
                    m.tokens
                        .with_label_values(&labels("cached"))
                        .inc_by(r.cached_tokens);
                    m.tokens
                        .with_label_values(&labels("completion"))
                        .inc_by(r.completion_tokens);
                    m.cost
                        .with_label_values(&[&r.route, &r.deployment, &r.team, &r.key])
                        .inc_by(cost);
                }
            }
        }
        let actual = Actual {
            cost_usd: cost,
            tokens: usage.prompt + usage.completion,
            // The row's start and latency say when it ended (no second clock read).
            ended_ms: self.row.ts_ms + self.row.latency_ms.ceil() as i64,
        };
        let plan = std::mem::take(&mut self.plan);
        let admitted = self.admitted.take();
        // Fallback routes' own limits: the one that served takes the real tokens, one that
        // could not keeps its estimate.
        let fallbacks: Vec<_> = std::mem::take(&mut self.served.admissions)
            .into_iter()
            .map(|f| {
                let tokens = if f.route == self.row.route {
                    actual.tokens
                } else {
                    f.plan.tokens
                };
                (
                    f,
                    Actual {
                        cost_usd: 0.0,
                        tokens,
                        ended_ms: actual.ended_ms,
                    },
                )
            })
            .collect();
        accounting.ledger.record(std::mem::take(&mut self.row));
        if admitted.is_some() || !fallbacks.is_empty() {
            let mut fut = Box::pin(async move {
                if let Some(admitted) = admitted {
                    let alerts = accounting.policy.settle(&plan, &admitted, actual).await;
                    send_alerts(&accounting.http, accounting.webhook.as_deref(), alerts);
                }
                for (f, actual) in fallbacks {
                    accounting.policy.settle(&f.plan, &f.admitted, actual).await;
                }
            });
            // The in-process state settles at once, here; a settlement that waits (Redis)
            // goes on in a task of its own.
            if futures_util::FutureExt::now_or_never(&mut fut).is_none() {
                match tokio::runtime::Handle::try_current() {
                    Ok(h) => {
                        h.spawn(fut);
                    }
                    Err(_) => tracing::error!("no runtime to settle a reservation on"),
                }
            }
        }
    }

    /// What its reservation assumed, as a row: the prompt counted with the tokenizer and the
    /// whole output cap, estimated. What a background response (usage known upstream only
    /// when it is done, which the gateway does not follow) is charged, so that no budget is
    /// overspent by it.
    fn reserved_usage(&self) -> Usage {
        let mut u = self.estimate("");
        u.completion = self.output_cap;
        u
    }

    /// Counts tokens with the tokenizer when the upstream reported no usage.
    fn estimate(&self, answer_text: &str) -> Usage {
        let mut prompt_text = String::new();
        // A prompt or input given as token ids (arrays of integers): one token each.
        let mut token_ids = 0;
        if let Some(r) = self.form_prompt.clone() {
            // A form (an image edit): its `prompt`.
            prompt_text = crate::api::multipart::text(&self.request_body, r);
        } else if let Ok(v) = serde_json::from_slice::<Value>(&self.request_body) {
            for field in ["messages", "prompt", "input", "instructions"] {
                if let Some(x) = v.get(field) {
                    collect_text(x, &mut prompt_text);
                    if matches!(field, "prompt" | "input") {
                        token_ids += count_token_ids(x);
                    }
                }
            }
        }
        Usage {
            prompt: count_tokens(&self.tokenizer_model, &prompt_text) + token_ids,
            completion: count_tokens(&self.tokenizer_model, answer_text),
            estimated: true,
            ..Default::default()
        }
    }
}

/// Whether a chunk of a Responses stream (whole events) holds its `response.failed` event:
/// one named so by its `event:` line, or whose data's own `type` says so. The words elsewhere
/// (the model's text, instructions or metadata echoed in a response object) do not count.
fn says_response_failed(chunk: &[u8]) -> bool {
    static WORDS: std::sync::LazyLock<memchr::memmem::Finder<'static>> =
        std::sync::LazyLock::new(|| memchr::memmem::Finder::new(b"response.failed"));
    if WORDS.find(chunk).is_none() {
        return false;
    }
    #[derive(serde::Deserialize)]
    struct Head<'a> {
        #[serde(borrow, rename = "type")]
        kind: Option<std::borrow::Cow<'a, str>>,
    }
    let mut start = 0;
    event_ends(chunk).into_iter().any(|end| {
        let event = &chunk[std::mem::replace(&mut start, end)..end];
        if WORDS.find(event).is_none() {
            return false;
        }
        crate::stream::sse::is_named(event, b"response.failed")
            || event_data(event).is_some_and(|d| {
                serde_json::from_slice::<Head>(&d)
                    .is_ok_and(|h| h.kind.as_deref() == Some("response.failed"))
            })
    })
}

/// Tokens a usage may say beyond the cap sent before it is not believed (a server counting
/// an end token, say).
const OVER_CAP_SLACK: u64 = 16;

/// Whether a Responses answer is one still running upstream (`status` `queued` or
/// `in_progress`: a background response).
fn runs_on(answer: &[u8]) -> bool {
    #[derive(serde::Deserialize)]
    struct Head<'a> {
        #[serde(borrow)]
        status: Option<std::borrow::Cow<'a, str>>,
    }
    serde_json::from_slice::<Head>(answer)
        .is_ok_and(|h| matches!(h.status.as_deref(), Some("queued" | "in_progress")))
}

/// The token ids in a `prompt` or `input` given as tokens: `[1, 2, 3]` or `[[1, 2], [3]]`.
fn count_token_ids(v: &Value) -> u64 {
    match v {
        Value::Array(a) => a
            .iter()
            .map(|x| match x {
                Value::Number(_) => 1,
                Value::Array(_) => count_token_ids(x),
                _ => 0,
            })
            .sum(),
        _ => 0,
    }
}

/// The text of a JSON value: every string but inline data and URLs.
fn collect_text(v: &Value, out: &mut String) {
    match v {
        Value::String(s) => out.push_str(s),
        Value::Array(a) => a.iter().for_each(|x| collect_text(x, out)),
        Value::Object(o) => {
            for (k, x) in o {
                if !matches!(
                    k.as_str(),
                    "image_url" | "url" | "type" | "role" | "id" | "input_audio"
                ) {
                    collect_text(x, out);
                }
            }
        }
        _ => {}
    }
}

/// The answer text of a JSON answer or of one stream event, for counting completion tokens.
fn answer_text(v: &Value, out: &mut String) {
    if let Some(choices) = v.get("choices").and_then(Value::as_array) {
        for c in choices {
            for p in ["/message/content", "/delta/content", "/text"] {
                if let Some(s) = c.pointer(p).and_then(Value::as_str) {
                    out.push_str(s);
                }
            }
            for p in ["/message/tool_calls", "/delta/tool_calls"] {
                if let Some(t) = c.pointer(p) {
                    collect_text(t, out);
                }
            }
        }
    }
    // The Responses API's deltas: text, a function call's arguments, a refusal.
    if matches!(
        v.get("type").and_then(Value::as_str),
        Some(
            "response.output_text.delta"
                | "response.function_call_arguments.delta"
                | "response.refusal.delta"
                | "response.reasoning_text.delta"
                | "response.reasoning_summary_text.delta"
        )
    ) {
        if let Some(s) = v.get("delta").and_then(Value::as_str) {
            out.push_str(s);
        }
    }
    if let Some(output) = v.get("output").filter(|o| o.is_array()) {
        collect_text(output, out);
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Mode {
    Sse,
    Json,
    Other,
}

/// The response body with the ledger listening in.
pub struct Tap {
    inner: ResponseBody,
    record: Option<RequestRecord>,
    status: u16,
    mode: Mode,
    /// Drop the usage-only chunk: the gateway asked for it, the client did not.
    drop_usage_chunk: bool,
    usage: Option<Usage>,
    /// A stream's chunks, kept (copied) to read usage from at the end, or to count tokens.
    kept: Vec<Bytes>,
    /// A JSON answer, gathered in one buffer as its chunks pass (read for usage at the end).
    json: BytesMut,
    /// The JSON answer passed `JSON_KEPT_MAX`: `json` holds its tail only.
    json_cut: bool,
    /// A Responses stream said `response.failed`.
    response_failed: bool,
    /// A stream's bytes in `kept`, and the answer text of the chunks it no longer holds
    /// (`KEEP_STREAM_BYTES`).
    kept_bytes: usize,
    text: String,
    first_byte: Option<Instant>,
    /// The body reached its end (not cut by an error or a client going away).
    complete: bool,
    /// The last a stream sent its client was its `[DONE]`: complete for it, if it leaves
    /// before the upstream's body ends (the OpenAI SDKs close the response at `[DONE]`).
    done: bool,
    /// Store the answer in the cache once complete.
    cache: Option<(crate::cache::Leader, std::time::Duration)>,
    /// The upstream compressed its answer (asked not to): it is passed on unread.
    encoded: bool,
    /// An image stream's images and partial images sent, for pricing it when no event
    /// reports usage (or its client leaves first).
    images_sent: u64,
    partial_images_sent: u64,
    /// The rest of an answer being read after its client left: dropped, it finishes with
    /// what it has (never read again).
    reading_rest: bool,
}

impl Tap {
    pub fn new(
        inner: ResponseBody,
        record: RequestRecord,
        status: u16,
        content_type: &str,
        drop_usage_chunk: bool,
        encoded: bool,
    ) -> Tap {
        // Every answer but speech (binary audio) is read as JSON, whatever its content type
        // says: some servers send JSON as `text/plain`, and a transcription's `text` answer
        // simply holds no usage.
        let mode = if content_type.starts_with("text/event-stream") {
            Mode::Sse
        } else if encoded || (record.op == Operation::AudioSpeech && !content_type.contains("json"))
        {
            Mode::Other
        } else {
            Mode::Json
        };
        Tap {
            inner,
            record: Some(record),
            status,
            mode,
            drop_usage_chunk,
            usage: None,
            kept: Vec::new(),
            json: BytesMut::new(),
            json_cut: false,
            response_failed: false,
            kept_bytes: 0,
            text: String::new(),
            first_byte: None,
            complete: false,
            done: false,
            cache: None,
            encoded,
            images_sent: 0,
            partial_images_sent: 0,
            reading_rest: false,
        }
    }

    /// Stores the answer under `leader`'s key for `ttl` if it completes successfully.
    pub fn cache_into(mut self, leader: crate::cache::Leader, ttl: std::time::Duration) -> Tap {
        self.cache = Some((leader, ttl));
        self
    }

    /// Reads usage from the events of one chunk (chunks hold whole events) and returns the
    /// chunk without the usage-only event when that one is to be dropped.
    fn sse_chunk(&mut self, chunk: Bytes) -> Bytes {
        // A copy: `chunk` is a slice of the upstream connection's read buffer (8 KiB or
        // more), which a kept slice would pin for as long as the stream (or its cache entry) lives.
        self.kept.push(Bytes::copy_from_slice(&chunk));
        self.kept_bytes += chunk.len();
        if self.kept_bytes > KEEP_STREAM_BYTES && self.cache.is_none() {
            // Nothing to assemble for a cache: only an estimate could need these chunks,
            // and it needs only their text.
            stream_text(&self.kept, &mut self.text);
            self.kept.clear();
            self.kept_bytes = 0;
        }
        match self.record.as_ref().map(|r| r.op) {
            Some(op) if is_image_op(op) => self.count_images(&chunk),
            // The Responses API's terminal failure: the response did not run on.
            Some(Operation::Responses) if !self.response_failed => {
                self.response_failed = says_response_failed(&chunk);
            }
            _ => {}
        }
        if usage_all_null(&chunk) {
            return chunk;
        }
        let mut out: Option<BytesMut> = None;
        let mut start = 0;
        for end in event_ends(&chunk) {
            let event = &chunk[start..end];
            let mut dropped = false;
            // Read without a JSON tree: OpenAI puts `"usage":null` in every chunk of a stream
            // that asked for usage, so this runs for each of them.
            if let Some((u, usage_only)) = event_usage(event) {
                self.usage = Some(u);
                if self.drop_usage_chunk && usage_only {
                    dropped = true;
                }
            }
            match (&mut out, dropped) {
                (None, true) => {
                    let mut b = BytesMut::with_capacity(chunk.len());
                    b.extend_from_slice(&chunk[..start]);
                    out = Some(b);
                }
                (Some(b), false) => b.extend_from_slice(event),
                _ => {}
            }
            start = end;
        }
        match out {
            Some(mut b) => {
                b.extend_from_slice(&chunk[start..]);
                b.freeze()
            }
            None => chunk,
        }
    }

    /// Counts an image stream's events by their type: `image_generation.completed` or
    /// `image_edit.completed` (an image), `….partial_image` (a partial image).
    fn count_images(&mut self, chunk: &[u8]) {
        use std::sync::LazyLock;
        static PARTIAL: LazyLock<memchr::memmem::Finder<'static>> =
            LazyLock::new(|| memchr::memmem::Finder::new(b".partial_image\""));
        static DONE: LazyLock<memchr::memmem::Finder<'static>> =
            LazyLock::new(|| memchr::memmem::Finder::new(b".completed\""));
        self.partial_images_sent += PARTIAL.find_iter(chunk).count() as u64;
        self.images_sent += DONE.find_iter(chunk).count() as u64;
    }

    /// The answer's text, for counting its tokens: of the whole JSON answer when there is
    /// one (none when it is not JSON), else of the stream's events (and of those whose text
    /// alone was kept).
    fn answer_text(&mut self, whole: Option<&Bytes>) -> String {
        let mut text = std::mem::take(&mut self.text);
        match whole {
            Some(whole) => {
                if let Ok(v) = serde_json::from_slice::<Value>(whole) {
                    answer_text(&v, &mut text);
                }
            }
            None => stream_text(&self.kept, &mut text),
        }
        text
    }

    /// Keeps a JSON answer's chunk, whole up to `JSON_KEPT_MAX`, then its tail only.
    fn keep_json(&mut self, data: &[u8]) {
        if !self.json_cut && self.json.len() + data.len() <= JSON_KEPT_MAX {
            self.json.extend_from_slice(data);
            return;
        }
        if !self.json_cut || self.json.len() + data.len() > 2 * JSON_TAIL {
            // A new buffer of the last `JSON_TAIL` bytes; the old one goes.
            let from_old = JSON_TAIL.saturating_sub(data.len()).min(self.json.len());
            let mut tail = BytesMut::with_capacity(2 * JSON_TAIL);
            tail.extend_from_slice(&self.json[self.json.len() - from_old..]);
            tail.extend_from_slice(&data[data.len().saturating_sub(JSON_TAIL)..]);
            self.json = tail;
            self.json_cut = true;
        } else {
            self.json.extend_from_slice(data);
        }
    }

    fn finish(&mut self) {
        let Some(record) = self.record.take() else {
            return;
        };
        let success = (200..300).contains(&self.status);
        let mut usage = self.usage;
        // A JSON answer whole, read for usage and stored as the cache entry.
        let mut answer: Option<Bytes> = None;
        if success && self.mode == Mode::Json && self.json_cut {
            // Too large to keep whole: its usage read from its tail, else its prompt counted.
            usage = Usage::from_answer_tail(&self.json);
            if usage.is_none() && counts_tokens(record.op) {
                usage = Some(record.estimate(""));
            }
            self.json.clear();
        } else if success && self.mode == Mode::Json {
            let whole = self.json.split();
            // Grown past its first size, the buffer may have room to spare: what a cache
            // keeps (weighed by its length) is an exact copy instead.
            let whole = if self.cache.is_some() && whole.capacity() - whole.len() > whole.len() / 8
            {
                Bytes::copy_from_slice(&whole)
            } else {
                whole.freeze()
            };
            usage = Usage::from_answer_bytes(&whole);
            if usage.is_none() && !(self.complete || self.done) && counts_tokens(record.op) {
                // Cut before its end (its connection broken, the route's timeout, the
                // gateway's shutdown): a plain answer is made whole upstream before its first
                // byte, and billed whole there: what its reservation assumed, as an
                // abandoned request (`RequestRecord::finish_abandoned`).
                usage = Some(record.reserved_usage());
            }
            // A GPT Image answer without its tokens, on a deployment priced by them: the
            // images at their per-image price, the prompt counted, the row estimated.
            if let Some(u) = usage.as_mut().filter(|_| is_image_op(record.op)) {
                if u.prompt + u.completion == 0 && record.price.input_per_1m > 0.0 {
                    u.prompt = record.estimate("").prompt;
                    u.estimated = true;
                }
            }
            if usage.is_none() && record.op == Operation::Responses && runs_on(&whole) {
                // Run in the background (`background: true`): answered at once, `queued`.
                usage = Some(record.reserved_usage());
            }
            if usage.is_none() && counts_tokens(record.op) {
                usage = Some(if record.op == Operation::Embeddings {
                    // Vectors, no text: only the input is counted. Not parsed into a tree,
                    // which for a batch of float vectors is several times its size.
                    record.estimate("")
                } else {
                    // A success that is not JSON (an HTML page from a misconfigured
                    // upstream, say) has no text of the model's; its prompt was sent.
                    record.estimate(&self.answer_text(Some(&whole)))
                });
            }
            answer = Some(whole);
        }
        if success && usage.is_none() {
            // Whisper's `json`, `text`, `srt` and `vtt` answers say nothing of the audio, and
            // speech answers are audio.
            usage = record.measured_usage;
        }
        if success && usage.is_none() && self.encoded && counts_tokens(record.op) {
            // A compressed answer is not read: the prompt that was sent is counted, the
            // answer not, and the row says it is an estimate.
            usage = Some(record.estimate(""));
        }
        if success && self.mode == Mode::Sse && usage.is_none() && is_image_op(record.op) {
            // A GPT Image stream that reported no usage (or whose client left before its
            // completed event): the images sent at their per-image price, each partial image
            // as the 100 output tokens OpenAI bills it, the prompt counted; estimated.
            let mut u = record.estimate("");
            u.images = self.images_sent;
            u.completion = self.partial_images_sent.saturating_mul(100);
            usage = Some(u);
        }
        if success
            && self.mode == Mode::Sse
            && usage.is_none()
            && !self.response_failed
            && record.background
        {
            // A background response streamed, cut before its end (its client gone, the
            // route's timeout, the upstream's connection): it runs on upstream to its end,
            // billed there, and is charged as a plain background request is. (One whose
            // stream said `response.failed` is counted as any stream.)
            usage = Some(record.reserved_usage());
        }
        if success && self.mode == Mode::Sse && usage.is_none() && counts_tokens(record.op) {
            usage = Some(record.estimate(&self.answer_text(None)));
        }
        // More completion tokens than the cap sent upstream allows: not believed (a broken
        // or hostile upstream), the answer counted instead (which also counts what a server
        // ignoring the cap really made).
        if let (Some(u), Some(cap)) = (usage, record.sent_cap) {
            if success
                && !u.estimated
                && record.price.charges_output()
                && u.completion > cap.saturating_add(OVER_CAP_SLACK)
            {
                let text = self.answer_text(answer.as_ref());
                tracing::warn!(
                    reported = u.completion,
                    cap,
                    "the upstream reported more completion tokens than the cap it was sent: counted instead"
                );
                usage = Some(record.estimate(&text));
            }
        }
        let complete = self.complete || self.done;
        if let (Some((leader, ttl)), true, true) = (self.cache.take(), complete, success) {
            // Estimated usage is not the upstream's: such answers are not worth keeping.
            let upstream_usage = usage.filter(|u| !u.estimated);
            // Full, and the key new: no entry to make (for a stream, to assemble).
            let size = answer
                .as_ref()
                .map_or_else(|| self.kept.iter().map(Bytes::len).sum(), Bytes::len);
            let declined = upstream_usage.is_some() && leader.would_decline(size);
            let entry = match self.mode {
                _ if upstream_usage.is_none() || declined => None,
                Mode::Json => answer.filter(|a| !a.is_empty()).map(|a| (a, None)),
                // A stream as its events alone, its JSON assembled when a plain request is
                // served it (most streams stored never are).
                Mode::Sse => {
                    let events = crate::cache::split_events(&self.kept);
                    crate::cache::stream_storable(&events).then(|| (Bytes::new(), Some(events)))
                }
                Mode::Other => None,
            };
            match (entry, upstream_usage) {
                (Some((json, events)), Some(u)) => leader.store(crate::cache::Entry {
                    json,
                    events,
                    usage: u,
                    cost_usd: record.price.cost(&u),
                    ttl,
                }),
                _ if declined => leader.declined(),
                _ => leader.not_stored(),
            }
        }
        self.kept.clear();
        record.finish(self.status, usage, self.first_byte);
    }
}

/// The most a JSON answer's buffer is sized for up front from the upstream's Content-Length
/// (a larger answer grows it as it comes).
const JSON_RESERVE_MAX: usize = 16 << 20;

/// The most of a JSON answer kept whole (to read its usage, to count its text when it has
/// none, to store it in the cache). Past it, only its last `JSON_TAIL` bytes are kept, where
/// the upstreams write `usage` (a batch of 2,048 embeddings of 3,072 floats, ~80 MB, is
/// read so; an embeddings estimate counts only the input anyway): an upstream sending
/// gigabytes (broken, or hostile) costs the gateway this much, not its memory (1.9 GB of
/// RSS in 20 s before). Such an answer is not stored in the cache.
const JSON_KEPT_MAX: usize = 32 << 20;
const JSON_TAIL: usize = 64 << 10;

/// A stream's bytes kept at most when no cache entry is to be made of it: past them, the
/// chunks are read for their answer text (what a token estimate needs, if the upstream sends
/// no usage) and let go, so a long answer streamed to many clients at once is not held whole
/// in memory for each (a 2,000-token answer is ~0.5 MB of SSE; its text ~10 KB).
const KEEP_STREAM_BYTES: usize = 256 << 10;

/// Appends the answer text of whole-event chunks to `out`.
fn stream_text(chunks: &[Bytes], out: &mut String) {
    for chunk in chunks {
        let mut start = 0;
        for end in event_ends(chunk) {
            if let Some(v) = event_json(&chunk[start..end]) {
                answer_text(&v, out);
            }
            start = end;
        }
    }
}

fn is_image_op(op: Operation) -> bool {
    matches!(
        op,
        Operation::ImagesGenerations | Operation::ImagesEdits | Operation::ImagesVariations
    )
}

fn counts_tokens(op: Operation) -> bool {
    matches!(
        op,
        Operation::ChatCompletions
            | Operation::Completions
            | Operation::Responses
            | Operation::Embeddings
    )
}

/// Whether every `"usage"` in an event (or chunk) is `"usage": null`, OpenAI's content
/// chunks when usage was asked for, or there is none: no usage to read, nothing to parse.
/// Only a key can be followed by `:` outside a string, so this never hides a usage object.
fn usage_all_null(event: &[u8]) -> bool {
    USAGE_KEY.find_iter(event).all(|at| {
        let rest = event[at + b"\"usage\"".len()..].trim_ascii_start();
        rest.strip_prefix(b":")
            .is_some_and(|r| r.trim_ascii_start().starts_with(b"null"))
    })
}

/// The usage an event reports, and whether it carries nothing else (`Usage::from_event`):
/// looked for without a JSON tree first, since OpenAI puts `"usage":null` in every chunk of
/// a stream that asked for usage.
fn event_usage(event: &[u8]) -> Option<(Usage, bool)> {
    if usage_all_null(event) {
        return None;
    }
    event_data(event).and_then(|d| Usage::from_event(&d))
}

/// Whether an event is the usage chunk `stream_options.include_usage` adds (usage, no
/// choices): the one a client that did not ask for it is not sent, live or replayed.
pub(crate) fn is_usage_chunk(event: &[u8]) -> bool {
    event_usage(event).is_some_and(|(_, usage_only)| usage_only)
}

/// The JSON of an event's `data:` lines.
fn event_json(event: &[u8]) -> Option<Value> {
    serde_json::from_slice(&event_data(event)?).ok()
}

impl Body for Tap {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let this = &mut *self;
        loop {
            return match Pin::new(&mut this.inner).poll_frame(cx) {
                Poll::Ready(Some(Ok(frame))) => {
                    let frame = match frame.into_data() {
                        Ok(data) => {
                            if this.first_byte.is_none() {
                                this.first_byte = Some(Instant::now());
                            }
                            let data = match this.mode {
                                Mode::Sse => {
                                    let data = this.sse_chunk(data);
                                    if !data.is_empty() {
                                        this.done = ends_with_done(&data);
                                    }
                                    data
                                }
                                Mode::Json => {
                                    if this.json.is_empty() {
                                        // Sized once from the upstream's Content-Length
                                        // (within reason), not grown chunk by chunk.
                                        let rest = this.inner.size_hint().exact().unwrap_or(0);
                                        let whole = (data.len() as u64).saturating_add(rest);
                                        this.json
                                            .reserve(whole.min(JSON_RESERVE_MAX as u64) as usize);
                                    }
                                    this.keep_json(&data);
                                    data
                                }
                                Mode::Other => data,
                            };
                            // hyper may stop polling once it knows the end: mark it now.
                            if this.inner.is_end_stream() {
                                this.complete = true;
                            }
                            if data.is_empty() {
                                continue;
                            }
                            Frame::data(data)
                        }
                        Err(frame) => frame,
                    };
                    Poll::Ready(Some(Ok(frame)))
                }
                Poll::Ready(Some(Err(e))) => {
                    this.finish();
                    Poll::Ready(Some(Err(e)))
                }
                Poll::Ready(None) => {
                    this.complete = true;
                    this.finish();
                    Poll::Ready(None)
                }
                Poll::Pending => Poll::Pending,
            };
        }
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        // A dropped usage chunk would make an exact length wrong.
        if self.mode == Mode::Sse {
            SizeHint::default()
        } else {
            self.inner.size_hint()
        }
    }
}

/// Plain answers whose rest is being read after their client left (`Drop for Tap`).
static READING: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);

/// One of `READING`, for as long as it lives.
struct Reading;

impl Reading {
    fn start() -> Reading {
        READING.fetch_add(1, std::sync::atomic::Ordering::AcqRel);
        Reading
    }
}

impl Drop for Reading {
    fn drop(&mut self) {
        READING.fetch_sub(1, std::sync::atomic::Ordering::AcqRel);
    }
}

/// Tells the answers still being read to finish with what they have (each looks every
/// 100 ms).
static STOP_READING: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

/// At shutdown: waits up to `within` for the answers being read after their clients left,
/// then has those still read finish with what they have, so that every row is written with
/// the rest.
pub async fn answers_read(within: std::time::Duration) {
    let reading = || READING.load(std::sync::atomic::Ordering::Acquire) > 0;
    let deadline = tokio::time::Instant::now() + within;
    while reading() && tokio::time::Instant::now() < deadline {
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
    STOP_READING.store(true, std::sync::atomic::Ordering::Release);
    let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(1);
    while reading() && tokio::time::Instant::now() < deadline {
        tokio::time::sleep(std::time::Duration::from_millis(10)).await;
    }
}

impl Drop for Tap {
    fn drop(&mut self) {
        // The client went away, or hyper dropped a body whose end it knew. A plain answer
        // left before its end was made whole upstream before its first byte was sent, and
        // is billed whole: the rest is read in the background for its usage (within the
        // route's timeout, which bounds the upstream's body). Else the request is over, and
        // what it used so far is what it costs.
        let unread = self.record.is_some()
            && !self.reading_rest
            && self.mode == Mode::Json
            && !self.complete
            && (200..300).contains(&self.status);
        if unread {
            if let Ok(runtime) = tokio::runtime::Handle::try_current() {
                let mut rest = Tap {
                    inner: std::mem::replace(
                        &mut self.inner,
                        crate::server::body::full(Bytes::new()),
                    ),
                    record: self.record.take(),
                    status: self.status,
                    mode: Mode::Json,
                    drop_usage_chunk: false,
                    usage: self.usage,
                    kept: Vec::new(),
                    json: std::mem::take(&mut self.json),
                    json_cut: self.json_cut,
                    response_failed: false,
                    kept_bytes: 0,
                    text: String::new(),
                    first_byte: self.first_byte,
                    complete: false,
                    done: false,
                    cache: self.cache.take(),
                    encoded: false,
                    images_sent: self.images_sent,
                    partial_images_sent: self.partial_images_sent,
                    reading_rest: true,
                };
                let reading = Reading::start();
                runtime.spawn(async move {
                    use http_body_util::BodyExt;
                    let _reading = reading;
                    loop {
                        // At shutdown, past its wait: what was read is what it costs.
                        if STOP_READING.load(std::sync::atomic::Ordering::Acquire) {
                            return rest.finish();
                        }
                        let tick = std::time::Duration::from_millis(100);
                        let Ok(frame) = tokio::time::timeout(tick, rest.inner.frame()).await else {
                            continue;
                        };
                        match frame.map(|f| f.map(|f| f.into_data())) {
                            Some(Ok(Ok(data))) => rest.keep_json(&data),
                            Some(Ok(Err(_trailers))) => {}
                            Some(Err(_)) => return rest.finish(),
                            None => break,
                        }
                    }
                    rest.complete = true;
                    rest.finish();
                });
                return;
            }
        }
        self.finish();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_failed_response_is_told_by_its_event_not_by_the_models_text() {
        let failed =
            serde_json::json!({"type": "response.failed", "response": {"status": "failed"}});
        assert!(says_response_failed(
            format!("event: response.failed\ndata: {failed}\n\n").as_bytes()
        ));
        assert!(says_response_failed(
            format!("data: {failed}\n\n").as_bytes()
        ));
        // The model writing the words, quoted or as a whole delta, or an SSE line.
        for text in [
            "response.failed",
            "\"type\":\"response.failed\"",
            "event: response.failed",
        ] {
            let delta = serde_json::json!({"type": "response.output_text.delta", "delta": text});
            let chunk = format!("event: response.output_text.delta\ndata: {delta}\n\n");
            assert!(!says_response_failed(chunk.as_bytes()), "{chunk}");
        }
        // Spelled another way: no space after `event:`, CRLF, spaced JSON.
        assert!(says_response_failed(
            b"event:response.failed\r\ndata: {\"type\": \"response.failed\"}\r\n\r\n"
        ));
        assert!(says_response_failed(
            b"data: {\"sequence_number\": 3, \"type\" : \"response.failed\"}\n\n"
        ));
        // Metadata or instructions echoed in a response object.
        let created = serde_json::json!({"type": "response.created", "response": {
            "metadata": {"type": "response.failed"}, "instructions": "response.failed"}});
        let chunk = format!("event: response.created\ndata: {created}\n\n");
        assert!(!says_response_failed(chunk.as_bytes()), "{chunk}");
    }

    #[test]
    fn events_and_their_json() {
        let chunk = b"data: {\"a\":1}\n\n: ping\n\ndata: [DONE]\n\n";
        assert_eq!(event_json(&chunk[..15]).unwrap()["a"], 1);
        assert!(event_json(&chunk[15..23]).is_none());
        assert!(event_json(&chunk[23..]).is_none());
        // Several `data:` lines are one JSON text, joined by newlines.
        let split = b"event: x\r\ndata: {\"a\":\r\ndata: [2]}\r\n\r\n";
        assert_eq!(event_json(split).unwrap()["a"][0], 2);
        // `"usage":null` alone needs no parse; a usage object or a nested one does.
        assert!(usage_all_null(br#"data: {"choices":[],"usage" : null}"#));
        assert!(!usage_all_null(
            br#"data: {"usage":null,"response":{"usage":{"input_tokens":1}}}"#
        ));
        assert!(!usage_all_null(br#"data: {"usage":{"prompt_tokens":1}}"#));
        assert!(!usage_all_null(br#"data: {"content":"say \"usage"}"#));
    }
}
