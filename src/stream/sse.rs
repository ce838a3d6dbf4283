//! Where SSE events end and what their `data:` is, by the rule the SDKs' decoders follow:
//! a line ends in `\r\n`, `\n` or `\r`, and an empty line ends an event. One rule for the
//! re-framing towards the client, the ledger's usage reading and the cache's events, so
//! they never disagree on where an event ends (an upstream that ends lines in `\r` alone,
//! or mixes endings, is read as the client reads it).
//!
//! A buffer is taken to start at the start of a line (after an event's end). A `\r` that
//! ends a buffer is taken as a whole line end; should a `\n` follow in the next read, it
//! reads as one more empty line there, which ends no event with any data.

use std::borrow::Cow;

/// Where the line end that starts at `t` (a `\r` or `\n`) stops: past `\r\n`, else past the
/// one byte.
fn after_line_end(buf: &[u8], t: usize) -> usize {
    if buf[t] == b'\r' && buf.get(t + 1) == Some(&b'\n') {
        t + 2
    } else {
        t + 1
    }
}

/// Ends (exclusive) of the events in `buf`: each just past the empty line that ends it.
pub fn event_ends(buf: &[u8]) -> Vec<usize> {
    let mut ends = Vec::new();
    let mut line_start = 0;
    let mut from = 0;
    while let Some(at) = memchr::memchr2(b'\n', b'\r', &buf[from..]) {
        let t = from + at;
        let next = after_line_end(buf, t);
        if t == line_start {
            ends.push(next);
        }
        line_start = next;
        from = next;
    }
    ends
}

/// Whether an empty line ends just before `p` (`0 < p <= buf.len()`): the line end that
/// stops at `p` comes right after another line end, or at the buffer's start.
fn empty_line_ends_at(buf: &[u8], p: usize) -> bool {
    let start = match buf[p - 1] {
        b'\n' if p >= 2 && buf[p - 2] == b'\r' => p - 2,
        b'\n' => p - 1,
        // A `\r` directly followed by `\n` is the first half of one line end, not a whole one.
        b'\r' if buf.get(p) != Some(&b'\n') => p - 1,
        _ => return false,
    };
    start == 0 || matches!(buf[start - 1], b'\n' | b'\r')
}

/// The index just past the last event's end in `buf`, if any: found from the back, so a
/// buffer of whole events (the usual read) costs a look at its last bytes.
pub fn last_event_end(buf: &[u8]) -> Option<usize> {
    last_event_end_after(buf, 0)
}

/// `last_event_end`, looking only at line ends from `from` on: a buffer whose first `from`
/// bytes were looked at before (and held no end) is not read again.
pub fn last_event_end_after(buf: &[u8], from: usize) -> Option<usize> {
    // The usual read: whole events, the last ending the buffer (looked at without a search).
    let len = buf.len();
    let from = from.min(len);
    if len > from && matches!(buf[len - 1], b'\n' | b'\r') && empty_line_ends_at(buf, len) {
        return Some(len);
    }
    let mut upto = len;
    while let Some(at) = memchr::memrchr2(b'\n', b'\r', &buf[from..upto]) {
        let at = from + at;
        if empty_line_ends_at(buf, at + 1) {
            return Some(at + 1);
        }
        upto = at;
    }
    None
}

/// Whether an event is named `name` by an `event:` line (a space after the colon or not).
pub fn is_named(event: &[u8], name: &[u8]) -> bool {
    lines(event).any(|line| {
        line.strip_prefix(b"event:")
            .is_some_and(|n| n.trim_ascii() == name)
    })
}

/// The lines of an event, without their line ends.
pub fn lines(event: &[u8]) -> impl Iterator<Item = &[u8]> {
    let mut rest = event;
    std::iter::from_fn(move || {
        if rest.is_empty() {
            return None;
        }
        match memchr::memchr2(b'\n', b'\r', rest) {
            Some(t) => {
                let line = &rest[..t];
                rest = &rest[after_line_end(rest, t)..];
                Some(line)
            }
            None => {
                let line = rest;
                rest = &[];
                Some(line)
            }
        }
    })
}

/// An event's `data:` lines (one space after each colon dropped), joined by `\n` when there
/// are several, borrowed when there is one (the usual case); `None` without any. `[DONE]`
/// included (the SDKs tell it by this data starting with it).
pub fn joined_data(event: &[u8]) -> Option<Cow<'_, [u8]>> {
    let mut data: Option<Cow<'_, [u8]>> = None;
    for line in lines(event) {
        if let Some(d) = line.strip_prefix(b"data:") {
            let d = d.strip_prefix(b" ").unwrap_or(d);
            data = Some(match data {
                Some(prev) => {
                    let mut joined = prev.into_owned();
                    joined.push(b'\n');
                    joined.extend_from_slice(d);
                    Cow::Owned(joined)
                }
                None => Cow::Borrowed(d),
            });
        }
    }
    data
}

/// The data of a stream's events up to its `[DONE]` (events without data, or with empty
/// data, left out); `done` is set when the `[DONE]` came. What follows it no client reads.
pub fn data_until_done<'a>(
    events: &'a [bytes::Bytes],
    done: &'a mut bool,
) -> impl Iterator<Item = Cow<'a, [u8]>> + 'a {
    events
        .iter()
        .filter_map(|e| joined_data(e))
        .take_while(move |d| {
            *done = d.starts_with(b"[DONE]");
            !*done
        })
        .filter(|d| !d.is_empty())
}

/// An event's data (`joined_data`); `None` without data, or for `[DONE]`.
pub fn event_data(event: &[u8]) -> Option<Cow<'_, [u8]>> {
    joined_data(event).filter(|d| !d.is_empty() && !d.starts_with(b"[DONE]"))
}

