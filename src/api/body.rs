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
            Ok(f) => {
                // A field twice would be read by the gateway at its first and by most
                // upstreams at its last: a `model` routed, allowed and priced as one and
                // served as another, a `max_tokens` reserved as 1 and sent as 10^8.
                // A few fields (the usual body) compared pairwise; many (a body may hold
                // millions) through a set, so the check stays linear.
                let twice = if f.0.len() <= 16 {
                    f.0.iter()
                        .enumerate()
                        .find(|(i, (k, _))| f.0[..*i].iter().any(|(seen, _)| seen == k))
                        .map(|(_, (k, _))| k)
                } else {
                    let mut seen = std::collections::HashSet::with_capacity(f.0.len());
                    f.0.iter().map(|(k, _)| k).find(|k| !seen.insert(*k))
                };
                if let Some(k) = twice {
                    return Err(GatewayError::invalid_request(format!(
                        "the request body has the field `{k}` more than once"
                    ))
                    .with_param(k.to_string()));
                }
                Ok(JsonHead { body, fields: f.0 })
            }
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

    /// Where a field sits: its whole member (`"name": value`) and its value, when the name
    /// is written plainly (no escapes; else the member is `None`).
    pub fn member(&self, name: &str) -> Option<(Option<Range<usize>>, Range<usize>)> {
        let value = self.span(self.field(name)?);
        let before = &self.body[..value.start];
        let quoted = format!("\"{name}\"");
        let member = key_end(before)
            .filter(|&end| before[..end].ends_with(quoted.as_bytes()))
            .map(|end| end - quoted.len()..value.end);
        Some((member, value))
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
            open: self.body.iter().position(|b| *b == b'{').unwrap_or(0),
            has_fields: !self.fields.is_empty(),
        }
    }

    /// Whether the client asked for the usage chunk of a stream, and how to ask for it when
    /// it did not (the ledger needs usage; the chunk is dropped again on the way back).
    pub fn usage_ask(&self) -> Result<(bool, UsageAsk), GatewayError> {
        let Some(raw) = self.field("stream_options") else {
            let at = self.body.iter().position(|b| *b == b'{').unwrap_or(0) + 1;
            return Ok((false, UsageAsk::AddField { at }));
        };
        // `null` is replaced, not joined by a second `stream_options` (a parser takes the
        // last of two: the null).
        if raw.get() == "null" {
            let span = self.span(raw);
            return Ok((false, UsageAsk::ReplaceNull { span }));
        }
        let inner = JsonHead::parse(raw.get().as_bytes()).map_err(|_| {
            GatewayError::invalid_request("`stream_options` must be an object")
                .with_param("stream_options")
        })?;
        let base = self.span(raw).start;
        match inner
            .field("include_usage")
            .map(|v| (v.get(), inner.span(v)))
        {
            Some(("true", _)) => Ok((true, UsageAsk::NotNeeded)),
            Some((_, span)) => Ok((
                false,
                UsageAsk::Replace {
                    span: base + span.start..base + span.end,
                },
            )),
            None => Ok((
                false,
                UsageAsk::AddToObject {
                    at: base + raw.get().find('{').unwrap_or(0) + 1,
                    has_fields: !inner.fields.is_empty(),
                },
            )),
        }
    }
}

/// One change to a body: the bytes in `range` (empty for an insertion) become `with`.
pub type Edit = (Range<usize>, Vec<u8>);

/// The body with `edits` applied (in order of position; insertions at one place keep their
/// order).
pub fn splice(body: &[u8], mut edits: Vec<Edit>) -> Bytes {
    // An insertion before a removal that starts at the same place.
    edits.sort_by_key(|(r, _)| (r.start, r.end));
    let extra: usize = edits.iter().map(|(_, w)| w.len()).sum();
    let mut out = BytesMut::with_capacity(body.len() + extra);
    let mut at = 0;
    for (range, with) in edits {
        out.put_slice(&body[at..range.start]);
        out.put_slice(&with);
        at = range.end;
    }
    out.put_slice(&body[at..]);
    out.freeze()
}

/// Where the member name before a value ends (just past its closing quote), given the
/// bytes before the value: past the `:` and the spaces around it. `None` when no `:` comes
/// right before (the value is no member's: an array's element, or text inside a string).
pub fn key_end(before: &[u8]) -> Option<usize> {
    let colon = before.iter().rposition(|b| !b.is_ascii_whitespace())?;
    (before[colon] == b':').then(|| {
        before[..colon]
            .iter()
            .rposition(|b| !b.is_ascii_whitespace())
            .map_or(0, |q| q + 1)
    })
}

/// What to cut to remove the member at `member` from its object: the member and one comma
/// beside it (the one after it, else the one before it).
pub fn member_cut(body: &[u8], member: Range<usize>) -> Range<usize> {
    let after = body[member.end..]
        .iter()
        .position(|b| !b.is_ascii_whitespace())
        .map(|i| member.end + i);
    if let Some(comma) = after.filter(|&i| body[i] == b',') {
        return member.start..comma + 1;
    }
    let before = body[..member.start]
        .iter()
        .rposition(|b| !b.is_ascii_whitespace());
    match before.filter(|&i| body[i] == b',') {
        Some(comma) => comma..member.end,
        None => member,
    }
}

