//! Client-facing endpoints: recognises the OpenAI shape (`/v1/...`) and the Azure shape
//! (`/openai/deployments/{route}/...`), checks the body just enough to route it, and produces
//! one `ApiCall`. It reads only the fields the gateway needs and never re-serialises a body.

pub mod audio;
pub mod body;
pub mod multipart;

use bytes::Bytes;
use http::{HeaderMap, HeaderName, HeaderValue};
use std::sync::LazyLock;

use crate::error::GatewayError;

/// `x-request-id`, the request's id both ways: from and to the client, and to the upstream.
pub const REQUEST_ID: HeaderName = HeaderName::from_static("x-request-id");

/// An operation of the OpenAI API that the gateway proxies.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Operation {
    ChatCompletions,
    Completions,
    Embeddings,
    ImagesGenerations,
    ImagesEdits,
    ImagesVariations,
    AudioTranscriptions,
    AudioTranslations,
    AudioSpeech,
    Moderations,
    Responses,
}

impl Operation {
    pub const ALL: [Operation; 11] = [
        Operation::ChatCompletions,
        Operation::Completions,
        Operation::Embeddings,
        Operation::ImagesGenerations,
        Operation::ImagesEdits,
        Operation::ImagesVariations,
        Operation::AudioTranscriptions,
        Operation::AudioTranslations,
        Operation::AudioSpeech,
        Operation::Moderations,
        Operation::Responses,
    ];

    /// The path below `/v1/` (and below `/openai/deployments/{d}/` for Azure).
    pub fn path(self) -> &'static str {
        match self {
            Operation::ChatCompletions => "chat/completions",
            Operation::Completions => "completions",
            Operation::Embeddings => "embeddings",
            Operation::ImagesGenerations => "images/generations",
            Operation::ImagesEdits => "images/edits",
            Operation::ImagesVariations => "images/variations",
            Operation::AudioTranscriptions => "audio/transcriptions",
            Operation::AudioTranslations => "audio/translations",
            Operation::AudioSpeech => "audio/speech",
            Operation::Moderations => "moderations",
            Operation::Responses => "responses",
        }
    }

    pub fn from_path(p: &str) -> Option<Operation> {
        Operation::ALL.into_iter().find(|op| op.path() == p)
    }

    /// The request is `multipart/form-data` (audio and image uploads), not JSON.
    pub fn is_multipart(self) -> bool {
        matches!(
            self,
            Operation::AudioTranscriptions
                | Operation::AudioTranslations
                | Operation::ImagesEdits
                | Operation::ImagesVariations
        )
    }

    /// An audio upload, whose length the gateway reads for its price.
    pub fn is_audio_upload(self) -> bool {
        matches!(
            self,
            Operation::AudioTranscriptions | Operation::AudioTranslations
        )
    }

    /// Answers the exact-match cache may keep: chat, completions, embeddings.
    pub fn cacheable(self) -> bool {
        matches!(
            self,
            Operation::ChatCompletions | Operation::Completions | Operation::Embeddings
        )
    }

    /// Azure OpenAI serves this operation under `/openai/deployments/{deployment}/`;
    /// the others (responses) take the deployment in the body's `model`.
    pub fn azure_deployment_scoped(self) -> bool {
        !matches!(self, Operation::Responses)
    }

    /// The body fields this operation cannot do without, checked before routing so a bad
    /// request fails fast with a message that says where.
    fn required(self) -> &'static [(&'static str, Expect)] {
        match self {
            Operation::ChatCompletions => &[("messages", Expect::Array)],
            Operation::Completions => &[("prompt", Expect::Present)],
            Operation::Embeddings => &[("input", Expect::Present)],
            Operation::ImagesGenerations => &[("prompt", Expect::String)],
            Operation::AudioSpeech => &[("input", Expect::String)],
            Operation::Moderations => &[("input", Expect::Present)],
            Operation::Responses => &[],
            Operation::AudioTranscriptions
            | Operation::AudioTranslations
            | Operation::ImagesEdits
            | Operation::ImagesVariations => &[],
        }
    }
}

#[derive(Debug, Clone, Copy)]
enum Expect {
    Present,
    Array,
    String,
}

/// Which client shape the request came in.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Shape {
    OpenAi,
    /// `/openai/deployments/{route}/...`: the route comes from the path.
    Azure {
        route: String,
    },
}

/// What a request asks of the gateway, by method and path.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Target {
    Call(Operation, Shape),
    /// A call on what an upstream stores, by its path under `/v1` (`responses/{id}`,
    /// `responses/{id}/cancel`, `responses/{id}/input_items`, `chat/completions/{id}`,
    /// `chat/completions/{id}/messages`).
    Stored(String),
    ListModels,
    GetModel(String),
    Healthz,
    Readyz,
    Metrics,
    AdminRoutes,
    AdminReload,
    AdminSpend,
    NotFound,
    /// A known path asked with a method it does not take; the methods it takes.
    WrongMethod(&'static str),
}

