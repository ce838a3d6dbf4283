//! Usage as the upstreams report it, prices, and cost. Usage is read from an answer's JSON
//! (chat, completions, embeddings, responses, images, audio) or from stream events; where an
//! upstream reports none, tokens are counted with a real tokenizer and marked estimated.

use std::collections::{BTreeMap, HashMap};
use std::sync::OnceLock;

use serde::de::{IgnoredAny, MapAccess, SeqAccess, Visitor};
use serde::Deserialize;
use serde_json::Value;

use crate::config::Pricing;

/// Tokens and units of one request.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct Usage {
    /// Prompt tokens as the upstream counts them (cached ones included).
    pub prompt: u64,
    /// Of `prompt`, those served from the upstream's prompt cache.
    pub cached: u64,
    /// Of `prompt`, audio tokens (`prompt_tokens_details.audio_tokens`).
    pub audio_prompt: u64,
    /// Of `prompt`, image tokens (`input_tokens_details.image_tokens` of a GPT Image edit).
    pub image_prompt: u64,
    pub completion: u64,
    pub reasoning: u64,
    /// Of `completion`, audio tokens (`completion_tokens_details.audio_tokens`).
    pub audio_completion: u64,
    pub images: u64,
    pub audio_seconds: f64,
    /// Characters of text turned into speech.
    pub characters: u64,
    /// Counted by the gateway, not reported by the upstream.
    pub estimated: bool,
}

impl Usage {
    /// Usage from a `usage` object of any OpenAI shape: chat/completions/embeddings
    /// (`prompt_tokens`...), the Responses API (`input_tokens`...), Whisper's
    /// `{"type":"duration","seconds"}`.
    /// Usage from one stream event's JSON (`usage`, or the Responses API's
    /// `response.usage`), read like `from_answer_bytes`, and whether the event carries
    /// nothing else (`choices` empty: the chunk that `stream_options.include_usage` adds).
    pub fn from_event(data: &[u8]) -> Option<(Usage, bool)> {
        #[derive(serde::Deserialize)]
        struct Event {
            usage: Option<UsageObject>,
            response: Option<ResponseHead>,
            choices: Option<Count>,
        }
        let e: Event = serde_json::from_slice(data).ok()?;
        let usage = Self::reported(e.usage, e.response)?;
        Some((usage, matches!(e.choices, Some(Count(0)))))
    }

    /// Usage from a whole answer's bytes, reading only the top-level members usage lives in
    /// (`usage`, `response`, and `data`/`created`/`object` for images, `duration` for audio):
    /// the rest of the answer (the text, an embedding's thousands of numbers) is stepped
    /// over by `top_members` without being parsed, and each member read is parsed as
    /// `from_answer_parsed` would parse it, so the result is the same. Where the scan cannot
    /// tell (an escaped or repeated key, a text that is not one object) the whole answer is
    /// parsed instead. One difference is kept on purpose: malformed JSON among what is
    /// stepped over (a value like `"id":tru`, a missing comma after a number, bad bytes in a
    /// key, a `data` array not counted) no longer costs the answer its usage; so does a
    /// `usage` nested exactly one level short of serde_json's depth limit of 128.
    pub fn from_answer_bytes(body: &[u8]) -> Option<Usage> {
        #[derive(Default)]
        struct Found<'a> {
            usage: Option<&'a [u8]>,
            response: Option<&'a [u8]>,
            data: Option<&'a [u8]>,
            created: Option<&'a [u8]>,
            object: Option<&'a [u8]>,
            duration: Option<&'a [u8]>,
        }
        let mut f = Found::default();
        let scanned = top_members(body, |key, value| {
            let slot = match key {
                b"usage" => &mut f.usage,
                b"response" => &mut f.response,
                b"data" => &mut f.data,
                b"created" => &mut f.created,
                b"object" => &mut f.object,
                b"duration" => &mut f.duration,
                _ => return true,
            };
            // A member twice: serde's struct refuses it; let it say so.
            slot.replace(value).is_none()
        });
        if scanned.is_none() {
            return Self::from_answer_parsed(body);
        }
        // Each as `Option<T>` of the whole-answer struct: `null` is absent, a wrong type
        // fails the answer.
        fn read<'a, T: Deserialize<'a>>(v: Option<&'a [u8]>) -> Result<Option<T>, ()> {
            match v {
                None => Ok(None),
                Some(v) => serde_json::from_slice::<Option<T>>(v).map_err(|_| ()),
            }
        }
        let usage: Option<UsageObject> = read(f.usage).ok()?;
        let response: Option<ResponseHead> = read(f.response).ok()?;
        let created: Option<IgnoredAny> = read(f.created).ok()?;
        let object: Option<IgnoredAny> = read(f.object).ok()?;
        let duration: Option<f64> = read(f.duration).ok()?;
        // `data` must be an array (or null) whatever the answer; its elements are counted
        // only where they are images.
        let data = match f.data {
            Some(v) if v != b"null" && !v.starts_with(b"[") => return None,
            Some(v) if created.is_some() && object.is_none() => read::<Count>(Some(v)).ok()?,
            _ => None,
        };
        Self::assemble(
            usage,
            response,
            data,
            created.is_some(),
            object.is_none(),
            duration,
        )
    }

    /// `from_answer_bytes` by parsing the whole answer (the fallback, and its reference in tests).
    fn from_answer_parsed(body: &[u8]) -> Option<Usage> {
        #[derive(serde::Deserialize)]
        struct Head {
            usage: Option<UsageObject>,
            response: Option<ResponseHead>,
            data: Option<Count>,
            created: Option<IgnoredAny>,
            object: Option<IgnoredAny>,
            duration: Option<f64>,
        }
        let h: Head = serde_json::from_slice(body).ok()?;
        Self::assemble(
            h.usage,
            h.response,
            h.data,
            h.created.is_some(),
            h.object.is_none(),
            h.duration,
        )
    }

    /// Usage from the last bytes of an answer too large to keep whole: the object after the
    /// last `"usage":` in them (where the upstreams write it, at the answer's end).
    pub fn from_answer_tail(tail: &[u8]) -> Option<Usage> {
        let at = memchr::memmem::rfind(tail, b"\"usage\"")?;
        let rest = tail[at + b"\"usage\"".len()..].trim_ascii_start();
        let rest = rest.strip_prefix(b":")?;
        let mut de = serde_json::Deserializer::from_slice(rest);
        let usage = <Option<UsageObject> as Deserialize>::deserialize(&mut de).ok()??;
        usage.usage()
    }

    /// The counts of `usage`, else of the Responses API's `response.usage`.
    fn reported(usage: Option<UsageObject>, response: Option<ResponseHead>) -> Option<Usage> {
        usage
            .and_then(|u| u.usage())
            .or_else(|| response.and_then(|r| r.usage).and_then(|u| u.usage()))
    }

    fn assemble(
        usage: Option<UsageObject>,
        response: Option<ResponseHead>,
        data: Option<Count>,
        created: bool,
        no_object: bool,
        duration: Option<f64>,
    ) -> Option<Usage> {
        let mut usage = Self::reported(usage, response);
        if let (Some(Count(n)), true, true) = (data, created, no_object) {
            usage.get_or_insert_with(Usage::default).images = n;
        }
        if let Some(d) = duration.filter(|d| believable_seconds(*d)) {
            usage.get_or_insert_with(Usage::default).audio_seconds = d;
        }
        usage
    }
}

