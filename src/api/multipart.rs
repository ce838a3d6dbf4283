//! Just enough `multipart/form-data` to read a form's small text fields (`model`, `n`, ...)
//! and replace one (`model`) of an audio or image upload; the file parts and every other
//! byte pass through untouched.

use std::ops::Range;

use bytes::{BufMut, Bytes, BytesMut};

use crate::error::GatewayError;

/// The boundary of a `multipart/form-data` content type.
pub fn boundary(content_type: Option<&str>) -> Result<String, GatewayError> {
    let ct = content_type.unwrap_or("");
    let mut parts = ct.split(';');
    let mime = parts.next().unwrap_or("").trim();
    if !mime.eq_ignore_ascii_case("multipart/form-data") {
        return Err(GatewayError::invalid_request(
            "this endpoint takes multipart/form-data (a file upload)",
        ));
    }
    for p in parts {
        // A parameter's name in any case, spaces around `=` (RFC 2045).
        let Some((k, v)) = p.split_once('=') else {
            continue;
        };
        if k.trim().eq_ignore_ascii_case("boundary") {
            let v = v.trim().trim_matches('"');
            if !v.is_empty() {
                return Ok(v.to_string());
            }
        }
    }
    Err(GatewayError::invalid_request(
        "multipart/form-data without a boundary",
    ))
}

fn find(hay: &[u8], needle: &[u8], from: usize) -> Option<usize> {
    memchr::memmem::find(hay.get(from..)?, needle).map(|i| i + from)
}

/// The byte range of the value of the text field `name`, if the body has one.
pub fn field_range(body: &[u8], boundary: &str, name: &str) -> Option<Range<usize>> {
    field_ranges(body, boundary, name).next()
}

/// The byte ranges of the values of every part named `name`, in order.
pub fn field_ranges<'a>(
    body: &'a [u8],
    boundary: &str,
    name: &str,
) -> impl Iterator<Item = Range<usize>> + 'a {
    let wanted = name.to_ascii_lowercase();
    parts(body, boundary).filter_map(move |p| p.is(&wanted).then_some(p.value))
}

/// One part of a form: its name (lowercase), whether it is a file, and its value's range.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Part {
    pub name: String,
    /// Further names its disposition gives (a parser upstream may take any of them).
    pub aliases: Vec<String>,
    pub file: bool,
    pub value: Range<usize>,
}

impl Part {
    /// Whether the part is named `name` (lowercase), by any of its names.
    pub fn is(&self, name: &str) -> bool {
        self.name == name || self.aliases.iter().any(|a| a == name)
    }
}

/// Every part of a form, in order, in one pass over the body.
pub fn parts<'a>(body: &'a [u8], boundary: &str) -> impl Iterator<Item = Part> + 'a {
    let delim = format!("--{boundary}");
    let next_delim = format!("\r\n{delim}");
    let mut at = find(body, delim.as_bytes(), 0);
    std::iter::from_fn(move || {
        let headers_start = at? + delim.len();
        if body.get(headers_start..headers_start + 2) == Some(b"--") {
            return None; // closing delimiter
        }
        let headers_end = find(body, b"\r\n\r\n", headers_start)?;
        let content_start = headers_end + 4;
        let next = find(body, next_delim.as_bytes(), content_start)?;
        let headers = &body[headers_start..headers_end];
        at = Some(next + 2);
        let (mut names, file) = disposition(headers);
        let name = if names.is_empty() {
            String::new()
        } else {
            names.remove(0)
        };
        Some(Part {
            name,
            aliases: names,
            file,
            value: content_start..next,
        })
    })
}

/// A part's name and whether it names a file, from its `Content-Disposition`. Every
/// spelling a lenient parser upstream also takes counts (`name=model`, `NAME = "model"`,
/// RFC 5987's `name*=UTF-8''model`): a part the gateway did not see as `model` must not be
/// one upstream.
fn disposition(headers: &[u8]) -> (Vec<String>, bool) {
    let mut names = Vec::new();
    let mut file = false;
    for line in headers.split(|b| *b == b'\n') {
        let line = String::from_utf8_lossy(line).to_ascii_lowercase();
        if !line.starts_with("content-disposition:") {
            continue;
        }
        for p in line.split(';').skip(1) {
            let Some((k, v)) = p.split_once('=') else {
                continue;
            };
            let v = v.trim().trim_matches('"');
            match k.trim() {
                "name" => names.push(v.to_string()),
                // `charset'language'value`, the language often empty.
                "name*" => {
                    let v = v.splitn(3, '\'').nth(2).unwrap_or(v);
                    names.push(super::percent_decode(v));
                }
                "filename" | "filename*" => file = true,
                _ => {}
            }
        }
    }
    (names, file)
}

