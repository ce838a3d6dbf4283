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
    let mut found: Option<String> = None;
    for p in parts {
        // A parameter's name in any case, spaces around `=` (RFC 2045).
        let Some((k, v)) = p.split_once('=') else {
            continue;
        };
        let k = k.trim();
        // `boundary*=` (RFC 2231) is read by some parsers before or instead of `boundary=`.
        if k.len() > 8
            && k.get(..8)
                .is_some_and(|p| p.eq_ignore_ascii_case("boundary"))
        {
            return Err(GatewayError::invalid_request(format!(
                "multipart/form-data with a `{k}` parameter: give the boundary as boundary="
            )));
        }
        if k.eq_ignore_ascii_case("boundary") {
            let v = v.trim().trim_matches('"');
            // Parsers differ on which of two they take: one only.
            if found.is_some() {
                return Err(GatewayError::invalid_request(
                    "multipart/form-data with two boundaries",
                ));
            }
            if !v.is_empty() {
                found = Some(v.to_string());
            }
        }
    }
    found.ok_or_else(|| GatewayError::invalid_request("multipart/form-data without a boundary"))
}

/// Every part of a form, read strictly: each delimiter line is the boundary followed by a
/// line break (or `--`, the closing one), each part's headers are lines ending in CRLF,
/// none folded, ended by a blank line before the next delimiter, no part name split into
/// RFC 2231 continuations (`name*0=`), and the form ends with its closing delimiter. A form
/// that is not so could be read one way here and another way by a lenient parser upstream
/// (a second `model` hidden in a part the gateway merged with another, say): refused.
pub fn form(body: &[u8], boundary: &str) -> Result<Vec<Part>, GatewayError> {
    let bad = |why: &str| {
        Err(GatewayError::invalid_request(format!(
            "the form is not well-formed multipart/form-data: {why}"
        )))
    };
    let delim = format!("--{boundary}");
    let Some(first) = find(body, delim.as_bytes(), 0) else {
        return bad("no boundary line");
    };
    if first != 0 && !body[..first].ends_with(b"\r\n") {
        return bad("the first boundary does not start a line");
    }
    let next_delim = format!("\r\n{delim}");
    let mut out = Vec::new();
    let mut at = first + delim.len();
    loop {
        if body[at..].starts_with(b"--") {
            return Ok(out);
        }
        // RFC 2046's transport padding: spaces or tabs before the line break.
        while matches!(body.get(at), Some(b' ' | b'\t')) {
            at += 1;
        }
        if !body[at..].starts_with(b"\r\n") {
            return bad("a boundary line with more after the boundary");
        }
        let Some(next) = find(body, next_delim.as_bytes(), at) else {
            return bad("no closing boundary");
        };
        // The blank line, then the value (empty or not), then the next delimiter.
        let Some(headers_end) = find(body, b"\r\n\r\n", at).filter(|e| e + 4 <= next) else {
            return bad("a part whose headers do not end with a blank line");
        };
        let headers = body.get(at + 2..headers_end).unwrap_or_default();
        // Each line `Name: value`, the name without spaces (RFC 9112 5.1: a parser may read
        // `Content-Disposition : …` as the header, or not); none folded.
        let lines_ok = headers.is_empty()
            || headers.split(|b| *b == b'\n').all(|l| {
                let l = l.strip_suffix(b"\r").unwrap_or(l);
                let named = memchr::memchr(b':', l)
                    .is_some_and(|c| c > 0 && !l[..c].iter().any(|b| b.is_ascii_whitespace()));
                named && !l.contains(&b'\r')
            }) && memchr::memchr_iter(b'\n', headers).all(|i| i > 0 && headers[i - 1] == b'\r');
        if !lines_ok {
            return bad(
                "a part header that is folded, has a space before its colon or ends in a bare line break",
            );
        }
        let (names, file, continued) = disposition(headers);
        if continued {
            return bad("a part name in RFC 2231 continuations (name*0=)");
        }
        out.push(Part {
            names,
            file,
            value: headers_end + 4..next,
        });
        at = next + next_delim.len();
    }
}

fn find(hay: &[u8], needle: &[u8], from: usize) -> Option<usize> {
    memchr::memmem::find(hay.get(from..)?, needle).map(|i| i + from)
}

/// One part of a form: its names (lowercase; usually one, but a parser upstream may take
/// any a disposition gives), whether it is a file, and its value's range.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Part {
    pub names: Vec<String>,
    pub file: bool,
    pub value: Range<usize>,
}

impl Part {
    /// Its (first) name; empty for a part without one.
    pub fn name(&self) -> &str {
        self.names.first().map_or("", String::as_str)
    }

    /// Whether the part is named `name` (lowercase), by any of its names.
    pub fn is(&self, name: &str) -> bool {
        self.names.iter().any(|n| n == name)
    }
}

/// A part's name and whether it names a file, from its `Content-Disposition`. Every
/// spelling a lenient parser upstream also takes counts (`name=model`, `NAME = "model"`,
/// RFC 5987's `name*=UTF-8''model`): a part the gateway did not see as `model` must not be
/// one upstream.
/// Also whether a name is split into RFC 2231 continuations (`name*0=`), which none of them
/// is read as.
fn disposition(headers: &[u8]) -> (Vec<String>, bool, bool) {
    let mut names = Vec::new();
    let mut file = false;
    let mut continued = false;
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
                k if k.starts_with("name*") => continued = true,
                _ => {}
            }
        }
    }
    (names, file, continued)
}

/// The text of a field's value at `range`.
pub fn text(body: &[u8], range: Range<usize>) -> String {
    String::from_utf8_lossy(&body[range]).trim().to_string()
}