/// Maps method and path to a target. Accepts `/v1/x`, `/x` (clients whose base URL has no
/// `/v1`), `/openai/v1/x` (Azure's v1 path) and `/openai/deployments/{route}/x`.
pub fn classify(method: &http::Method, path: &str) -> Target {
    // HEAD wherever GET works (RFC 9110 9.3.2): the same answer without its body.
    let get = method == http::Method::GET || method == http::Method::HEAD;
    let post = method == http::Method::POST;
    let either = |ok: bool, t: Target| {
        if ok {
            t
        } else if matches!(t, Target::Call(..) | Target::AdminReload) {
            Target::WrongMethod("POST")
        } else {
            Target::WrongMethod("GET, HEAD")
        }
    };
    match path {
        "/healthz" => return either(get, Target::Healthz),
        "/readyz" => return either(get, Target::Readyz),
        "/metrics" => return either(get, Target::Metrics),
        "/admin/routes" => return either(get, Target::AdminRoutes),
        "/admin/reload" => return either(post, Target::AdminReload),
        "/admin/spend" => return either(get, Target::AdminSpend),
        _ => {}
    }
    if let Some(rest) = path.strip_prefix("/openai/deployments/") {
        let Some((route, op)) = rest.split_once('/') else {
            return Target::NotFound;
        };
        let Some(op) = Operation::from_path(op.trim_end_matches('/')) else {
            return Target::NotFound;
        };
        let route = percent_decode(route);
        return either(post, Target::Call(op, Shape::Azure { route }));
    }
    let rest = path
        .strip_prefix("/openai/v1/")
        .or_else(|| path.strip_prefix("/openai/"))
        .or_else(|| path.strip_prefix("/v1/"))
        .or_else(|| path.strip_prefix('/'))
        .unwrap_or(path)
        .trim_end_matches('/');
    if rest == "models" {
        return either(get, Target::ListModels);
    }
    // Calls on what an upstream stores: a response (`resp_…`), a chat completion made with
    // `store: true` (`chatcmpl-…`).
    let stored = [("responses/", "resp_"), ("chat/completions/", "chatcmpl-")]
        .into_iter()
        .find_map(|(collection, prefix)| {
            let after = rest.strip_prefix(collection)?;
            Some((collection, prefix, after))
        });
    if let Some((collection, prefix, after)) = stored {
        let (id, action) = after.split_once('/').unwrap_or((after, ""));
        // An id of the collection's kind: its prefix, then letters, digits, `_` and `-`
        // only, so that it is one path segment upstream (and `responses/input_tokens`,
        // `responses/compact`, calls the gateway does not serve, are not taken for ids).
        if id.len() <= prefix.len()
            || !id.starts_with(prefix)
            || !id
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'-'))
        {
            return Target::NotFound;
        }
        let delete = method == http::Method::DELETE;
        let target = || Target::Stored(rest.to_string());
        return match (collection, action) {
            (_, "") if get || delete => target(),
            (_, "") => Target::WrongMethod("GET, HEAD, DELETE"),
            ("responses/", "input_items") | ("chat/completions/", "messages") if get => target(),
            ("responses/", "input_items") | ("chat/completions/", "messages") => {
                Target::WrongMethod("GET, HEAD")
            }
            ("responses/", "cancel") if post => target(),
            ("responses/", "cancel") => Target::WrongMethod("POST"),
            _ => Target::NotFound,
        };
    }
    if let Some(id) = rest.strip_prefix("models/") {
        return either(get, Target::GetModel(percent_decode(id)));
    }
    match Operation::from_path(rest) {
        Some(op) => either(post, Target::Call(op, Shape::OpenAi)),
        None => Target::NotFound,
    }
}

pub fn percent_decode(s: &str) -> String {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%' && i + 2 < bytes.len() {
            let hex = |b: u8| (b as char).to_digit(16);
            if let (Some(h), Some(l)) = (hex(bytes[i + 1]), hex(bytes[i + 2])) {
                out.push((h * 16 + l) as u8);
                i += 3;
                continue;
            }
        }
        out.push(bytes[i]);
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// The route a moderation naming no `model` goes to: OpenAI's default model for it.
pub const DEFAULT_MODERATION_MODEL: &str = "omni-moderation-latest";