/// The place of `model` in a JSON body (or the lack of it).
#[derive(Debug, Clone, Default)]
pub struct ModelSlot {
    span: Option<Range<usize>>,
    open: usize,
    has_fields: bool,
}

impl ModelSlot {
    /// The edit that sets `model`: the old value replaced in place, or the field added at
    /// the front.
    pub fn edit(&self, model: &str) -> Edit {
        // The name as a JSON string, written straight into the edit's bytes.
        let mut with = Vec::with_capacity(model.len() + 12);
        if self.span.is_none() {
            with.extend_from_slice(b"\"model\":");
        }
        let _ = serde_json::to_writer(&mut with, model);
        match &self.span {
            Some(span) => (span.clone(), with),
            None => {
                if self.has_fields {
                    with.push(b',');
                }
                (self.open + 1..self.open + 1, with)
            }
        }
    }

    /// An edit that adds a top-level field (after the body's `{`).
    pub fn add_field(&self, name: &str, json_value: &str) -> Edit {
        let mut with = Vec::with_capacity(name.len() + json_value.len() + 4);
        with.push(b'"');
        with.extend_from_slice(name.as_bytes());
        with.extend_from_slice(b"\":");
        with.extend_from_slice(json_value.as_bytes());
        if self.has_fields {
            with.push(b',');
        }
        (self.open + 1..self.open + 1, with)
    }
}

/// How to ask the upstream for a stream's usage chunk.
#[derive(Debug, Clone, Default)]
pub enum UsageAsk {
    /// Not a stream of chat or completions, or the client asked already.
    #[default]
    NotNeeded,
    /// No `stream_options`: add it after the body's `{`.
    AddField { at: usize },
    /// `stream_options` without `include_usage`: add it after that object's `{`.
    AddToObject { at: usize, has_fields: bool },
    /// `include_usage` set to something other than `true`.
    Replace { span: Range<usize> },
    /// `stream_options: null`: the object in its place.
    ReplaceNull { span: Range<usize> },
}

impl UsageAsk {
    pub fn edit(&self) -> Option<Edit> {
        match self {
            UsageAsk::NotNeeded => None,
            UsageAsk::AddField { at } => Some((
                *at..*at,
                b"\"stream_options\":{\"include_usage\":true},".to_vec(),
            )),
            UsageAsk::AddToObject { at, has_fields } => {
                let mut with = b"\"include_usage\":true".to_vec();
                if *has_fields {
                    with.push(b',');
                }
                Some((*at..*at, with))
            }
            UsageAsk::Replace { span } => Some((span.clone(), b"true".to_vec())),
            UsageAsk::ReplaceNull { span } => {
                Some((span.clone(), b"{\"include_usage\":true}".to_vec()))
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
        let out = splice(body, vec![head.model_slot().edit("dep-1")]);
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
            &splice(body, vec![head.model_slot().edit("m")])[..],
            br#" {"model":"m","input":"x"}"#
        );
        let head = JsonHead::parse(b"{}").unwrap();
        assert_eq!(
            &splice(b"{}", vec![head.model_slot().edit("m")])[..],
            br#"{"model":"m"}"#
        );
    }

    #[test]
    fn asks_for_stream_usage_in_every_shape() {
        let cases: [(&[u8], bool, &[u8]); 5] = [
            (br#"{"model":"m","stream":true,"stream_options":null}"#, false,
             br#"{"model":"x","stream":true,"stream_options":{"include_usage":true}}"#),
            (br#"{"model":"m","stream":true}"#, false,
             br#"{"stream_options":{"include_usage":true},"model":"x","stream":true}"#),
            (br#"{"model":"m","stream":true,"stream_options":{"include_obfuscation":false}}"#, false,
             br#"{"model":"x","stream":true,"stream_options":{"include_usage":true,"include_obfuscation":false}}"#),
            (br#"{"model":"m","stream":true,"stream_options":{ "include_usage" : false }}"#, false,
             br#"{"model":"x","stream":true,"stream_options":{ "include_usage" : true }}"#),
            (br#"{"model":"m","stream":true,"stream_options":{"include_usage":true}}"#, true,
             br#"{"model":"x","stream":true,"stream_options":{"include_usage":true}}"#),
        ];
        for (body, asked, want) in cases {
            let head = JsonHead::parse(body).unwrap();
            let (client_asked, ask) = head.usage_ask().unwrap();
            assert_eq!(client_asked, asked);
            let mut edits = vec![head.model_slot().edit("x")];
            edits.extend(ask.edit());
            assert_eq!(
                std::str::from_utf8(&splice(body, edits)).unwrap(),
                std::str::from_utf8(want).unwrap()
            );
        }
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