/// The body with field `name` set to `value`: replaced in place at `at` (its value's range,
/// from `form`), or added as the first part.
pub fn with_field(
    body: &Bytes,
    boundary: &str,
    at: Option<Range<usize>>,
    name: &str,
    value: &str,
) -> Bytes {
    match at {
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

    /// The values of the parts named `name`, as text.
    fn values(body: &[u8], boundary: &str, name: &str) -> Vec<String> {
        form(body, boundary)
            .unwrap()
            .into_iter()
            .filter(|p| p.is(name))
            .map(|p| text(body, p.value))
            .collect()
    }

    /// The range of the first part named `name`.
    fn at(body: &[u8], boundary: &str, name: &str) -> Option<Range<usize>> {
        let parts = form(body, boundary).unwrap();
        parts.into_iter().find(|p| p.is(name)).map(|p| p.value)
    }

    const BODY: &[u8] = b"--XyZ\r\nContent-Disposition: form-data; name=\"file\"; filename=\"a.wav\"\r\nContent-Type: audio/wav\r\n\r\nRIFF\x00\x01\r\n--XyZ\r\nContent-Disposition: form-data; name=\"model\"\r\n\r\nwhisper\r\n--XyZ--\r\n";

    #[test]
    fn reads_and_replaces_the_model() {
        assert_eq!(
            boundary(Some("multipart/form-data; boundary=XyZ")).unwrap(),
            "XyZ"
        );
        assert_eq!(values(BODY, "XyZ", "model"), ["whisper"]);
        let model = at(BODY, "XyZ", "model");
        let out = with_field(
            &Bytes::from_static(BODY),
            "XyZ",
            model,
            "model",
            "whisper-dep",
        );
        assert_eq!(values(&out, "XyZ", "model"), ["whisper-dep"]);
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
        assert_eq!(values(body, "B", "model"), ["whisper", "gpt-4o", "o1"]);
        let body = b"--B\r\nContent-Disposition: form-data; name*=UTF-8''mo%64el\r\n\r\nx\r\n\
            --B\r\nContent-Disposition: form-data; name*=utf-8'en'image%5B%5D; filename=\"a.png\"\r\n\r\ny\r\n--B--\r\n";
        let all: Vec<(String, bool)> = form(body, "B")
            .unwrap()
            .into_iter()
            .map(|p| (p.name().to_string(), p.file))
            .collect();
        assert_eq!(
            all,
            [("model".to_string(), false), ("image[]".to_string(), true)]
        );
    }

    /// What a lenient parser could read otherwise is refused; a well-formed form (a
    /// preamble, an empty value, a part without headers) is read.
    #[test]
    fn a_form_is_read_strictly() {
        let ok =
            b"preamble\r\n--B \t\r\nContent-Disposition: form-data; name=\"model\"\r\n\r\nm\r\n\
            --B\r\nContent-Disposition: form-data; name=\"empty\"\r\n\r\n\r\n\
            --B\r\n\r\nno headers\r\n--B--\r\nepilogue";
        let parts = form(ok, "B").unwrap();
        let got: Vec<(&str, &[u8])> = parts
            .iter()
            .map(|p| (p.name(), &ok[p.value.clone()]))
            .collect();
        assert_eq!(
            got,
            [("model", &b"m"[..]), ("empty", b""), ("", b"no headers")]
        );
        for bad in [
            // Headers ended by a bare LF: merged with the next part here, two parts there.
            &b"--B\r\nContent-Disposition: form-data; name=\"a\"\n\nx\r\n--B\r\nContent-Disposition: form-data; name=\"model\"\r\n\r\ny\r\n--B--"[..],
            // No closing delimiter.
            b"--B\r\nContent-Disposition: form-data; name=\"model\"\r\n\r\ny\r\n--B\r\nContent-Disposition: form-data; name=\"model\"\r\n\r\nz",
            // A folded header line.
            b"--B\r\nContent-Disposition: form-data;\r\n name=\"model\"\r\n\r\ny\r\n--B--",
            // RFC 2231 continuations.
            b"--B\r\nContent-Disposition: form-data; name*0=\"mo\"; name*1=\"del\"\r\n\r\ny\r\n--B--",
            // A line that starts with the boundary and goes on.
            b"--B\r\nContent-Disposition: form-data; name=\"a\"\r\n\r\nx\r\n--Bogus\r\n--B--",
            // A space before a header's colon: `Content-Disposition` to some parsers.
            b"--B\r\nContent-Disposition : form-data; name=\"model\"\r\n\r\ny\r\n--B--",
            // Headers running into the next delimiter.
            b"--B\r\nContent-Disposition: form-data; name=\"a\"\r\n\r\n--B--",
        ] {
            assert!(form(bad, "B").is_err(), "{}", String::from_utf8_lossy(bad));
        }
        assert!(boundary(Some("multipart/form-data; boundary=A; boundary=B")).is_err());
        assert!(boundary(Some("multipart/form-data; boundary=A; boundary*=utf-8''B")).is_err());
        assert!(boundary(Some("multipart/form-data; boundaré=A; boundary=B")).is_ok());
    }

    #[test]
    fn adds_a_missing_field() {
        let body = Bytes::from_static(b"--B\r\nContent-Disposition: form-data; name=\"file\"; filename=\"x\"\r\n\r\nabc\r\n--B--\r\n");
        assert_eq!(at(&body, "B", "model"), None);
        let out = with_field(&body, "B", None, "model", "m");
        assert_eq!(values(&out, "B", "model"), ["m"]);
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