/// One client request, checked and ready to send: what every later stage works from.
pub struct ApiRequest {
    pub op: Operation,
    /// The route named by `model` (OpenAI shape) or by the path (Azure shape).
    pub route: String,
    pub body: Bytes,
    pub payload: Payload,
    pub stream: bool,
    /// Prompt tokens estimated from the body's text (about four bytes a token), for quotas
    /// and context windows; the real count comes from the upstream's usage.
    pub estimated_prompt_tokens: u64,
    /// `max_tokens` / `max_completion_tokens` / `max_output_tokens`, when the client set one.
    pub max_tokens: Option<u64>,
    /// An upper bound of the prompt's tokens (a token is at least one byte; an image counts
    /// as 1,600), for the worst case a budget reserves.
    pub prompt_bound: u64,
    /// `n`: answers asked for.
    pub choices: u64,
    /// The uploaded audio's length (transcriptions, translations). Set by the handler.
    pub audio: audio::AudioLength,
    /// The characters of `input` to be spoken (`audio/speech`), as the upstream bills them.
    pub speech_characters: u64,
    /// What an image request's price depends on (`images/generations`, `images/edits`).
    pub image: Option<crate::ledger::cost::ImageAsk>,
    /// The output cap the gateway sets upstream when the client set none and a budget
    /// applies, so the request cannot cost more than it reserved. Set by the handler.
    pub output_cap: Option<u64>,
    /// The endpoint's cap fields the body sets to `null`: the gateway's `output_cap` goes in
    /// the place of one of them, not beside it.
    pub null_caps: Vec<NullCap>,
    /// llama.cpp's own cap, `n_predict`, which its server reads before `max_tokens`: where
    /// its value lies, and the value (negative: no cap), when the body has one.
    pub n_predict: Option<(std::ops::Range<usize>, i64)>,
    /// What the handler puts in `n_predict`'s place when a budget applies and it asks more
    /// than the reservation's cap.
    pub n_predict_cap: Option<u64>,
    /// A Responses request asking to run in the background (`"background": true`).
    pub background: bool,
    /// The body's `user`, for the ledger.
    pub user: Option<String>,
    /// The client asked for the usage chunk of its stream (`stream_options.include_usage`).
    pub client_wants_usage: bool,
    /// The client's headers that may travel upstream (no credentials, no hop-by-hop).
    pub upstream_headers: HeaderMap,
    pub request_id: HeaderValue,
}

/// A cap field of the client's set to `null` (see `ApiRequest::null_caps`).
#[derive(Debug, Clone)]
pub struct NullCap {
    pub field: &'static str,
    /// The whole `"field": null` member, when its name is written plainly.
    pub member: Option<std::ops::Range<usize>>,
    pub value: std::ops::Range<usize>,
}

pub enum Payload {
    Json {
        slot: body::ModelSlot,
        model: Option<String>,
        usage: body::UsageAsk,
    },
    Multipart {
        boundary: String,
        model: Option<String>,
        /// The form's parts, read once (`multipart::form`) for every later use.
        parts: Vec<multipart::Part>,
    },
}

/// The most tokens an image uploaded to `images/edits` is billed as: GPT Image bills an
/// input image by its tiles (a few hundred tokens), and a few thousand more with
/// `input_fidelity: high`; the bound keeps a budget's reservation above either.
pub const IMAGE_INPUT_TOKENS: u64 = 10_000;

/// Client headers that never go upstream: credentials, and what scopes them (the client's
/// OpenAI organization and project, which the SDK sends from `OPENAI_ORG_ID` and
/// `OPENAI_PROJECT_ID`: meaningless for the gateway's own upstream key, which OpenAI then
/// refuses with `401 mismatched_organization`), hop-by-hop headers, lengths and encodings
/// the gateway sets itself, and the gateway's own.
fn forwardable(name: &HeaderName) -> bool {
    !matches!(
        name.as_str(),
        "host"
            | "authorization"
            | "api-key"
            | "openai-organization"
            | "openai-project"
            | "cookie"
            | "content-length"
            | "transfer-encoding"
            | "connection"
            | "keep-alive"
            | "proxy-authorization"
            | "proxy-connection"
            | "te"
            | "trailer"
            | "upgrade"
            | "http2-settings"
            | "accept-encoding"
            | "x-request-id"
    ) && !name.as_str().starts_with("x-switchyard-")
}