/// Calls `each(key, raw value)` for every member of the JSON object `text`, stepping over
/// the values without parsing them: a string by `memchr` to its next quote or backslash, an
/// object or array by counting its brackets outside strings, anything else up to the next `,`,
/// `}`, `]` or space. `None` (and no more calls) when `text` is not one object, a key holds
/// an escape (it would need decoding to compare), or `each` returns false.
fn top_members<'a>(text: &'a [u8], mut each: impl FnMut(&'a [u8], &'a [u8]) -> bool) -> Option<()> {
    fn space(t: &[u8], mut i: usize) -> usize {
        while matches!(t.get(i), Some(b' ' | b'\n' | b'\r' | b'\t')) {
            i += 1;
        }
        i
    }
    // The next of three bytes from `i`: the next few bytes looked at one by one (what is
    // sought is usually near: the next key's quote), `memchr3` (whose set-up costs about as
    // much as a dozen bytes) beyond them.
    fn find3(t: &[u8], i: usize, a: u8, b: u8, c: u8) -> Option<usize> {
        let near = t.get(i..)?;
        let head = &near[..near.len().min(16)];
        match head.iter().position(|&x| x == a || x == b || x == c) {
            Some(at) => Some(i + at),
            None => memchr::memchr3(a, b, c, &near[head.len()..]).map(|at| i + head.len() + at),
        }
    }
    // From an opening quote to just past its closing one, the same way.
    fn string(t: &[u8], mut i: usize) -> Option<usize> {
        i += 1;
        let short = t.len().min(i + 16);
        while i < short {
            match t[i] {
                b'"' => return Some(i + 1),
                b'\\' => i += 2,
                _ => i += 1,
            }
        }
        loop {
            let at = i + memchr::memchr2(b'"', b'\\', t.get(i..)?)?;
            if t[at] == b'"' {
                return Some(at + 1);
            }
            i = at + 2;
        }
    }
    fn value(t: &[u8], start: usize) -> Option<usize> {
        match *t.get(start)? {
            b'"' => string(t, start),
            // Only this container's own brackets are counted (the other kind nests evenly
            // within), so `find3` jumps from one to the next.
            open @ (b'{' | b'[') => {
                let close = if open == b'{' { b'}' } else { b']' };
                let (mut i, mut depth) = (start + 1, 1usize);
                loop {
                    let at = find3(t, i, b'"', open, close)?;
                    match t[at] {
                        b'"' => i = string(t, at)?,
                        b if b == open => {
                            depth += 1;
                            i = at + 1;
                        }
                        _ => {
                            depth -= 1;
                            if depth == 0 {
                                return Some(at + 1);
                            }
                            i = at + 1;
                        }
                    }
                }
            }
            _ => {
                let mut i = start;
                while !matches!(
                    t.get(i),
                    None | Some(b',' | b'}' | b']' | b' ' | b'\n' | b'\r' | b'\t')
                ) {
                    i += 1;
                }
                (i > start).then_some(i)
            }
        }
    }
    let mut i = space(text, 0);
    if text.get(i) != Some(&b'{') {
        return None;
    }
    i = space(text, i + 1);
    if text.get(i) == Some(&b'}') {
        return (space(text, i + 1) == text.len()).then_some(());
    }
    loop {
        if text.get(i) != Some(&b'"') {
            return None;
        }
        let end = string(text, i)?;
        let key = &text[i + 1..end - 1];
        if key.contains(&b'\\') {
            return None;
        }
        i = space(text, end);
        if text.get(i) != Some(&b':') {
            return None;
        }
        i = space(text, i + 1);
        let value_end = value(text, i)?;
        if !each(key, &text[i..value_end]) {
            return None;
        }
        i = space(text, value_end);
        match text.get(i)? {
            b',' => i = space(text, i + 1),
            b'}' => return (space(text, i + 1) == text.len()).then_some(()),
            _ => return None,
        }
    }
}

/// The Responses API's answer (or event) object, as far as usage goes.
#[derive(serde::Deserialize)]
struct ResponseHead {
    usage: Option<UsageObject>,
}

/// The most one count of a `usage` object is believed to say: far above any model's context
/// window and output (a few million tokens at most). An upstream saying more, or a count
/// that is not a whole number of at least 0 (negative, fractional, a string), is not
/// believed: the answer is taken as reporting no usage, and the gateway counts it with the
/// tokenizer (the row marked estimated). Believed, 10^12 tokens cost a key its whole budget
/// at once, and 2^64-1 went into the ledger as -1 tokens.
pub const MAX_REPORTED_TOKENS: u64 = 100_000_000;

/// The longest audio believed, in seconds (a transcription's `seconds` or `duration`):
/// 1,000 hours; uploads are limited to 25 MB.
const MAX_REPORTED_SECONDS: f64 = 3_600_000.0;

fn believable_seconds(s: f64) -> bool {
    s.is_finite() && (0.0..=MAX_REPORTED_SECONDS).contains(&s)
}

/// A `usage` object as the upstreams write it. A token count present (even `null`) is what
/// tells the shapes apart; a count `null` is 0, and one not believable
/// (`MAX_REPORTED_TOKENS`) makes the whole object unread.
#[derive(serde::Deserialize, Default)]
#[serde(default)]
struct UsageObject {
    #[serde(rename = "type")]
    kind: Option<Field>,
    seconds: Option<Field>,
    #[serde(deserialize_with = "present")]
    prompt_tokens: Option<Field>,
    #[serde(deserialize_with = "present")]
    completion_tokens: Option<Field>,
    prompt_tokens_details: Option<Field>,
    completion_tokens_details: Option<Field>,
    #[serde(deserialize_with = "present")]
    input_tokens: Option<Field>,
    #[serde(deserialize_with = "present")]
    output_tokens: Option<Field>,
    /// `input_token_details` in a transcription's usage.
    #[serde(alias = "input_token_details")]
    input_tokens_details: Option<Field>,
    output_tokens_details: Option<Field>,
}