/// The text value of field `name`.
pub fn field(body: &[u8], boundary: &str, name: &str) -> Option<String> {
    field_range(body, boundary, name).map(|r| text(body, r))
}

/// The text of a field's value at `range`.
pub fn text(body: &[u8], range: Range<usize>) -> String {
    String::from_utf8_lossy(&body[range]).trim().to_string()
}

/// The body with field `name` set to `value` (replaced in place, or added as the first part).
pub fn with_field(body: &Bytes, boundary: &str, name: &str, value: &str) -> Bytes {
    match field_range(body, boundary, name) {
        Some(r) => {
            let mut out = BytesMut::with_capacity(body.len() + value.len());
            out.put_slice(&body[..r.start]);
            out.put_slice(value.as_bytes());
            out.put_slice(&body[r.end..]);
            out.freeze()
        }
        None => {
            let part = format!(
                "--{boundary}\r\nContent-Disposition: form-data; name=\"{name}\"\r\n\r\n{value}\r\n"
            );
            let mut out = BytesMut::with_capacity(body.len() + part.len());
            out.put_slice(part.as_bytes());
            out.put_slice(body);
            out.freeze()
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const BODY: &[u8] = b"--XyZ\r\nContent-Disposition: form-data; name=\"file\"; filename=\"a.wav\"\r\nContent-Type: audio/wav\r\n\r\nRIFF\x00\x01\r\n--XyZ\r\nContent-Disposition: form-data; name=\"model\"\r\n\r\nwhisper\r\n--XyZ--\r\n";

    #[test]
    fn reads_and_replaces_the_model() {
        assert_eq!(
            boundary(Some("multipart/form-data; boundary=XyZ")).unwrap(),
            "XyZ"
        );
        assert_eq!(field(BODY, "XyZ", "model").as_deref(), Some("whisper"));
        let out = with_field(&Bytes::from_static(BODY), "XyZ", "model", "whisper-dep");
        assert_eq!(field(&out, "XyZ", "model").as_deref(), Some("whisper-dep"));
        assert_eq!(out.len(), BODY.len() + 4);
        assert!(out.starts_with(b"--XyZ\r\nContent-Disposition: form-data; name=\"file\""));
    }

    /// A part named without quotes, or with spaces, is the field a lenient parser upstream
    /// would take it for; `filename="model"` names no field.
    #[test]
    fn every_spelling_of_a_name_is_that_field() {
        let body = b"--B\r\nContent-Disposition: form-data; name=\"model\"\r\n\r\nwhisper\r\n\
            --B\r\nContent-Disposition: form-data; name=model\r\n\r\ngpt-4o\r\n\
            --B\r\ncontent-disposition: form-data; NAME = \"model\"\r\n\r\no1\r\n\
            --B\r\nContent-Disposition: form-data; name=\"file\"; filename=\"model\"\r\n\r\nx\r\n--B--\r\n";
        let values: Vec<&[u8]> = field_ranges(body, "B", "model").map(|r| &body[r]).collect();
        assert_eq!(values, [&b"whisper"[..], b"gpt-4o", b"o1"]);
        let body = b"--B\r\nContent-Disposition: form-data; name*=UTF-8''mo%64el\r\n\r\nx\r\n\
            --B\r\nContent-Disposition: form-data; name*=utf-8'en'image%5B%5D; filename=\"a.png\"\r\n\r\ny\r\n--B--\r\n";
        let all: Vec<(String, bool)> = parts(body, "B").map(|p| (p.name, p.file)).collect();
        assert_eq!(
            all,
            [("model".to_string(), false), ("image[]".to_string(), true)]
        );
    }

    #[test]
    fn adds_a_missing_field() {
        let body = Bytes::from_static(b"--B\r\nContent-Disposition: form-data; name=\"file\"; filename=\"x\"\r\n\r\nabc\r\n--B--\r\n");
        assert_eq!(field(&body, "B", "model"), None);
        let out = with_field(&body, "B", "model", "m");
        assert_eq!(field(&out, "B", "model").as_deref(), Some("m"));
        assert!(boundary(Some("application/json")).is_err());
        for ct in [
            "multipart/form-data; Boundary=XyZ",
            "multipart/form-data;boundary = \"XyZ\"",
            "Multipart/Form-Data; charset=utf-8; BOUNDARY=XyZ",
        ] {
            assert_eq!(boundary(Some(ct)).unwrap(), "XyZ", "{ct}");
        }
    }
}