impl ApiRequest {
    pub fn parse(
        op: Operation,
        shape: Shape,
        headers: &HeaderMap,
        body: Bytes,
        request_id: HeaderValue,
    ) -> Result<ApiRequest, GatewayError> {
        let mut max_tokens = None;
        let mut null_caps = Vec::new();
        let mut n_predict = None;
        let mut background = false;
        let mut choices = 1;
        let mut user = None;
        let mut client_wants_usage = false;
        let mut speech_characters = 0;
        let mut image = None;
        // A form's (estimated prompt tokens, prompt bound): an image edit's.
        let mut form_prompt = (0, 0);
        let (payload, stream) = if op.is_multipart() {
            let ct = headers
                .get(http::header::CONTENT_TYPE)
                .and_then(|v| v.to_str().ok());
            let boundary = multipart::boundary(ct)?;
            // The form's parts, read once; a text field's value read once too: as in a JSON
            // body, a field twice would be read as one and served as another.
            let parts = multipart::form(&body, &boundary)?;
            let only = |name: &str| {
                let mut values = parts.iter().filter(|p| p.is(name));
                let first = values.next();
                if values.next().is_some() {
                    return Err(GatewayError::invalid_request(format!(
                        "the form has the field `{name}` more than once"
                    ))
                    .with_param(name));
                }
                Ok(first.map(|p| multipart::text(&body, p.value.clone())))
            };
            let model = only("model")?;
            let stream = only("stream")?.as_deref() == Some("true");
            if matches!(op, Operation::ImagesEdits | Operation::ImagesVariations) {
                let uint = |name: &str| -> Result<Option<u64>, GatewayError> {
                    only(name)?
                        .map(|v| {
                            v.parse::<u64>().map_err(|_| {
                                GatewayError::invalid_request(format!(
                                    "`{name}` must be a non-negative integer"
                                ))
                                .with_param(name)
                            })
                        })
                        .transpose()
                };
                // A variation has no prompt; an edit needs one.
                let prompt = match (only("prompt")?, op) {
                    (Some(p), _) => p,
                    (None, Operation::ImagesVariations) => String::new(),
                    (None, _) => {
                        return Err(GatewayError::invalid_request(
                            "`prompt` is required for /v1/images/edits",
                        )
                        .with_param("prompt"))
                    }
                };
                let images = parts
                    .iter()
                    .filter(|p| p.is("image") || p.is("image[]"))
                    .count() as u64;
                if images == 0 {
                    return Err(GatewayError::invalid_request(format!(
                        "an image (the file part `image`) is required for /v1/{}",
                        op.path()
                    ))
                    .with_param("image"));
                }
                let masks = parts.iter().filter(|p| p.is("mask")).count() as u64;
                choices = uint("n")?.unwrap_or(1).max(1);
                user = only("user")?;
                image = Some(crate::ledger::cost::ImageAsk {
                    quality: only("quality")?,
                    size: only("size")?,
                    partial_images: if stream {
                        uint("partial_images")?.unwrap_or(0)
                    } else {
                        0
                    },
                });
                // An uploaded image is billed by its tokens (`gpt-image-1`): at most
                // `IMAGE_INPUT_TOKENS` each (masks too), whatever its size and fidelity.
                let text = prompt.len() as u64;
                form_prompt = (
                    text.div_ceil(4),
                    text.saturating_add(
                        images
                            .saturating_add(masks)
                            .saturating_mul(IMAGE_INPUT_TOKENS),
                    ),
                );
            }
            (
                Payload::Multipart {
                    boundary,
                    model,
                    parts,
                },
                stream,
            )
        } else {
            let head = body::JsonHead::parse(&body)?;
            check_json_shape(op, &head)?;
            let model = head.model()?;
            let stream = head.stream()?;
            // The endpoint's own cap fields, the one that counts last: a field another
            // endpoint reads caps nothing here (the upstream ignores it), so it bounds no
            // reservation either. One set to `null` caps nothing: the gateway's cap, when it
            // sets one, takes its place.
            let cap_fields: &[&'static str] = match op {
                Operation::ChatCompletions => &["max_tokens", "max_completion_tokens"],
                Operation::Completions => &["max_tokens"],
                Operation::Responses => &["max_output_tokens"],
                _ => &[],
            };
            for &field in cap_fields {
                match head.uint(field)? {
                    Some(n) => max_tokens = Some(n),
                    None => {
                        if let Some((member, value)) = head.member(field) {
                            null_caps.push(NullCap {
                                field,
                                member,
                                value,
                            });
                        }
                    }
                }
            }
            background = op == Operation::Responses
                && head.field("background").is_some_and(|v| v.get() == "true");
            if matches!(op, Operation::ChatCompletions | Operation::Completions) {
                // A number in any JSON form (`5000`, `-1`, `5e3`) that fits in an i64.
                n_predict = head.member("n_predict").and_then(|(_, value)| {
                    serde_json::from_slice::<f64>(&body[value.clone()])
                        .ok()
                        .map(|n| (value, n.clamp(i64::MIN as f64, i64::MAX as f64) as i64))
                });
            }
            choices = head.uint("n")?.unwrap_or(1).max(1);
            if op == Operation::Completions {
                // `best_of` answers are made (and billed) server-side, `n` of them returned,
                // for each prompt of a batch.
                choices = choices
                    .max(head.uint("best_of")?.unwrap_or(1))
                    .saturating_mul(head.field("prompt").map_or(1, prompts));
            }
            user = head
                .field("user")
                .and_then(|u| serde_json::from_str::<String>(u.get()).ok());
            if op == Operation::AudioSpeech {
                // Borrowed unless the text holds escapes. A code point is a character, as
                // OpenAI counts them.
                speech_characters = head
                    .field("input")
                    .and_then(|i| serde_json::from_str::<std::borrow::Cow<'_, str>>(i.get()).ok())
                    .map_or(0, |i| i.chars().count() as u64);
            }
            if op == Operation::ImagesGenerations {
                // A value that is not a string is not one the table lists: priced as the most.
                let text = |f: &str| {
                    head.field(f).and_then(|v| {
                        (v.get() != "null").then(|| {
                            serde_json::from_str::<String>(v.get())
                                .unwrap_or_else(|_| v.get().to_string())
                        })
                    })
                };
                image = Some(crate::ledger::cost::ImageAsk {
                    quality: text("quality"),
                    size: text("size"),
                    partial_images: if stream {
                        head.uint("partial_images")?.unwrap_or(0)
                    } else {
                        0
                    },
                });
            }
            let usage =
                if stream && matches!(op, Operation::ChatCompletions | Operation::Completions) {
                    let (asked, ask) = head.usage_ask()?;
                    client_wants_usage = asked;
                    ask
                } else {
                    body::UsageAsk::NotNeeded
                };
            (
                Payload::Json {
                    slot: head.model_slot(),
                    model,
                    usage,
                },
                stream,
            )
        };
        let client_model = match &payload {
            Payload::Json { model, .. } | Payload::Multipart { model, .. } => model.clone(),
        };
        let route = match shape {
            Shape::Azure { route } => route,
            // OpenAI's default for a moderation that names no model.
            Shape::OpenAi if op == Operation::Moderations && client_model.is_none() => {
                DEFAULT_MODERATION_MODEL.to_string()
            }
            Shape::OpenAi => client_model.ok_or_else(|| {
                GatewayError::invalid_request(format!("`model` is required for /v1/{}", op.path()))
                    .with_param("model")
            })?,
        };
        let mut upstream_headers = HeaderMap::with_capacity(headers.len() + 1);
        // The headers `Connection` names are hop-by-hop too (RFC 9110 7.6.1).
        let connection = headers.get_all(http::header::CONNECTION);
        let named_by_connection = |name: &HeaderName| {
            connection.iter().any(|v| {
                v.to_str().is_ok_and(|v| {
                    v.split(',')
                        .any(|t| t.trim().eq_ignore_ascii_case(name.as_str()))
                })
            })
        };
        for (name, value) in headers {
            if forwardable(name) && !named_by_connection(name) {
                upstream_headers.append(name.clone(), value.clone());
            }
        }
        upstream_headers.insert(REQUEST_ID, request_id.clone());
        let (estimated_prompt_tokens, prompt_bound) = match payload {
            Payload::Json { .. } => {
                let text = text_bytes(&body) as u64;
                let images = image_members(&body) as u64;
                (text.div_ceil(4), text + 1600 * images)
            }
            Payload::Multipart { .. } => form_prompt,
        };
        Ok(ApiRequest {
            op,
            route,
            body,
            payload,
            stream,
            estimated_prompt_tokens,
            max_tokens,
            prompt_bound,
            choices,
            audio: audio::AudioLength::default(),
            speech_characters,
            image,
            output_cap: None,
            null_caps,
            n_predict,
            n_predict_cap: None,
            background,
            user,
            client_wants_usage,
            upstream_headers,
            request_id,
        })
    }

    /// What the request itself says of its cost, for an answer that reports no usage: the
    /// uploaded audio's length as read from the file, the characters of a speech request
    /// (estimated: counted by the gateway).
    pub fn measured_usage(&self) -> Option<crate::ledger::cost::Usage> {
        use crate::ledger::cost::Usage;
        match (self.audio.seconds, self.op) {
            (Some(seconds), _) => Some(Usage {
                audio_seconds: seconds,
                estimated: true,
                ..Default::default()
            }),
            (None, Operation::AudioSpeech) => Some(Usage {
                characters: self.speech_characters,
                estimated: true,
                ..Default::default()
            }),
            _ => None,
        }
    }

    /// The value's range of a form's field `name` (its first part of that name; a form has
    /// each field the gateway reads once).
    pub fn form_field(&self, name: &str) -> Option<std::ops::Range<usize>> {
        match &self.payload {
            Payload::Multipart { parts, .. } => {
                parts.iter().find(|p| p.is(name)).map(|p| p.value.clone())
            }
            Payload::Json { .. } => None,
        }
    }

    /// The values' ranges of a form's parts named `name`, in order.
    pub fn form_parts<'a>(
        &'a self,
        name: &'a str,
    ) -> impl Iterator<Item = std::ops::Range<usize>> + 'a {
        let parts = match &self.payload {
            Payload::Multipart { parts, .. } => parts.as_slice(),
            Payload::Json { .. } => &[],
        };
        parts
            .iter()
            .filter(move |p| p.is(name))
            .map(|p| p.value.clone())
    }

    /// Whether the gateway adds `stream_options` to this request's body to ask for usage (the
    /// client sent none): a refusal of it is the gateway's doing, not the client's.
    pub fn adds_stream_options(&self) -> bool {
        matches!(
            &self.payload,
            Payload::Json {
                usage: body::UsageAsk::AddField { .. },
                ..
            }
        )
    }

    pub fn request_id_str(&self) -> &str {
        self.request_id.to_str().unwrap_or("")
    }

    /// The body as one upstream gets it: `model` set to `model` (when given and different)
    /// and, when `ask_usage`, `stream_options.include_usage` turned on. The same bytes when
    /// nothing must change.
    /// `served_model` (the upstream's name for it) picks the name of the output-cap field;
    /// the gateway's cap (`output_cap`, `n_predict_cap`) goes in only with `cap` (a
    /// deployment whose output is free takes the request as the client wrote it: a cap there
    /// protects no budget, and a small-context server refuses a large one).
    pub fn upstream_body(
        &self,
        model: Option<&str>,
        ask_usage: bool,
        served_model: &str,
        cap: bool,
    ) -> Bytes {
        match &self.payload {
            Payload::Json {
                slot,
                model: client_model,
                usage,
            } => {
                let mut edits = Vec::new();
                if let Some(m) = model.filter(|m| client_model.as_deref() != Some(*m)) {
                    edits.push(slot.edit(m));
                }
                if ask_usage {
                    edits.extend(usage.edit());
                }
                if let (true, Some(cap)) = (cap, self.output_cap) {
                    let mut digits = itoa::Buffer::new();
                    let digits = digits.format(cap);
                    let field = cap_field(self.op, served_model);
                    // A `null` of the field the upstream takes gets the cap as its value,
                    // else another `null` cap field becomes that field, else the field is
                    // added; any other `null` cap field goes (a reasoning model refuses
                    // `max_tokens` beside `max_completion_tokens`, even `null`).
                    let same = self.null_caps.iter().find(|c| c.field == field);
                    let mut others = self
                        .null_caps
                        .iter()
                        .filter(|c| c.field != field)
                        .filter_map(|c| c.member.clone());
                    let cap = match same {
                        Some(c) => (c.value.clone(), digits.as_bytes().to_vec()),
                        None => match others.next() {
                            Some(m) => (m, format!("\"{field}\":{digits}").into_bytes()),
                            None => slot.add_field(field, digits),
                        },
                    };
                    edits.push(cap);
                    edits.extend(others.map(|m| (body::member_cut(&self.body, m), vec![])));
                }
                if let (true, Some((value, _)), Some(cap)) =
                    (cap, &self.n_predict, self.n_predict_cap)
                {
                    let mut digits = itoa::Buffer::new();
                    edits.push((value.clone(), digits.format(cap).as_bytes().to_vec()));
                }
                if edits.is_empty() {
                    self.body.clone()
                } else {
                    body::splice(&self.body, edits)
                }
            }
            Payload::Multipart {
                boundary,
                model: client_model,
                ..
            } => match model.filter(|m| client_model.as_deref() != Some(*m)) {
                Some(m) => multipart::with_field(
                    &self.body,
                    boundary,
                    self.form_field("model"),
                    "model",
                    m,
                ),
                None => self.body.clone(),
            },
        }
    }
}