impl UsageObject {
    fn usage(self) -> Option<Usage> {
        let n = |f: Option<Field>| match f {
            None | Some(Field::Null) => Some(0),
            Some(Field::Count(n)) if n <= MAX_REPORTED_TOKENS => Some(n),
            _ => None,
        };
        let details = |f: Option<Field>| match f {
            Some(Field::Details {
                cached,
                reasoning,
                audio,
                image,
                believable,
            }) => believable.then_some((cached, reasoning, audio, image)),
            _ => Some((0, 0, 0, 0)),
        };
        if matches!(self.kind, Some(Field::Duration)) {
            let seconds = match self.seconds {
                Some(Field::Count(n)) => n as f64,
                Some(Field::Float(x)) => x,
                // Missing, or not a number (`"30"`): not believed.
                _ => f64::NAN,
            };
            return believable_seconds(seconds).then(|| Usage {
                audio_seconds: seconds,
                ..Default::default()
            });
        }
        // `Option<Field>` is `None` only for a missing field: `null` reads as `Field::Null`.
        let (prompt, completion, prompt_details, completion_details) =
            if self.prompt_tokens.is_some() || self.completion_tokens.is_some() {
                (
                    self.prompt_tokens,
                    self.completion_tokens,
                    self.prompt_tokens_details,
                    self.completion_tokens_details,
                )
            } else if self.input_tokens.is_some() || self.output_tokens.is_some() {
                (
                    self.input_tokens,
                    self.output_tokens,
                    self.input_tokens_details,
                    self.output_tokens_details,
                )
            } else {
                return None;
            };
        // A prompt count of `null` is not believed (every answer has a prompt).
        if matches!(prompt, Some(Field::Null)) {
            return None;
        }
        let (prompt, completion) = (n(prompt)?, n(completion)?);
        let (cached, _, audio_prompt, image_prompt) = details(prompt_details)?;
        let (_, reasoning, audio_completion, _) = details(completion_details)?;
        // Parts of the prompt (and of the completion) are no more than it.
        Some(Usage {
            prompt,
            cached: cached.min(prompt),
            audio_prompt: audio_prompt.min(prompt),
            image_prompt: image_prompt.min(prompt),
            completion,
            reasoning: reasoning.min(completion),
            audio_completion: audio_completion.min(completion),
            ..Default::default()
        })
    }
}

/// A field that is there, whatever it holds (`null` included); `None` only when missing.
fn present<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Option<Field>, D::Error> {
    Field::deserialize(d).map(Some)
}

/// One value inside `usage`, as much as the ledger needs of it: a count (a non-negative
/// integer, as `Value::as_u64` reads it), Whisper's `"duration"`, the counts of a
/// `*_tokens_details` object, or anything else (skipped).
enum Field {
    Count(u64),
    /// Any other number (only Whisper's `seconds` is read as one).
    Float(f64),
    Duration,
    Details {
        cached: u64,
        reasoning: u64,
        audio: u64,
        image: u64,
        /// No count of these is past `MAX_REPORTED_TOKENS`, negative or fractional.
        believable: bool,
    },
    Null,
    Other,
}

impl<'de> serde::Deserialize<'de> for Field {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        #[derive(serde::Deserialize)]
        #[serde(field_identifier, rename_all = "snake_case")]
        enum Key {
            CachedTokens,
            ReasoningTokens,
            AudioTokens,
            ImageTokens,
            #[serde(other)]
            Other,
        }
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = Field;
            fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str("a usage value")
            }
            fn visit_u64<E>(self, n: u64) -> Result<Field, E> {
                Ok(Field::Count(n))
            }
            fn visit_i64<E>(self, n: i64) -> Result<Field, E> {
                Ok(u64::try_from(n).map_or(Field::Float(n as f64), Field::Count))
            }
            fn visit_f64<E>(self, x: f64) -> Result<Field, E> {
                Ok(Field::Float(x))
            }
            fn visit_bool<E>(self, _: bool) -> Result<Field, E> {
                Ok(Field::Other)
            }
            fn visit_str<E>(self, s: &str) -> Result<Field, E> {
                Ok(if s == "duration" {
                    Field::Duration
                } else {
                    Field::Other
                })
            }
            fn visit_unit<E>(self) -> Result<Field, E> {
                Ok(Field::Null)
            }
            fn visit_none<E>(self) -> Result<Field, E> {
                Ok(Field::Null)
            }
            fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Field, A::Error> {
                let (mut cached, mut reasoning, mut audio, mut image) = (0, 0, 0, 0);
                let mut believable = true;
                while let Some(k) = map.next_key::<Key>()? {
                    let v = map.next_value::<Field>()?;
                    let n = match v {
                        Field::Count(n) if n <= MAX_REPORTED_TOKENS => n,
                        Field::Count(_) | Field::Float(_) if !matches!(k, Key::Other) => {
                            believable = false;
                            0
                        }
                        _ => 0,
                    };
                    match k {
                        Key::CachedTokens => cached = n,
                        Key::ReasoningTokens => reasoning = n,
                        Key::AudioTokens => audio = n,
                        Key::ImageTokens => image = n,
                        Key::Other => {}
                    }
                }
                Ok(Field::Details {
                    cached,
                    reasoning,
                    audio,
                    image,
                    believable,
                })
            }
            fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Field, A::Error> {
                while seq.next_element::<IgnoredAny>()?.is_some() {}
                Ok(Field::Other)
            }
        }
        d.deserialize_any(V)
    }
}

/// The length of a JSON array, counted without building its items.
struct Count(u64);

impl<'de> serde::Deserialize<'de> for Count {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> serde::de::Visitor<'de> for V {
            type Value = Count;
            fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str("an array")
            }
            fn visit_seq<A: serde::de::SeqAccess<'de>>(
                self,
                mut seq: A,
            ) -> Result<Count, A::Error> {
                let mut n = 0;
                while seq.next_element::<serde::de::IgnoredAny>()?.is_some() {
                    n += 1;
                }
                Ok(Count(n))
            }
        }
        d.deserialize_seq(V)
    }
}

/// What an audio request is billed by besides tokens, known before it goes upstream: the
/// length of an uploaded file (an upper bound when it could not be read), the characters to
/// speak.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct Media {
    pub audio_seconds: f64,
    pub characters: u64,
}

/// What an image request asks for that its price depends on (`images/generations`).
#[derive(Debug, Clone, Default, PartialEq)]
pub struct ImageAsk {
    /// `quality`, when the request sends one.
    pub quality: Option<String>,
    /// `size`, when the request sends one.
    pub size: Option<String>,
    /// `partial_images` of a streamed request: each is billed as 100 more output tokens.
    pub partial_images: u64,
}

