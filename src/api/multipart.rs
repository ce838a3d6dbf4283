//! Just enough `multipart/form-data` to read and replace one small text field (`model`) of an
//! audio upload; the file part and every other byte pass through untouched.

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
        let p = p.trim();
        if let Some(v) = p
            .strip_prefix("boundary=")
            .or_else(|| p.strip_prefix("BOUNDARY="))
        {
            let v = v.trim_matches('"');
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
    if needle.is_empty() || hay.len() < needle.len() {
        return None;
    }
    let first = needle[0];
    let mut i = from;
    while i + needle.len() <= hay.len() {
        match hay[i..=hay.len() - needle.len()]
            .iter()
            .position(|b| *b == first)
        {
            None => return None,
            Some(off) => {
                let at = i + off;
                if &hay[at..at + needle.len()] == needle {
                    return Some(at);
                }
                i = at + 1;
            }
        }
    }
    None
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
    let delim = format!("--{boundary}");
    let next_delim = format!("\r\n{delim}");
    let wanted = name.to_ascii_lowercase();
    let mut at = find(body, delim.as_bytes(), 0);
    std::iter::from_fn(move || loop {
        let headers_start = at? + delim.len();
        if body.get(headers_start..headers_start + 2) == Some(b"--") {
            return None; // closing delimiter
        }
        let headers_end = find(body, b"\r\n\r\n", headers_start)?;
        let content_start = headers_end + 4;
        let next = find(body, next_delim.as_bytes(), content_start)?;
        let headers = &body[headers_start..headers_end];
        // `name="model"`, and the spellings a lenient parser upstream also takes as it
        // (`name=model`, `NAME = "model"`): a part the gateway did not see as `model` must
        // not be one upstream.
        let is_field = headers.split(|b| *b == b'\n').any(|line| {
            let line = String::from_utf8_lossy(line).to_ascii_lowercase();
            line.starts_with("content-disposition:")
                && line.split(';').skip(1).any(|p| {
                    p.split_once('=').is_some_and(|(k, v)| {
                        k.trim() == "name" && v.trim().trim_matches('"') == wanted
                    })
                })
        });
        at = Some(next + 2);
        if is_field {
            return Some(content_start..next);
        }
    })
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
    }

    #[test]
    fn adds_a_missing_field() {
        let body = Bytes::from_static(b"--B\r\nContent-Disposition: form-data; name=\"file\"; filename=\"x\"\r\n\r\nabc\r\n--B--\r\n");
        assert_eq!(field(&body, "B", "model"), None);
        let out = with_field(&body, "B", "model", "m");
        assert_eq!(field(&out, "B", "model").as_deref(), Some("m"));
        assert!(boundary(Some("application/json")).is_err());
    }
}