/// The field that caps output: the Responses API's `max_output_tokens`; `max_tokens` for
/// completions and most chat models; `max_completion_tokens` for reasoning models, which
/// refuse `max_tokens`.
fn cap_field(op: Operation, model: &str) -> &'static str {
    let named = |p: &str| {
        model
            .as_bytes()
            .get(..p.len())
            .is_some_and(|m| m.eq_ignore_ascii_case(p.as_bytes()))
    };
    match op {
        Operation::Responses => "max_output_tokens",
        Operation::ChatCompletions if ["o1", "o3", "o4", "gpt-5"].into_iter().any(named) => {
            "max_completion_tokens"
        }
        _ => "max_tokens",
    }
}

/// Bytes of a JSON body that are text, leaving out the base64 of inline images and files,
/// which upstreams bill by what they hold (an image's tiles), not by their length. Only a
/// JSON string that *is* a data URL (`data:<media type>;base64,…`) and is the value of an
/// image's or a file's member (`inline_file_member`) is left out, and of it only its run of
/// base64 characters. Any other text counts whole, `data:` in it or not (a prompt that
/// merely started with `data:` was left out of the budget's bound and the `tpm` estimate).
fn text_bytes(body: &[u8]) -> usize {
    let mut total = body.len();
    let mut i = 0;
    while let Some(off) = memchr::memmem::find(&body[i..], b"\"data:") {
        let quote = i + off;
        i = quote + 6;
        // (A quote inside a string is escaped: no `:` comes right before it.)
        if !inline_file_member(&body[..quote]) {
            continue;
        }
        let Some(data) = data_url_payload(&body[i..]) else {
            continue;
        };
        let start = i + data;
        let len = body[start..]
            .iter()
            .take_while(|b| b.is_ascii_alphanumeric() || matches!(b, b'+' | b'/' | b'='))
            .count();
        total -= len;
        i = start + len;
    }
    total
}