/// Per-image prices by quality and size (`pricing.image_sizes`), resolved at config load.
#[derive(Debug, Clone, PartialEq)]
pub struct ImagePrices {
    /// (quality, size, USD per image).
    entries: Vec<(String, String, f64)>,
    max: f64,
}

impl ImagePrices {
    pub fn new(table: &BTreeMap<String, BTreeMap<String, f64>>) -> Option<ImagePrices> {
        let entries: Vec<(String, String, f64)> = table
            .iter()
            .flat_map(|(q, sizes)| sizes.iter().map(|(s, usd)| (q.clone(), s.clone(), *usd)))
            .collect();
        let max = entries.iter().map(|e| e.2).fold(f64::NAN, f64::max);
        (!entries.is_empty()).then_some(ImagePrices { entries, max })
    }

    /// The price of one image as the ledger counts it: the listed price of the request's
    /// quality and size, a quality not sent counting as `standard` and a size not sent as
    /// `1024x1024` (OpenAI's defaults for DALL·E); for what the table does not list (`auto`,
    /// a value of another model), what the reservation took (`bound`), so that a row never
    /// costs more than was reserved for it.
    pub fn unit(&self, ask: &ImageAsk, other: f64) -> f64 {
        let q = ask.quality.as_deref().unwrap_or("standard");
        let s = ask.size.as_deref().unwrap_or("1024x1024");
        self.entries
            .iter()
            .find(|e| e.0 == q && e.1 == s)
            .map_or_else(|| self.bound(ask, other), |e| e.2)
    }

    /// The most one image can cost: the highest price among the entries that match what the
    /// request sends (a quality or size not sent may be any the table lists; `auto` may be
    /// any); the highest of the table and `other` when it sends something the table does not
    /// list.
    pub fn bound(&self, ask: &ImageAsk, other: f64) -> f64 {
        let fits = |sent: &Option<String>, listed: &str| match sent.as_deref() {
            None | Some("auto") => true,
            Some(v) => v == listed,
        };
        self.entries
            .iter()
            .filter(|e| fits(&ask.quality, &e.0) && fits(&ask.size, &e.1))
            .map(|e| e.2)
            .reduce(f64::max)
            .unwrap_or(self.max.max(other))
    }
}

/// Prices of one deployment, resolved at config load.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct Price {
    pub input_per_1m: f64,
    pub cached_input_per_1m: f64,
    pub output_per_1m: f64,
    pub per_image: f64,
    pub per_audio_second: f64,
    pub per_1m_characters: f64,
    pub audio_input_per_1m: f64,
    pub audio_output_per_1m: f64,
    pub image_input_per_1m: f64,
}

impl Price {
    /// Whether output tokens cost anything here: where they do not, a cap on them protects
    /// no budget.
    pub fn charges_output(&self) -> bool {
        self.output_per_1m > 0.0 || self.audio_output_per_1m > 0.0
    }
}

impl From<&Pricing> for Price {
    fn from(p: &Pricing) -> Price {
        Price {
            input_per_1m: p.input_per_1m,
            cached_input_per_1m: p.cached_input_per_1m.unwrap_or(p.input_per_1m),
            output_per_1m: p.output_per_1m,
            // Without a flat price, what `image_sizes` does not list costs its highest.
            per_image: p
                .per_image
                .or_else(|| {
                    let rows = p.image_sizes.iter().flat_map(|t| t.values());
                    rows.flat_map(|r| r.values().copied()).reduce(f64::max)
                })
                .unwrap_or(0.0),
            per_audio_second: p.per_audio_second.unwrap_or(0.0),
            per_1m_characters: p.per_1m_characters.unwrap_or(0.0),
            audio_input_per_1m: p.audio_input_per_1m.unwrap_or(p.input_per_1m),
            audio_output_per_1m: p.audio_output_per_1m.unwrap_or(p.output_per_1m),
            image_input_per_1m: p.image_input_per_1m.unwrap_or(p.input_per_1m),
        }
    }
}

impl Price {
    /// Cost in USD. Prompt tokens the upstream served from its cache are billed at the
    /// cached price, audio ones at the audio input price, image ones at the image input
    /// price, the rest at the input price;
    /// audio completion tokens at the audio output price, the rest at the output price.
    pub fn cost(&self, u: &Usage) -> f64 {
        let cached = u.cached.min(u.prompt);
        let audio_prompt = u.audio_prompt.min(u.prompt - cached);
        let image_prompt = u.image_prompt.min(u.prompt - cached - audio_prompt);
        let text_prompt = u.prompt - cached - audio_prompt - image_prompt;
        let audio_completion = u.audio_completion.min(u.completion);
        // An image model that reports its tokens (`gpt-image-1`) is billed by them, not by the
        // image, when the deployment has token prices.
        let by_tokens = !u.estimated
            && u.prompt + u.completion > 0
            && (self.input_per_1m > 0.0 || self.output_per_1m > 0.0);
        let images = if by_tokens { 0 } else { u.images };
        (text_prompt as f64 * self.input_per_1m
            + cached as f64 * self.cached_input_per_1m
            + audio_prompt as f64 * self.audio_input_per_1m
            + image_prompt as f64 * self.image_input_per_1m
            + (u.completion - audio_completion) as f64 * self.output_per_1m
            + audio_completion as f64 * self.audio_output_per_1m
            + u.characters as f64 * self.per_1m_characters)
            / 1_000_000.0
            + images as f64 * self.per_image
            + u.audio_seconds * self.per_audio_second
    }

    /// The most a request can cost: every prompt token uncached, every allowed output token
    /// (at the audio price, if higher), all of its audio, every character it has spoken.
    pub fn worst_case(&self, prompt: u64, max_output: u64, media: &Media) -> f64 {
        // The prompt bound counts text and images, not inline audio (docs/cost.md, "Where the
        // guarantee stops"); the output cap counts audio tokens too.
        let input = self
            .input_per_1m
            .max(self.cached_input_per_1m)
            .max(self.image_input_per_1m);
        (prompt as f64 * input
            + max_output as f64 * self.output_per_1m.max(self.audio_output_per_1m)
            + media.characters as f64 * self.per_1m_characters)
            / 1_000_000.0
            + self.per_image
            + media.audio_seconds * self.per_audio_second
    }

    pub fn is_zero(&self) -> bool {
        *self == Price::default()
    }
}

fn table() -> &'static HashMap<String, Pricing> {
    static TABLE: OnceLock<HashMap<String, Pricing>> = OnceLock::new();
    TABLE.get_or_init(|| {
        let raw: HashMap<String, Value> =
            serde_json::from_str(include_str!("prices.json")).unwrap_or_default();
        raw.into_iter()
            .filter(|(k, _)| !k.starts_with('_'))
            .filter_map(|(k, v)| serde_json::from_value(v).ok().map(|p| (k, p)))
            .collect()
    })
}

