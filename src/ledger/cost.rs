//! Usage as the upstreams report it, prices, and cost. Usage is read from an answer's JSON
//! (chat, completions, embeddings, responses, images, audio) or from stream events; where an
//! upstream reports none, tokens are counted with a real tokenizer and marked estimated.

use std::collections::HashMap;
use std::sync::OnceLock;

use serde_json::Value;

use crate::config::Pricing;

/// Tokens and units of one request.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct Usage {
    /// Prompt tokens as the upstream counts them (cached ones included).
    pub prompt: u64,
    /// Of `prompt`, those served from the upstream's prompt cache.
    pub cached: u64,
    pub completion: u64,
    pub reasoning: u64,
    pub images: u64,
    pub audio_seconds: f64,
    /// Counted by the gateway, not reported by the upstream.
    pub estimated: bool,
}

fn u(v: Option<&Value>) -> u64 {
    v.and_then(Value::as_u64).unwrap_or(0)
}

impl Usage {
    /// Usage from a `usage` object of any OpenAI shape: chat/completions/embeddings
    /// (`prompt_tokens`...), the Responses API (`input_tokens`...), Whisper's
    /// `{"type":"duration","seconds"}`.
    pub fn from_usage_object(usage: &Value) -> Option<Usage> {
        let o = usage.as_object()?;
        if o.get("type").and_then(Value::as_str) == Some("duration") {
            return Some(Usage {
                audio_seconds: o.get("seconds").and_then(Value::as_f64).unwrap_or(0.0),
                ..Default::default()
            });
        }
        if o.contains_key("prompt_tokens") || o.contains_key("completion_tokens") {
            return Some(Usage {
                prompt: u(o.get("prompt_tokens")),
                cached: u(usage.pointer("/prompt_tokens_details/cached_tokens")),
                completion: u(o.get("completion_tokens")),
                reasoning: u(usage.pointer("/completion_tokens_details/reasoning_tokens")),
                ..Default::default()
            });
        }
        if o.contains_key("input_tokens") || o.contains_key("output_tokens") {
            return Some(Usage {
                prompt: u(o.get("input_tokens")),
                cached: u(usage.pointer("/input_tokens_details/cached_tokens")),
                completion: u(o.get("output_tokens")),
                reasoning: u(usage.pointer("/output_tokens_details/reasoning_tokens")),
                ..Default::default()
            });
        }
        None
    }

    /// Usage from a whole answer's bytes, reading only the fields usage lives in: the rest
    /// of the answer (the text, an embedding's thousands of numbers) is skipped, not built.
    pub fn from_answer_bytes(body: &[u8]) -> Option<Usage> {
        #[derive(serde::Deserialize)]
        struct Head {
            usage: Option<Value>,
            response: Option<ResponseHead>,
            data: Option<Count>,
            created: Option<serde::de::IgnoredAny>,
            object: Option<serde::de::IgnoredAny>,
            duration: Option<f64>,
        }
        #[derive(serde::Deserialize)]
        struct ResponseHead {
            usage: Option<Value>,
        }
        let h: Head = serde_json::from_slice(body).ok()?;
        let mut usage = h
            .usage
            .as_ref()
            .and_then(Usage::from_usage_object)
            .or_else(|| {
                h.response
                    .and_then(|r| r.usage)
                    .as_ref()
                    .and_then(Usage::from_usage_object)
            });
        if let (Some(Count(n)), true, true) = (h.data, h.created.is_some(), h.object.is_none()) {
            usage.get_or_insert_with(Usage::default).images = n;
        }
        if let Some(d) = h.duration {
            usage.get_or_insert_with(Usage::default).audio_seconds = d;
        }
        usage
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

/// Prices of one deployment, resolved at config load.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct Price {
    pub input_per_1m: f64,
    pub cached_input_per_1m: f64,
    pub output_per_1m: f64,
    pub per_image: f64,
    pub per_audio_second: f64,
}

impl From<&Pricing> for Price {
    fn from(p: &Pricing) -> Price {
        Price {
            input_per_1m: p.input_per_1m,
            cached_input_per_1m: p.cached_input_per_1m.unwrap_or(p.input_per_1m),
            output_per_1m: p.output_per_1m,
            per_image: p.per_image.unwrap_or(0.0),
            per_audio_second: p.per_audio_second.unwrap_or(0.0),
        }
    }
}

impl Price {
    /// Cost in USD. Prompt tokens the upstream served from its cache are billed at the
    /// cached price, the rest at the input price.
    pub fn cost(&self, u: &Usage) -> f64 {
        let cached = u.cached.min(u.prompt);
        let uncached = u.prompt - cached;
        (uncached as f64 * self.input_per_1m
            + cached as f64 * self.cached_input_per_1m
            + u.completion as f64 * self.output_per_1m)
            / 1_000_000.0
            + u.images as f64 * self.per_image
            + u.audio_seconds * self.per_audio_second
    }

    /// The most a request can cost: every prompt token uncached, every allowed output token.
    pub fn worst_case(&self, prompt: u64, max_output: u64) -> f64 {
        (prompt as f64 * self.input_per_1m.max(self.cached_input_per_1m)
            + max_output as f64 * self.output_per_1m)
            / 1_000_000.0
            + self.per_image
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
/// (`gpt-4o-2024-08-06` → `gpt-4o`; `gpt-4o-mini-…` → `gpt-4o-mini`).
pub fn builtin_price(model: &str) -> Option<Price> {
    let t = table();
    let m = model.to_ascii_lowercase();
    if let Some(p) = t.get(&m) {
        return Some(p.into());
    }
    t.iter()
        .filter(|(k, _)| {
            m.starts_with(k.as_str()) && m[k.len()..].starts_with(['-', '.', '@', ':'])
        })
        .max_by_key(|(k, _)| k.len())
        .map(|(_, p)| p.into())
}

/// Tokens of a text with the tokenizer of the model's family (o200k for the GPT-4o, 4.1 and
/// o-series, cl100k otherwise).
pub fn count_tokens(model: &str, text: &str) -> u64 {
    if text.is_empty() {
        return 0;
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
    bpe.encode_with_special_tokens(text).len() as u64
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

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
        let u = Usage {
            prompt: 1000,
            cached: 400,
            completion: 100,
            ..Default::default()
        };
        // 600 × 2.50 + 400 × 1.25 + 100 × 10.00 = 1500 + 500 + 1000 micro-dollars
        assert!((p.cost(&u) - 0.003).abs() < 1e-12);
    }

    #[test]
    fn tokenizer_counts() {
        assert_eq!(count_tokens("gpt-4o", "hello world"), 2);
        assert_eq!(count_tokens("gpt-35-turbo", "hello world"), 2);
        assert_eq!(count_tokens("gpt-4o", ""), 0);
    }
}