/// How many images a JSON body holds: its members named `image_url` (a chat image part's, a
/// Responses `input_image` part's), wherever they are, not the `"type": "image_url"` value
/// beside one. A name can be written with escapes (`"image\u005furl"`): in a body holding
/// any, every member name is decoded.
fn image_members(body: &[u8]) -> usize {
    static KEY: LazyLock<memchr::memmem::Finder<'static>> =
        LazyLock::new(|| memchr::memmem::Finder::new(b"\"image_url\""));
    static ESCAPE: LazyLock<memchr::memmem::Finder<'static>> =
        LazyLock::new(|| memchr::memmem::Finder::new(b"\\u"));
    // A name, not a value: the first byte after it other than whitespace is `:`.
    let named = |end: usize| body[end..].iter().find(|b| !b.is_ascii_whitespace()) == Some(&b':');
    if ESCAPE.find(body).is_none() {
        return KEY
            .find_iter(body)
            .filter(|&at| named(at + KEY.needle().len()))
            .count();
    }
    // Every string, in one pass (no depth limit: any nesting, any escape), and of those
    // that are member names, the ones that decode to `image_url`.
    let mut count = 0;
    let mut at = 0;
    while let Some(open) = memchr::memchr(b'"', &body[at..]).map(|i| at + i + 1) {
        let mut close = open;
        loop {
            match memchr::memchr2(b'"', b'\\', &body[close.min(body.len())..]) {
                None => return count,
                Some(i) if body[close + i] == b'\\' => close += i + 2,
                Some(i) => {
                    close += i;
                    break;
                }
            }
        }
        if named(close + 1) && decodes_to(&body[open..close], b"image_url") {
            count += 1;
        }
        at = close + 1;
    }
    count
}