/// Whether the last event of a chunk of whole events is the stream's `[DONE]`: the stream
/// is complete for its client (the SDKs stop reading there), whenever the upstream's body
/// ends.
pub fn ends_with_done(chunk: &[u8]) -> bool {
    let text = chunk.trim_ascii_end();
    // Most chunks end with a JSON's `}`, the `[DONE]` event with itself: told at once.
    if text.ends_with(b"}") {
        return false;
    }
    if text.ends_with(b"[DONE]") {
        let start = memchr::memrchr2(b'\n', b'\r', text).map_or(0, |i| i + 1);
        if text[start..]
            .strip_prefix(b"data:")
            .is_some_and(|d| d.trim_ascii_start().starts_with(b"[DONE]"))
        {
            return true;
        }
    }
    // Other lines after the data (`id:`, `retry:`, a comment): the last event read whole.
    let ends = event_ends(chunk);
    let last = match ends.as_slice() {
        [.., before, _] => &chunk[*before..],
        _ => chunk,
    };
    joined_data(last).is_some_and(|d| d.starts_with(b"[DONE]"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ends_by_every_line_ending() {
        let chunk = b"data: {\"a\":1}\n\n: ping\n\ndata: [DONE]\n\n";
        assert_eq!(event_ends(chunk), vec![15, 23, 37]);
        assert_eq!(
            event_ends(b"data: 1\r\n\r\ndata: 2\n\n\r\n\r\nx"),
            vec![11, 20, 22, 24]
        );
        // Bare CR, and mixes: LF then CRLF, CRLF then LF, LF then CR, CR then CRLF.
        assert_eq!(event_ends(b"data: 1\r\rdata: 2\r\r"), vec![9, 18]);
        assert_eq!(event_ends(b"data: 1\n\r\n"), vec![10]);
        assert_eq!(event_ends(b"data: 1\r\n\n"), vec![10]);
        assert_eq!(event_ends(b"data: 1\n\rdata: 2\n\n"), vec![9, 18]);
        assert_eq!(event_ends(b"data: 1\r\r\n"), vec![10]);
        assert!(event_ends(b"data: 1\ndata: 2\n").is_empty());
        assert!(event_ends(b"data: 1\r\ndata: 2\r\n").is_empty());
        assert_eq!(event_ends(b"\n"), vec![1]);
    }

    #[test]
    fn last_end_agrees_with_the_forward_scan() {
        assert_eq!(last_event_end(b"data: a\n\ndata: b"), Some(9));
        assert_eq!(last_event_end(b"data: a\r\n\r\n"), Some(11));
        assert_eq!(last_event_end(b"data: a\n"), None);
        assert_eq!(last_event_end(b"data: a\r\n"), None);
        assert_eq!(last_event_end(b"data: a\r"), None);
        assert_eq!(last_event_end(b": ping\n\ndata: x\n\n"), Some(17));
        // Every buffer of these bytes up to length 7: both scans find the same last end.
        let alphabet = [b'a', b'\n', b'\r'];
        let mut buf = Vec::new();
        for len in 1..=7u32 {
            for mut n in 0..3usize.pow(len) {
                buf.clear();
                for _ in 0..len {
                    buf.push(alphabet[n % 3]);
                    n /= 3;
                }
                let forward = event_ends(&buf).last().copied();
                assert_eq!(last_event_end(&buf), forward, "{buf:?}");
                // Looked at in two parts (the first held no end): the same.
                for cut in 0..buf.len() {
                    if event_ends(&buf[..cut]).is_empty() {
                        let from = cut.saturating_sub(2);
                        assert_eq!(last_event_end_after(&buf, from), forward, "{buf:?} {cut}");
                    }
                }
            }
        }
    }

    #[test]
    fn data_of_events() {
        let split = b"event: x\r\ndata: {\"a\":\r\ndata: [2]}\r\n\r\n";
        assert_eq!(&*event_data(split).unwrap(), b"{\"a\":\n[2]}");
        assert_eq!(
            &*event_data(b"data:{\"a\":\rdata:1}\r\r").unwrap(),
            b"{\"a\":\n1}"
        );
        assert!(matches!(
            event_data(b"data: {\"a\":1}\n\n"),
            Some(Cow::Borrowed(b"{\"a\":1}"))
        ));
        assert!(event_data(b": ping\n\n").is_none());
        assert!(event_data(b"data: [DONE]\r\r").is_none());
        assert!(joined_data(b"data:[DONE]\r\r").is_some_and(|d| d.starts_with(b"[DONE]")));
        assert!(ends_with_done(b"data: {}\n\ndata: [DONE]\n\n"));
        assert!(ends_with_done(b"data:[DONE]\r\r"));
        assert!(!ends_with_done(b"data: {\"a\":\"[DONE]\"}\n\n"));
        assert!(!ends_with_done(b": [DONE]\n\n"));
        assert!(ends_with_done(
            b"data: {}\n\ndata: [DONE]\nid: 7\n: bye\n\n"
        ));
        assert!(ends_with_done(b"data: [DONE]\r\nretry: 3000\r\n\r\n"));
        assert!(!ends_with_done(b"data: [DONE]\n\nid: 8\n\n"));
        assert!(!ends_with_done(b"data: [DONE]\n\ndata: {}\n\n"));
        assert!(joined_data(b": ping\n\n").is_none());
        assert_eq!(
            lines(b"a\rb\r\nc\nd").collect::<Vec<_>>(),
            [&b"a"[..], b"b", b"c", b"d"]
        );
    }
}
