//! What an upstream's messages must not carry to a client: its key and its address
//! (PRODUCT.md: upstream errors keep the upstream's message, never its key or URL).

/// The strings to blank out, longest first: the key as written; the configured URL, its
/// `host:port` and its host in any case (hosts are case-insensitive), unless the host is a
/// single word (a service name such as `vllm`, which would blank that word out of any
/// message). Each is found only as a whole token, not inside a longer one: `127.0.0.1` is
/// not blanked out of `127.0.0.10`.
#[derive(Debug, Default)]
pub struct Scrub {
    /// (what, whether it is matched in any case; then `what` is lower case).
    items: Vec<(Vec<u8>, bool)>,
}

const BLANK: &[u8] = b"***";

impl Scrub {
    pub fn new(key: Option<&str>, base: &str) -> Scrub {
        let mut items: Vec<(Vec<u8>, bool)> = key
            .map(|k| (k.as_bytes().to_vec(), false))
            .into_iter()
            .collect();
        let mut address = vec![base.to_string()];
        if let Ok(uri) = base.parse::<http::Uri>() {
            if let Some(authority) = uri.authority() {
                address.push(authority.as_str().to_string());
            }
            if let Some(host) = uri.host().filter(|h| h.contains(['.', ':', '['])) {
                address.push(host.to_string());
            }
        }
        items.extend(
            address
                .into_iter()
                .map(|a| (a.to_ascii_lowercase().into_bytes(), true)),
        );
        items.retain(|(s, _)| s.len() >= 4);
        items.sort_by_key(|(s, _)| std::cmp::Reverse(s.len()));
        items.dedup();
        Scrub { items }
    }

    /// `text` with every item blanked out, or `None` when it holds none.
    pub fn bytes(&self, text: &[u8]) -> Option<Vec<u8>> {
        // A first look, with one lowered copy for every address: most texts hold none.
        let lowered = self
            .items
            .iter()
            .any(|(_, any_case)| *any_case)
            .then(|| text.to_ascii_lowercase());
        let holds_any = self.items.iter().any(|(what, any_case)| {
            let hay = match (&lowered, any_case) {
                (Some(l), true) => &l[..],
                _ => text,
            };
            memchr::memmem::find(hay, what).is_some()
        });
        if !holds_any {
            return None;
        }
        let mut out: Option<Vec<u8>> = None;
        for (what, any_case) in &self.items {
            let current = out.as_deref().unwrap_or(text);
            if let Some(done) = blank_out(current, what, *any_case) {
                out = Some(done);
            }
        }
        out
    }

    /// `bytes` for a string.
    pub fn text(&self, text: &str) -> Option<String> {
        // ASCII replaced by ASCII (an ASCII byte never falls inside a UTF-8 sequence).
        self.bytes(text.as_bytes())
            .map(|b| String::from_utf8_lossy(&b).into_owned())
    }

    /// Whether `text` holds any item anywhere (addresses in any case, whole token or not),
    /// without allocating: for short texts such as header values.
    pub fn found_in(&self, text: &[u8]) -> bool {
        self.items.iter().any(|(what, any_case)| {
            if *any_case {
                text.windows(what.len())
                    .any(|w| w.eq_ignore_ascii_case(what))
            } else {
                memchr::memmem::find(text, what).is_some()
            }
        })
    }

    pub fn is_empty(&self) -> bool {
        self.items.is_empty()
    }
}

/// Whether `b` would continue a token after it: a letter, a digit, `_` (before it, `.` and
/// `-` too, which continue addresses and keys).
fn continues(b: u8) -> bool {
    b.is_ascii_alphanumeric() || b == b'_'
}

/// `text` with each whole-token occurrence of `what` replaced by `***`, if any.
fn blank_out(text: &[u8], what: &[u8], any_case: bool) -> Option<Vec<u8>> {
    let lowered;
    let hay = if any_case {
        lowered = text.to_ascii_lowercase();
        &lowered[..]
    } else {
        text
    };
    let mut out: Option<Vec<u8>> = None;
    let mut copied = 0;
    for at in memchr::memmem::find_iter(hay, what) {
        let end = at + what.len();
        if at < copied {
            continue;
        }
        // A key goes wherever it is (after `%20`, inside a longer token); an address only
        // as a whole token (`127.0.0.1` is not blanked out of `127.0.0.10`).
        let before_ok = at == 0 || !(continues(hay[at - 1]) || matches!(hay[at - 1], b'.' | b'-'));
        let after_ok = end == hay.len() || !continues(hay[end]);
        if any_case && !(before_ok && after_ok) {
            continue;
        }
        let o = out.get_or_insert_with(|| Vec::with_capacity(text.len()));
        o.extend_from_slice(&text[copied..at]);
        o.extend_from_slice(BLANK);
        copied = end;
    }
    let mut o = out?;
    o.extend_from_slice(&text[copied..]);
    Some(o)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn whole_tokens_only_hosts_in_any_case() {
        let s = Scrub::new(Some("sk-secret-key"), "http://LocalHost.example:22103/v1");
        let t = |x: &str| s.text(x).unwrap_or_else(|| x.to_string());
        assert_eq!(
            t("bad key sk-secret-key for http://localhost.example:22103/v1/chat"),
            "bad key *** for ***/chat"
        );
        assert_eq!(t("LOCALHOST.EXAMPLE refused"), "*** refused");
        assert_eq!(t("localhost.example:22103."), "***.");
        // A key inside a longer token goes too (`%20` before it, as in an echoed header);
        // an address does not.
        assert_eq!(t("sk-secret-keys"), "***s");
        assert_eq!(t("Bearer%20sk-secret-key%0A"), "Bearer%20***%0A");
        assert_eq!(t("a.localhost.example"), "a.localhost.example");
        let ip = Scrub::new(None, "http://127.0.0.1:22101/v1");
        let t = |x: &str| ip.text(x).unwrap_or_else(|| x.to_string());
        assert_eq!(
            t("peer 127.0.0.10 and 127.0.0.1:221010 and 1127.0.0.1 but 127.0.0.1"),
            "peer 127.0.0.10 and ***:221010 and 1127.0.0.1 but ***"
        );
        assert_eq!(ip.text("nothing here"), None);
        assert!(ip.found_in(b"x127.0.0.1:22101") && !ip.found_in(b"application/json"));
        assert!(s.found_in(b"attachment; filename=\"sk-secret-key.json\""));
        assert!(s.found_in(b"LOCALHOST.example") && !s.found_in(b"sk-secret"));
        // A one-word host alone is left in messages; with its port it goes.
        let svc = Scrub::new(None, "http://vllm:8000/v1");
        assert_eq!(
            svc.text("vllm at vllm:8000 is down").as_deref(),
            Some("vllm at *** is down")
        );
    }
}