/// Whether the JSON string text `raw` (between its quotes) decodes to the ASCII `want`.
fn decodes_to(raw: &[u8], want: &[u8]) -> bool {
    let mut got = Vec::with_capacity(want.len());
    let mut i = 0;
    while i < raw.len() && got.len() <= want.len() {
        let b = raw[i];
        if b != b'\\' {
            got.push(b);
            i += 1;
            continue;
        }
        let c = match raw.get(i + 1) {
            Some(b'u') => {
                let code = raw
                    .get(i + 2..i + 6)
                    .and_then(|h| std::str::from_utf8(h).ok())
                    .and_then(|h| u16::from_str_radix(h, 16).ok());
                i += 6;
                match code {
                    Some(c) if c < 0x80 => c as u8,
                    _ => return false,
                }
            }
            Some(&e) => {
                i += 2;
                match e {
                    b'n' => b'\n',
                    b't' => b'\t',
                    b'r' => b'\r',
                    b'b' => 8,
                    b'f' => 12,
                    other => other,
                }
            }
            None => return false,
        };
        got.push(c);
    }
    got == want
}

/// Whether the JSON string starting after `before` is the value of a member whose data
/// URL upstreams bill by what it holds (an image's tiles, a file's pages), not by its
/// length: `url` (a chat `image_url`), `image_url` (a Responses `input_image`), `file_data`
/// (a file part). A data URL anywhere else is text, counted whole.
fn inline_file_member(before: &[u8]) -> bool {
    body::key_end(before).is_some_and(|end| {
        [&b"\"url\""[..], b"\"image_url\"", b"\"file_data\""]
            .iter()
            .any(|k| before[..end].ends_with(k))
    })
}

/// Where a data URL's base64 begins, after `data:` (`image/png;base64,` and the like: a
/// media type of letters, digits and `.+-` around one `/`, optional parameters, then
/// `;base64,`), if it is one.
fn data_url_payload(after_data: &[u8]) -> Option<usize> {
    const MARK: &[u8] = b";base64,";
    // Media types and their parameters are short: a long run is no data URL's head.
    let head = &after_data[..after_data.len().min(200)];
    let at = memchr::memmem::find(head, MARK)?;
    let media = &head[..at];
    let kind = media.split(|b| *b == b';').next()?;
    let token = |t: &[u8]| {
        !t.is_empty()
            && t.iter()
                .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'+' | b'-'))
    };
    let mut parts = kind.splitn(2, |b| *b == b'/');
    let ok = token(parts.next()?)
        && token(parts.next()?)
        && media
            .iter()
            .all(|b| b.is_ascii_graphic() && !matches!(b, b'"' | b'\\'));
    ok.then_some(at + MARK.len())
}

/// The body checked against the endpoint's shape, with what the gateway needs from it.
pub fn check_json_shape(op: Operation, head: &body::JsonHead<'_>) -> Result<(), GatewayError> {
    for (field, expect) in op.required() {
        let value = head.field(field);
        let ok = match (expect, value) {
            (_, None) => false,
            (Expect::Present, Some(v)) => v.get() != "null",
            (Expect::Array, Some(v)) => v.get().starts_with('['),
            (Expect::String, Some(v)) => v.get().starts_with('"'),
        };
        if !ok {
            let what = match expect {
                Expect::Present => "is required",
                Expect::Array => "must be an array",
                Expect::String => "must be a string",
            };
            return Err(GatewayError::invalid_request(format!(
                "`{field}` {what} for /v1/{}",
                op.path()
            ))
            .with_param(*field));
        }
    }
    Ok(())
}