/// The built-in price of a model: exact name, else the longest known name it starts with
/// (`gpt-4o-2024-08-06` → `gpt-4o`; `gpt-4o-mini-…` → `gpt-4o-mini`), unless what follows
/// names a speech or transcription model, which is billed by other units than the chat model
/// its name starts with (`gpt-4o-mini-tts` is not `gpt-4o-mini`).
pub fn builtin_price(model: &str) -> Option<Price> {
    builtin_pricing(model).map(Price::from)
}

/// The built-in table's entry for a model, found as `builtin_price` finds it.
pub fn builtin_pricing(model: &str) -> Option<&'static Pricing> {
    lookup(model, same_model)
}

/// The built-in table's entry for a deployment name (a deployment without `model:`): names
/// are the user's own (`gpt-4o-prod`, `o3-pro-east`), so the longest table name it starts
/// with, followed by `-`, `@` or `:`, prices it, unless the rest names a speech or
/// transcription model (billed by other units than the chat model it starts with).
pub fn builtin_pricing_by_name(deployment: &str) -> Option<&'static Pricing> {
    lookup(deployment, |rest| {
        rest.starts_with(['-', '@', ':']) && !rest.contains("-tts") && !rest.contains("-transcribe")
    })
}

/// `builtin_pricing_by_name` as a `Price`.
pub fn builtin_price_by_name(deployment: &str) -> Option<Price> {
    builtin_pricing_by_name(deployment).map(Price::from)
}

/// The exact name, else the longest table name it starts with whose rest `fits`.
fn lookup(name: &str, fits: impl Fn(&str) -> bool) -> Option<&'static Pricing> {
    let t = table();
    let m = name.to_ascii_lowercase();
    if let Some(p) = t.get(&m) {
        return Some(p);
    }
    t.iter()
        .filter(|(k, _)| {
            m.strip_prefix(k.as_str())
                .is_some_and(|rest| !rest.is_empty() && fits(rest))
        })
        .max_by_key(|(k, _)| k.len())
        .map(|(_, p)| p)
}

/// Whether what follows a table name names the same model at another version or tag (so at
/// its price): dated snapshots (`-2024-08-06`, `-0613`), `-preview`, `-latest`, or a tag
/// after `@` or `:`. Anything else names another model, often priced far apart (`o3-pro`
/// is 10x `o3`, `gpt-4.5-preview` 2.5x `gpt-4`, `gpt-4o-mini-tts` billed by other units),
/// which gets no built-in price rather than a wrong one.
fn same_model(mut rest: &str) -> bool {
    while !rest.is_empty() {
        if rest.starts_with(['@', ':']) {
            return true;
        }
        let Some(r) = rest.strip_prefix('-') else {
            return false;
        };
        let digits =
            |s: &str, n: usize| s.len() >= n && s.as_bytes()[..n].iter().all(u8::is_ascii_digit);
        let at_end = |s: &str, n: usize| s.len() == n || s[n..].starts_with(['-', '@', ':']);
        let taken = if digits(r, 4)
            && r.len() >= 10
            && r.as_bytes()[4] == b'-'
            && digits(&r[5..], 2)
            && r.as_bytes()[7] == b'-'
            && digits(&r[8..], 2)
            && at_end(r, 10)
        {
            10
        } else if digits(r, 4) && at_end(r, 4) {
            4
        } else if let Some(word) = ["preview", "latest"]
            .into_iter()
            .find(|w| r.starts_with(w) && at_end(r, w.len()))
        {
            word.len()
        } else {
            return false;
        };
        rest = &r[taken..];
    }
    true
}

/// Text counted whole; past it, the first this many bytes are counted and the count scaled
/// by length (an estimate either way), so that counting never holds the gateway's thread for
/// long, whatever a client or upstream sends.
const COUNT_WHOLE: usize = 64 * 1024;
/// The longest stretch counted as one without a word start (a space before a non-space):
/// the tokenizer's merging is quadratic in a piece's length (400 KB of one letter took a
/// minute), and its regex can overflow its backtracking stack on such runs.
const RUN_MAX: usize = 128;

