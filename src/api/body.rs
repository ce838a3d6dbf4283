//! A JSON request body read without copying: the top-level fields are borrowed slices of the
//! original bytes, so the gateway can read `model`, `stream` and friends and splice a new
//! `model` into the body without re-serialising anything else.

use std::borrow::Cow;
use std::fmt;
use std::ops::Range;

use bytes::{BufMut, Bytes, BytesMut};
use serde::de::{Deserialize, Deserializer, MapAccess, Visitor};
use serde_json::value::RawValue;

use crate::error::GatewayError;

/// The top-level fields of a JSON object body, in order, borrowed from the body.
#[derive(Debug)]
pub struct JsonHead<'a> {
    body: &'a [u8],
    fields: Vec<(Cow<'a, str>, &'a RawValue)>,
}

struct Fields<'a>(Vec<(Cow<'a, str>, &'a RawValue)>);

struct Key<'a>(Cow<'a, str>);

impl<'de> Deserialize<'de> for Key<'de> {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = Key<'de>;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a string key")
            }
            fn visit_borrowed_str<E>(self, v: &'de str) -> Result<Self::Value, E> {
                Ok(Key(Cow::Borrowed(v)))
            }
            fn visit_str<E>(self, v: &str) -> Result<Self::Value, E> {
                Ok(Key(Cow::Owned(v.to_string())))
            }
        }
        d.deserialize_str(V)
    }
}

impl<'de> Deserialize<'de> for Fields<'de> {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = Fields<'de>;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a JSON object")
            }
            fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Self::Value, A::Error> {
                let mut out = Vec::with_capacity(map.size_hint().unwrap_or(8));
                while let Some((k, v)) = map.next_entry::<Key<'de>, &'de RawValue>()? {
                    out.push((k.0, v));
                }
                Ok(Fields(out))
            }
        }
        d.deserialize_map(V)
    }
}

impl<'a> JsonHead<'a> {
    pub fn parse(body: &'a [u8]) -> Result<JsonHead<'a>, GatewayError> {
        if body.iter().all(|b| b.is_ascii_whitespace()) {
            return Err(GatewayError::invalid_request(
                "the request body is empty; it must be a JSON object",
            ));
        }
        match serde_json::from_slice::<Fields<'a>>(body) {
            Ok(f) => Ok(JsonHead { body, fields: f.0 }),
            Err(e) if e.is_data() => Err(GatewayError::invalid_request(format!(
                "the request body must be a JSON object (line {} column {})",
                e.line(),
                e.column()
            ))),
            Err(e) => Err(GatewayError::invalid_request(format!(
                "the request body is not valid JSON: {e}"
            ))),
        }
    }

    pub fn field(&self, name: &str) -> Option<&'a RawValue> {
        self.fields.iter().find(|(k, _)| k == name).map(|(_, v)| *v)
    }

    /// Byte range of a field's value inside the body.
    fn span(&self, raw: &RawValue) -> Range<usize> {
        let start = raw.get().as_ptr() as usize - self.body.as_ptr() as usize;
        start..start + raw.get().len()
    }

    /// `model`, which must be a string when present.
    pub fn model(&self) -> Result<Option<String>, GatewayError> {
        match self.field("model") {
            None => Ok(None),
            Some(raw) if raw.get() == "null" => Ok(None),
            Some(raw) => serde_json::from_str::<String>(raw.get())
                .map(Some)
                .map_err(|_| {
                    GatewayError::invalid_request("`model` must be a string").with_param("model")
                }),
        }
    }

    /// `stream`, which must be a boolean when present.
    pub fn stream(&self) -> Result<bool, GatewayError> {
        match self.field("stream").map(|r| r.get()) {
            None | Some("null") | Some("false") => Ok(false),
            Some("true") => Ok(true),
            Some(_) => {
                Err(GatewayError::invalid_request("`stream` must be a boolean")
                    .with_param("stream"))
            }
        }
    }

    /// An unsigned integer field such as `max_tokens`.
    pub fn uint(&self, name: &str) -> Result<Option<u64>, GatewayError> {
        match self.field(name).map(|r| r.get()) {
            None | Some("null") => Ok(None),
            Some(s) => s.parse::<u64>().map(Some).map_err(|_| {
                GatewayError::invalid_request(format!("`{name}` must be a non-negative integer"))
                    .with_param(name)
            }),
        }
    }

    /// Where `model` sits in the body, so a provider can set it later without parsing again.
    pub fn model_slot(&self) -> ModelSlot {
        ModelSlot {
            span: self.field("model").map(|raw| self.span(raw)),
            has_fields: !self.fields.is_empty(),
        }
    }
}

/// The place of `model` in a JSON body (or the lack of it).
#[derive(Debug, Clone, Default)]
pub struct ModelSlot {
    span: Option<Range<usize>>,
    has_fields: bool,
}

impl ModelSlot {
    /// The body with `model` set to `model`: the old value is replaced in place, or the field
    /// is added at the front. Everything else stays byte for byte.
    pub fn apply(&self, body: &[u8], model: &str) -> Bytes {
        let encoded = serde_json::Value::from(model).to_string();
        match &self.span {
            Some(span) => {
                let mut out = BytesMut::with_capacity(body.len() - span.len() + encoded.len());
                out.put_slice(&body[..span.start]);
                out.put_slice(encoded.as_bytes());
                out.put_slice(&body[span.end..]);
                out.freeze()
            }
            None => {
                let open = body.iter().position(|b| *b == b'{').unwrap_or(0);
                let mut out = BytesMut::with_capacity(body.len() + encoded.len() + 10);
                out.put_slice(&body[..=open]);
                out.put_slice(b"\"model\":");
                out.put_slice(encoded.as_bytes());
                if self.has_fields {
                    out.put_u8(b',');
                }
                out.put_slice(&body[open + 1..]);
                out.freeze()
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_fields_and_splices_model() {
        let body = br#"{ "model" : "gpt-4o", "messages":[{"role":"user","content":"hi \"there\""}], "stream": true, "max_tokens": 5 }"#;
        let head = JsonHead::parse(body).unwrap();
        assert_eq!(head.model().unwrap().as_deref(), Some("gpt-4o"));
        assert!(head.stream().unwrap());
        assert_eq!(head.uint("max_tokens").unwrap(), Some(5));
        let out = head.model_slot().apply(body, "dep-1");
        assert_eq!(
            std::str::from_utf8(&out).unwrap(),
            r#"{ "model" : "dep-1", "messages":[{"role":"user","content":"hi \"there\""}], "stream": true, "max_tokens": 5 }"#
        );
    }

    #[test]
    fn adds_model_when_absent() {
        let body = br#" {"input":"x"}"#;
        let head = JsonHead::parse(body).unwrap();
        assert_eq!(
            &head.model_slot().apply(body, "m")[..],
            br#" {"model":"m","input":"x"}"#
        );
        let head = JsonHead::parse(b"{}").unwrap();
        assert_eq!(
            &head.model_slot().apply(b"{}", "m")[..],
            br#"{"model":"m"}"#
        );
    }

    #[test]
    fn refuses_non_objects() {
        assert!(JsonHead::parse(b"[1]")
            .unwrap_err()
            .message
            .contains("JSON object"));
        assert!(JsonHead::parse(b"{\"a\":")
            .unwrap_err()
            .message
            .contains("not valid JSON"));
        assert!(JsonHead::parse(b"").unwrap_err().message.contains("empty"));
        let head = JsonHead::parse(br#"{"model":3,"stream":"yes"}"#).unwrap();
        assert!(head.model().is_err());
        assert!(head.stream().is_err());
    }
}