/// How many prompts a completions request's `prompt` holds: a batch (an array of strings, or
/// of token arrays) is answered prompt by prompt; a string, or one array of tokens, is one.
fn prompts(prompt: &serde_json::value::RawValue) -> u64 {
    if !prompt.get().starts_with('[') {
        return 1;
    }
    match serde_json::from_str::<Vec<&serde_json::value::RawValue>>(prompt.get()) {
        Ok(items)
            if items
                .first()
                .is_some_and(|i| i.get().starts_with(['"', '['])) =>
        {
            items.len() as u64
        }
        _ => 1,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn image_members_are_found_however_written_and_nested() {
        let part =
            |key: &str| format!(r#"{{"type":"image_url",{key}{{"url":"https://x/a.png"}}}}"#);
        let body = |key: &str, extra: &str| {
            format!(
                r#"{{"messages":[{{"content":[{},{}]}}]{extra}}}"#,
                part(key),
                part(key)
            )
        };
        for key in [
            r#""image_url":"#,
            "\"image_url\"\t :",
            r#""image\u005furl":"#,
            r#""\u0069mage_url" :"#,
        ] {
            assert_eq!(image_members(body(key, "").as_bytes()), 2, "{key}");
            // Beside what a JSON parser refuses: nesting past its depth, a lone surrogate.
            let deep = format!(r#","x":{}1{}"#, "[".repeat(300), "]".repeat(300));
            assert_eq!(image_members(body(key, &deep).as_bytes()), 2, "{key} deep");
            let lone = r#","user":"\ud800""#;
            assert_eq!(image_members(body(key, lone).as_bytes()), 2, "{key} lone");
        }
        // Values are not names; a quoted name inside a string is text.
        let text = r#"{"type":"image_url","content":"say \"image_url\": x","n":"\u0041"}"#;
        assert_eq!(image_members(text.as_bytes()), 0);
        assert_eq!(image_members(br#"{"image\u00ff_url":1}"#), 0);
    }
    use http::Method;

    #[test]
    fn operations_are_indexed_in_order() {
        // `route::Deployment::targets` is indexed by `Operation as usize`.
        for (i, op) in Operation::ALL.iter().enumerate() {
            assert_eq!(*op as usize, i, "{op:?}");
        }
    }

    #[test]
    fn reasoning_models_get_max_completion_tokens_whatever_their_case() {
        let chat = Operation::ChatCompletions;
        for m in ["o1-mini", "O3", "o4-mini", "GPT-5-nano", "gpt-5"] {
            assert_eq!(cap_field(chat, m), "max_completion_tokens", "{m}");
        }
        for m in ["gpt-4o", "o", "", "llama-o1", "gpt-4"] {
            assert_eq!(cap_field(chat, m), "max_tokens", "{m}");
        }
        assert_eq!(cap_field(Operation::Completions, "o1"), "max_tokens");
        assert_eq!(
            cap_field(Operation::Responses, "gpt-4o"),
            "max_output_tokens"
        );
    }

    #[test]
    fn inline_data_is_not_text() {
        let body = br#"{"messages":[{"content":[{"type":"image_url","image_url":{"url":"data:image/png;base64,AAAAAAAAAAAAAAAA"}}]}]}"#;
        assert_eq!(text_bytes(body), body.len() - "AAAAAAAAAAAAAAAA".len());
        assert_eq!(text_bytes(b"{}"), 2);
        // Text that merely starts with, or holds, `data:` counts whole.
        for text in [
            r#"{"messages":[{"content":"data: hello world hello world"}]}"#,
            r#"{"messages":[{"content":"He wrote \"data: hello world\" and stopped"}]}"#,
            r#"{"messages":[{"content":"data:text/plain;base64, hello world hello world"}]}"#,
            r#"{"messages":[{"content":"data:image/png;base64,AAAA and then a long text"}]}"#,
        ] {
            let left_out = text.len() - text_bytes(text.as_bytes());
            assert!(
                left_out <= "AAAA".len(),
                "{text}: {left_out} bytes left out"
            );
        }
        // A file part and a Responses image, as the SDKs send them; a data URL that is a
        // message's text, or any other member's value, counts whole.
        let body = br#"{"input":[{"type":"input_file","file_data":"data:application/pdf;base64,JVBERi0xLjQK"},{"type":"input_image","image_url" : "data:image/png;base64,UklGRg=="},{"x":"data:audio/wav;codecs=1;base64,UklGRg=="}],"messages":[{"content":"data:text/plain;base64,QUJDRA=="}]}"#;
        assert_eq!(
            text_bytes(body),
            body.len() - "JVBERi0xLjQK".len() - "UklGRg==".len()
        );
    }

    #[test]
    fn paths() {
        assert_eq!(
            classify(&Method::POST, "/v1/chat/completions"),
            Target::Call(Operation::ChatCompletions, Shape::OpenAi)
        );
        assert_eq!(
            classify(&Method::POST, "/chat/completions"),
            Target::Call(Operation::ChatCompletions, Shape::OpenAi)
        );
        assert_eq!(
            classify(
                &Method::POST,
                "/openai/deployments/gpt-4o/audio/transcriptions"
            ),
            Target::Call(
                Operation::AudioTranscriptions,
                Shape::Azure {
                    route: "gpt-4o".into()
                }
            )
        );
        assert_eq!(classify(&Method::GET, "/v1/models"), Target::ListModels);
        assert_eq!(classify(&Method::HEAD, "/v1/models"), Target::ListModels);
        assert_eq!(classify(&Method::HEAD, "/healthz"), Target::Healthz);
        assert_eq!(
            classify(&Method::HEAD, "/v1/chat/completions"),
            Target::WrongMethod("POST")
        );
        assert_eq!(classify(&Method::GET, "/openai/models"), Target::ListModels);
        assert_eq!(
            classify(&Method::GET, "/v1/models/a%2Fb"),
            Target::GetModel("a/b".into())
        );
        assert_eq!(
            classify(&Method::GET, "/v1/chat/completions"),
            Target::WrongMethod("POST")
        );
        assert_eq!(
            classify(&Method::POST, "/healthz"),
            Target::WrongMethod("GET, HEAD")
        );
        assert_eq!(classify(&Method::POST, "/v1/files"), Target::NotFound);
    }
}