/// Tokens of a text with the tokenizer of the model's family (o200k for the GPT-4o, 4.1 and
/// o-series, cl100k otherwise). The text is counted in segments cut before a word (as the
/// tokenizer itself splits it, so ordinary text counts the same) or, in a run without one,
/// every `RUN_MAX` bytes; beyond `COUNT_WHOLE` bytes by its start.
pub fn count_tokens(model: &str, text: &str) -> u64 {
    if text.is_empty() {
        return 0;
    }
    if text.len() > COUNT_WHOLE {
        let mut cut = COUNT_WHOLE;
        while !text.is_char_boundary(cut) {
            cut -= 1;
        }
        let head = count_tokens(model, &text[..cut]);
        return (head as f64 * text.len() as f64 / cut as f64).ceil() as u64;
    }
    let m = model.to_ascii_lowercase();
    let o200k = m.starts_with("gpt-4o")
        || m.starts_with("gpt-4.1")
        || m.starts_with("gpt-5")
        || m.starts_with("o1")
        || m.starts_with("o3")
        || m.starts_with("o4");
    let bpe = if o200k {
        tiktoken_rs::o200k_base_singleton()
    } else {
        tiktoken_rs::cl100k_base_singleton()
    };
    let count = |segment: &str| {
        // A tokenizer panic (it unwraps its regex's errors) costs the segment an estimate,
        // not the request its row.
        std::panic::catch_unwind(|| bpe.encode_with_special_tokens(segment).len() as u64)
            .unwrap_or_else(|_| segment.len().div_ceil(4) as u64)
    };
    let bytes = text.as_bytes();
    let (mut total, mut start, mut word) = (0, 0, 0);
    for i in 1..bytes.len() {
        if !text.is_char_boundary(i) {
            continue;
        }
        let word_start = bytes[i].is_ascii_whitespace() && !bytes[i - 1].is_ascii_whitespace();
        if word_start {
            word = i;
        }
        // A long segment ends before its last word; a run without one, here.
        if i - start >= 16 * RUN_MAX && word > start {
            total += count(&text[start..word]);
            start = word;
        } else if i - start.max(word) >= RUN_MAX {
            total += count(&text[start..i]);
            start = i;
        }
    }
    total + count(&text[start..])
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    /// The scan reads what parsing the whole answer reads, on every shape and on odd input.
    #[test]
    fn scanning_an_answer_reads_what_parsing_it_reads() {
        let answers: &[&str] = &[
            r#"{"id":"c","object":"chat.completion","created":1,"model":"m","choices":[{"index":0,"message":{"role":"assistant","content":"a \"usage\": {\"prompt_tokens\": 99} in text \\"},"finish_reason":"stop"}],"usage":{"prompt_tokens":12,"completion_tokens":7,"total_tokens":19}}"#,
            r#" { "usage" : { "prompt_tokens" : 3 , "completion_tokens" : 1 } , "choices" : [ ] } "#,
            r#"{"object":"list","data":[{"object":"embedding","embedding":[0.1,-2e-3,3]}],"usage":{"prompt_tokens":3,"total_tokens":3}}"#,
            r#"{"created":1,"data":[{"b64_json":"x"},{"url":"u"}],"usage":{"input_tokens":5,"output_tokens":9}}"#,
            r#"{"created":1,"data":[{"b64_json":"x"},{"url":"u"}]}"#,
            r#"{"created":null,"data":[{"b64_json":"x"}]}"#,
            r#"{"created":1,"object":"list","data":[1,2]}"#,
            r#"{"created":1,"data":null}"#,
            r#"{"created":1,"data":{"n":1}}"#,
            r#"{"text":"hi","duration":3.5}"#,
            r#"{"text":"hi","duration":"3.5"}"#,
            r#"{"text":"hi","usage":{"type":"duration","seconds":12.5}}"#,
            r#"{"object":"response","usage":{"input_tokens":7,"output_tokens":3,"input_tokens_details":{"cached_tokens":1}}}"#,
            r#"{"type":"response.completed","response":{"id":"r","usage":{"input_tokens":2,"output_tokens":4}}}"#,
            r#"{"usage":null}"#,
            r#"{"usage":5}"#,
            r#"{"usage":{"prompt_tokens":1},"usage":{"prompt_tokens":2}}"#,
            r#"{"us\u0061ge":{"prompt_tokens":4}}"#,
            r#"{"choices":[]}"#,
            r#"{}"#,
            r#"[]"#,
            r#""usage""#,
            r#"{"usage":{"prompt_tokens":1}} trailing"#,
            r#"{"usage":{"prompt_tokens":1}"#,
            r#"{"a":"unterminated"#,
            r#"{"a":[{"b":"]}"}],"usage":{"prompt_tokens":8,"completion_tokens":2}}"#,
            r#"{"a":true,"b":false,"c":null,"d":-1.5e10,"usage":{"completion_tokens":6}}"#,
            "",
            "{",
            r#"{"usage":}"#,
            r#"{"usage" {"prompt_tokens":1}}"#,
        ];
        for a in answers {
            assert_eq!(
                Usage::from_answer_bytes(a.as_bytes()),
                Usage::from_answer_parsed(a.as_bytes()),
                "{a}"
            );
        }
        // Both read the answer's own usage, not the one quoted in its text.
        assert_eq!(
            Usage::from_answer_bytes(answers[0].as_bytes())
                .unwrap()
                .prompt,
            12
        );
        // A difference kept on purpose: a malformed value the scan steps over does not lose
        // the usage.
        let odd = br#"{"id":tru,"usage":{"prompt_tokens":2}}"#;
        assert_eq!(Usage::from_answer_parsed(odd), None);
        assert_eq!(Usage::from_answer_bytes(odd).unwrap().prompt, 2);
    }

    #[test]
    fn usage_shapes() {
        let chat = json!({"usage": {"prompt_tokens": 10, "completion_tokens": 5, "total_tokens": 15,
            "prompt_tokens_details": {"cached_tokens": 4}, "completion_tokens_details": {"reasoning_tokens": 2}}});
        let u = Usage::from_answer_bytes(chat.to_string().as_bytes()).unwrap();
        assert_eq!(
            (u.prompt, u.cached, u.completion, u.reasoning),
            (10, 4, 5, 2)
        );
        let resp = json!({"object": "response", "usage": {"input_tokens": 7, "output_tokens": 3,
            "input_tokens_details": {"cached_tokens": 1}}});
        let u = Usage::from_answer_bytes(resp.to_string().as_bytes()).unwrap();
        assert_eq!((u.prompt, u.cached, u.completion), (7, 1, 3));
        let images = json!({"created": 1, "data": [{"b64_json": "x"}, {"b64_json": "y"}]});
        assert_eq!(
            Usage::from_answer_bytes(images.to_string().as_bytes())
                .unwrap()
                .images,
            2
        );
        let whisper = json!({"text": "hi", "usage": {"type": "duration", "seconds": 12.5}});
        assert_eq!(
            Usage::from_answer_bytes(whisper.to_string().as_bytes())
                .unwrap()
                .audio_seconds,
            12.5
        );
        let emb = json!({"object": "list", "data": [{"embedding": []}], "usage": {"prompt_tokens": 3, "total_tokens": 3}});
        let u = Usage::from_answer_bytes(emb.to_string().as_bytes()).unwrap();
        assert_eq!((u.prompt, u.images), (3, 0));
        let verbose = json!({"text": "hi", "duration": 3.5});
        assert_eq!(
            Usage::from_answer_bytes(verbose.to_string().as_bytes())
                .unwrap()
                .audio_seconds,
            3.5
        );
        assert_eq!(Usage::from_answer_bytes(br#"{"choices":[]}"#), None);
        // A count that is not a believable whole number makes the usage unread (the gateway
        // then counts the answer itself); `null` is 0; parts above their whole are cut.
        let odd = br#"{"usage": {"prompt_tokens": null, "completion_tokens": -3,
            "prompt_tokens_details": null, "completion_tokens_details": {"reasoning_tokens": 1.5},
            "extra": {"a": [1, {"b": 2}]}}}"#;
        assert_eq!(Usage::from_answer_bytes(odd), None);
        for unbelievable in [
            r#"{"usage": {"output_tokens": "7"}}"#,
            r#"{"usage": {"prompt_tokens": 18446744073709551615, "completion_tokens": 1}}"#,
            r#"{"usage": {"prompt_tokens": 1, "completion_tokens": 1000000000000}}"#,
            r#"{"usage": {"prompt_tokens": 1, "completion_tokens": 8.0}}"#,
            r#"{"usage": {"prompt_tokens": 1e30, "completion_tokens": 1}}"#,
            r#"{"usage": {"prompt_tokens": 5, "prompt_tokens_details": {"cached_tokens": 9223372036854775808}}}"#,
            r#"{"usage": {"type": "duration", "seconds": 1e30}}"#,
            r#"{"usage": {"type": "duration", "seconds": -4}}"#,
            r#"{"response": {"usage": {"input_tokens": -1, "output_tokens": 2}}}"#,
        ] {
            assert_eq!(
                Usage::from_answer_bytes(unbelievable.as_bytes()),
                None,
                "{unbelievable}"
            );
            assert_eq!(
                Usage::from_event(unbelievable.as_bytes()),
                None,
                "{unbelievable}"
            );
        }
        let u = Usage::from_answer_bytes(
            br#"{"usage": {"prompt_tokens": 100000000, "completion_tokens": null,
            "prompt_tokens_details": {"cached_tokens": 200000000, "other": 1e40}}}"#,
        );
        assert_eq!(u.map(|u| (u.prompt, u.cached, u.completion)), None);
        let u = Usage::from_answer_bytes(
            br#"{"usage": {"prompt_tokens": 100000000, "completion_tokens": null,
            "prompt_tokens_details": {"cached_tokens": 99999999999, "other": 1e40}}}"#,
        );
        assert_eq!(u.map(|u| (u.prompt, u.cached)), None);
        let u = Usage::from_answer_bytes(
            br#"{"usage": {"prompt_tokens": 10, "completion_tokens": 2,
            "prompt_tokens_details": {"cached_tokens": 30, "other": 1e40}}}"#,
        )
        .unwrap();
        assert_eq!((u.prompt, u.cached, u.completion), (10, 10, 2));
        assert_eq!(
            Usage::from_answer_bytes(br#"{"text": "hi", "duration": 1e300}"#),
            None
        );
        let whisper = br#"{"usage": {"type": "duration", "seconds": 3}}"#;
        assert_eq!(
            Usage::from_answer_bytes(whisper).unwrap().audio_seconds,
            3.0
        );
        // The Responses API's usage inside `response`, and the same reader on a JSON tree
        // (stream events).
        let nested = json!({"response": {"usage": {"input_tokens": 2, "output_tokens": 9,
            "output_tokens_details": {"reasoning_tokens": 4}}}});
        let u = Usage::from_answer_bytes(nested.to_string().as_bytes()).unwrap();
        assert_eq!((u.prompt, u.completion, u.reasoning), (2, 9, 4));
        let (u, usage_only) = Usage::from_event(nested.to_string().as_bytes()).unwrap();
        assert_eq!(
            (u.prompt, u.completion, u.reasoning, usage_only),
            (2, 9, 4, false)
        );
        // Stream chunks: `"usage":null` on the content chunks, the counts on the last one
        // (with no choices), a usage without counts or of another type is none.
        let chunk = br#"{"id":"c","choices":[{"index":0,"delta":{"content":"hi"}}],"usage":null}"#;
        assert_eq!(Usage::from_event(chunk), None);
        let last = br#"{"id":"c","choices":[],"usage":{"prompt_tokens":5,"completion_tokens":2}}"#;
        let (u, usage_only) = Usage::from_event(last).unwrap();
        assert_eq!((u.prompt, u.completion, usage_only), (5, 2, true));
        let with_choice = br#"{"choices":[{"index":0}],"usage":{"prompt_tokens":5}}"#;
        assert!(!Usage::from_event(with_choice).unwrap().1);
        assert_eq!(Usage::from_event(br#"{"usage":{"total_tokens":3}}"#), None);
        assert_eq!(Usage::from_event(br#"{"usage":[1,2]}"#), None);
    }

    #[test]
    fn cost_and_prices() {
        let p = builtin_price("gpt-4o-2024-08-06").unwrap();
        assert_eq!(p.input_per_1m, 2.5);
        assert_eq!(
            builtin_price("gpt-4o-mini-2024-07-18")
                .unwrap()
                .input_per_1m,
            0.15
        );
        assert!(builtin_price("my-own-model").is_none());
        // Speech and transcription models are not the chat models their names start with.
        assert!(builtin_price("gpt-4o-mini-tts").is_none());
        assert!(builtin_price("gpt-4o-mini-tts-2025-03-20").is_none());
        let t = builtin_price("gpt-4o-mini-transcribe-2025-03-20").unwrap();
        assert_eq!((t.audio_input_per_1m, t.per_audio_second), (3.0, 0.00005));
        assert_eq!(
            builtin_price("tts-1-hd-1106").unwrap().per_1m_characters,
            30.0
        );
        // Another model whose name starts with a known one has no built-in price (it is
        // often priced far apart); a dated snapshot, preview or tag has its model's.
        for other in [
            "gpt-4.5",
            "gpt-4o-realtime-preview",
            "gpt-4o-search-preview",
            "gpt-4o-mini-search-preview",
            "o3-mini-high",
            "gpt-image-1.5",
        ] {
            assert!(builtin_price(other).is_none(), "{other}");
        }
        // A deployment's own name (no `model:`) is the user's: any suffix after `-`.
        assert_eq!(
            builtin_price_by_name("gpt-4o-prod").unwrap().input_per_1m,
            2.5
        );
        assert_eq!(
            builtin_price_by_name("o3-pro-east").unwrap().input_per_1m,
            20.0
        );
        assert!(builtin_price_by_name("gpt-4.5-east").is_none());
        assert!(builtin_price_by_name("gpt-4o-mini-tts-east").is_none());
        for (name, input, output) in [
            ("o3-pro-2025-06-10", 20.0, 80.0),
            ("o1-pro", 150.0, 600.0),
            ("gpt-4.5-preview", 75.0, 150.0),
            ("gpt-4.5-preview-2025-02-27", 75.0, 150.0),
            ("gpt-4-32k-0613", 60.0, 120.0),
            ("gpt-4-1106-preview", 10.0, 30.0),
            ("gpt-4-turbo-2024-04-09", 10.0, 30.0),
            ("gpt-4-0613", 30.0, 60.0),
            ("o1-preview-2024-09-12", 15.0, 60.0),
            ("o3-deep-research", 10.0, 40.0),
            ("o4-mini-deep-research-2025-06-26", 2.0, 8.0),
            ("gpt-35-turbo-0125", 0.5, 1.5),
            ("gpt-35-turbo-0613", 1.5, 2.0),
            ("gpt-3.5-turbo-1106", 1.0, 2.0),
            ("gpt-35-turbo-16k-0613", 3.0, 4.0),
            ("gpt-3.5-turbo-instruct-0914", 1.5, 2.0),
            ("GPT-4o-Mini@2024-07-18", 0.15, 0.6),
        ] {
            let p = builtin_price(name).unwrap_or_else(|| panic!("{name}"));
            assert_eq!((p.input_per_1m, p.output_per_1m), (input, output), "{name}");
        }
        // A transcription's usage names its details `input_token_details`.
        let u = Usage::from_answer_bytes(
            br#"{"text":"hi","usage":{"type":"tokens","input_tokens":14,"input_token_details":{"text_tokens":4,"audio_tokens":10},"output_tokens":5,"total_tokens":19}}"#,
        )
        .unwrap();
        assert_eq!((u.prompt, u.audio_prompt, u.completion), (14, 10, 5));
        // 4 × 1.25 + 10 × 3.00 + 5 × 5.00 = 60 micro-dollars.
        assert!((t.cost(&u) - 60e-6).abs() < 1e-15);
        let u = Usage {
            prompt: 1000,
            cached: 400,
            completion: 100,
            ..Default::default()
        };
        // 600 × 2.50 + 400 × 1.25 + 100 × 10.00 = 1500 + 500 + 1000 micro-dollars
        assert!((p.cost(&u) - 0.003).abs() < 1e-12);
    }

    /// Every entry of the built-in table is read (an entry that fails to parse would be
    /// dropped without a word).
    #[test]
    fn every_builtin_entry_parses() {
        let raw: HashMap<String, Value> =
            serde_json::from_str(include_str!("prices.json")).unwrap();
        let entries = raw.keys().filter(|k| !k.starts_with('_')).count();
        assert_eq!(table().len(), entries);
    }

    #[test]
    fn image_prices_by_quality_and_size() {
        let ask = |q: Option<&str>, s: Option<&str>| ImageAsk {
            quality: q.map(str::to_string),
            size: s.map(str::to_string),
            partial_images: 0,
        };
        let p = builtin_pricing("dall-e-3").unwrap();
        let t = ImagePrices::new(p.image_sizes.as_ref().unwrap()).unwrap();
        let flat = Price::from(p).per_image;
        // Without `per_image`, what the table does not list costs its most.
        assert_eq!(flat, 0.12);
        // The ledger: OpenAI's defaults when not sent, the listed price when listed.
        assert_eq!(t.unit(&ask(None, None), flat), 0.04);
        assert_eq!(t.unit(&ask(Some("hd"), Some("1792x1024")), flat), 0.12);
        assert_eq!(
            t.unit(&ask(Some("standard"), Some("1024x1792")), flat),
            0.08
        );
        assert_eq!(t.unit(&ask(Some("hd"), None), flat), 0.08);
        assert_eq!(t.unit(&ask(Some("ultra"), None), flat), 0.12);
        // `auto` is priced as reserved: the most of what it may be, never more.
        assert_eq!(t.unit(&ask(Some("auto"), Some("1024x1024")), flat), 0.08);
        assert_eq!(t.unit(&ask(Some("standard"), Some("auto")), flat), 0.08);
        for q in [
            None,
            Some("standard"),
            Some("hd"),
            Some("auto"),
            Some("ultra"),
        ] {
            for s in [
                None,
                Some("1024x1024"),
                Some("1792x1024"),
                Some("auto"),
                Some("1x1"),
            ] {
                let a = ask(q, s);
                assert!(t.unit(&a, flat) <= t.bound(&a, flat), "{a:?}");
            }
        }
        // The bound: the most of what the request may get.
        assert_eq!(t.bound(&ask(None, None), flat), 0.12);
        assert_eq!(t.bound(&ask(Some("standard"), None), flat), 0.08);
        assert_eq!(t.bound(&ask(None, Some("1024x1024")), flat), 0.08);
        assert_eq!(
            t.bound(&ask(Some("standard"), Some("1024x1024")), flat),
            0.04
        );
        assert_eq!(t.bound(&ask(Some("standard"), Some("512x512")), flat), 0.12);
        assert_eq!(t.bound(&ask(Some("standard"), Some("512x512")), 0.5), 0.5);
        // gpt-image-1: `auto` may be any; the answer's tokens are what it costs.
        let g = builtin_pricing("gpt-image-1-2025-04-15").unwrap();
        let gt = ImagePrices::new(g.image_sizes.as_ref().unwrap()).unwrap();
        let gp = Price::from(g);
        assert_eq!(
            gt.bound(&ask(Some("auto"), Some("auto")), gp.per_image),
            0.2496
        );
        assert_eq!(gt.bound(&ask(Some("low"), None), gp.per_image), 0.01632);
        let u = Usage {
            prompt: 10,
            completion: 4160,
            images: 1,
            ..Default::default()
        };
        // 10 × 5 + 4160 × 40 = 166,450 micro-dollars; no price per image on top.
        assert!((gp.cost(&u) - 0.16645).abs() < 1e-12);
        // Without reported tokens, by the image.
        let mut priced = gp;
        priced.per_image = gt.unit(&ask(Some("high"), Some("1024x1024")), gp.per_image);
        let estimated = Usage {
            prompt: 10,
            images: 2,
            estimated: true,
            ..Default::default()
        };
        assert!((priced.cost(&estimated) - (50e-6 + 2.0 * 0.1664)).abs() < 1e-12);
        // A DALL·E answer reports no tokens: by the image.
        let d = Price::from(p);
        let dall_e = Usage {
            images: 2,
            ..Default::default()
        };
        assert!((d.cost(&dall_e) - 0.24).abs() < 1e-12);
    }

    #[test]
    fn tokenizer_counts() {
        assert_eq!(count_tokens("gpt-4o", "hello world"), 2);
        assert_eq!(count_tokens("gpt-35-turbo", "hello world"), 2);
        assert_eq!(count_tokens("gpt-4o", ""), 0);
        // Ordinary text counts as it does whole: segments end before a word.
        let prose = "The quick brown fox jumps over the lazy dog.  Then it rests;\n\n\tand \
                     again, 42 times: \"quoted\" words, \u{e9}t\u{e9}, \u{4f60}\u{597d} \u{1f600}! "
            .repeat(120);
        assert!(prose.len() > 16 * RUN_MAX * 4);
        for model in ["gpt-4o", "gpt-35-turbo"] {
            let bpe = if model == "gpt-4o" {
                tiktoken_rs::o200k_base_singleton()
            } else {
                tiktoken_rs::cl100k_base_singleton()
            };
            let whole = bpe.encode_with_special_tokens(&prose).len() as u64;
            assert_eq!(count_tokens(model, &prose), whole, "{model}");
        }
        // Long runs of one character, of spaces, of a multibyte one: counted in pieces (whole,
        // they took minutes, or panicked), about what they are.
        for (run, bytes_per_char) in [("x", 1), (" ", 1), ("!", 1), ("\u{e9}", 2)] {
            let text = run.repeat(60_000);
            let n = count_tokens("gpt-4o", &text);
            assert!(
                n > 0 && n <= (60_000 * bytes_per_char) as u64,
                "{run:?}: {n}"
            );
        }
        // Past 64 KiB, the start is counted and scaled.
        let big = "word ".repeat(100_000);
        let n = count_tokens("gpt-4o", &big);
        assert!((99_000..=101_000).contains(&n), "{n}");
    }
}
