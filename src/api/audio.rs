//! The length of an uploaded audio file (transcriptions, translations), read before the
//! request goes upstream: what a budget reserves for it, and what the ledger prices when the
//! upstream's answer does not say (`text`, `srt` and `vtt` answers carry no duration, nor do
//! Azure's `json` ones). Only the container is read (symphonia's format readers); no audio
//! is decoded.

use std::io::Cursor;
use std::sync::LazyLock;

use bytes::Bytes;
use symphonia::core::formats::probe::Hint;
use symphonia::core::formats::{FormatOptions, FormatReader, TrackType};
use symphonia::core::io::{MediaSourceStream, MediaSourceStreamOptions};
use symphonia::core::meta::MetadataOptions;
use symphonia::core::units::Duration;
use tokio::sync::Semaphore;

/// A file whose length cannot be read counts as this many bits a second: Opus's lowest
/// bitrate, below what any format the upstreams accept produces for speech (a length that
/// is only a bound is never used to price the ledger, only to reserve).
pub const FALLBACK_BITS_PER_SECOND: f64 = 6_000.0;

/// The most time one file's packets are read for: a file made to be slow to read (symphonia's
/// MP4 reader sums its sample tables again for every packet) is cut off and bounded by its
/// bytes instead. A real 25 MB recording takes about 50 ms.
const READ_FOR: std::time::Duration = std::time::Duration::from_millis(500);

/// The length of one upload's audio.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct AudioLength {
    /// Seconds, read from the file (the timestamps of its packets, else its header); `None`
    /// when no reader knew it. What the ledger prices when the upstream reports no length.
    pub seconds: Option<f64>,
    /// What a budget reserves for, in whole seconds (upstreams bill by the second): the most of
    /// the lengths the file's header and its packets state, else the file's bytes at
    /// `FALLBACK_BITS_PER_SECOND`. A body without a `file` part counts all of its bytes.
    pub bound_seconds: f64,
}

fn bytes_bound(bytes: usize) -> f64 {
    bytes as f64 * 8.0 / FALLBACK_BITS_PER_SECOND
}

/// Reads the length of the `file` parts of `body` (`files`: the ranges of all of them, as
/// an upstream that took the last would bill that one). On a blocking thread, a few at a
/// time: reading a file's packets takes about 2 ms per MB.
pub async fn measure(
    body: &Bytes,
    files: impl Iterator<Item = std::ops::Range<usize>>,
) -> AudioLength {
    static READERS: LazyLock<Semaphore> = LazyLock::new(|| {
        Semaphore::new(std::thread::available_parallelism().map_or(2, |n| n.get()))
    });
    let files: Vec<Bytes> = files.map(|r| body.slice(r)).collect();
    // No file read (none there, or a reader that panicked on some odd file): the whole body
    // counts by its bytes.
    let unread = AudioLength {
        seconds: None,
        bound_seconds: bytes_bound(body.len()).ceil(),
    };
    if files.is_empty() {
        return unread;
    }
    // The semaphore is never closed.
    let Ok(_permit) = READERS.acquire().await else {
        return unread;
    };
    let read = tokio::task::spawn_blocking(move || {
        files.into_iter().fold(
            AudioLength {
                seconds: Some(0.0),
                bound_seconds: 0.0,
            },
            |sum, file| {
                let one = length(file);
                AudioLength {
                    seconds: sum.seconds.zip(one.seconds).map(|(a, b)| a + b),
                    bound_seconds: sum.bound_seconds + one.bound_seconds,
                }
            },
        )
    })
    .await;
    match read {
        Ok(l) => AudioLength {
            seconds: l.seconds,
            bound_seconds: l.bound_seconds.ceil(),
        },
        Err(_) => unread,
    }
}

/// The length of one file: its packets read to the last one, since a header may state
/// anything; the header's figure when the packets say nothing or could not all be read in
/// `READ_FOR`.
pub fn length(file: Bytes) -> AudioLength {
    let bytes = file.len();
    let unknown = AudioLength {
        seconds: None,
        bound_seconds: bytes_bound(bytes),
    };
    let mss = MediaSourceStream::new(
        Box::new(Cursor::new(file)),
        MediaSourceStreamOptions::default(),
    );
    let Ok(mut format) = symphonia::default::get_probe().probe(
        &Hint::new(),
        mss,
        FormatOptions::default(),
        MetadataOptions::default(),
    ) else {
        return unknown;
    };
    let info = format.media_info();
    let stated = info
        .time_base
        .zip(info.duration)
        .and_then(|(tb, d)| tb.calc_duration(d))
        .or_else(|| {
            let t = format.default_track(TrackType::Audio)?;
            t.time_base
                .zip(t.duration)
                .and_then(|(tb, d)| tb.calc_duration(d))
        })
        .map(|t| t.as_secs_f64())
        .filter(|s| s.is_finite() && *s > 0.0);
    let (walked, complete) = from_packets(format.as_mut());
    let walked = walked.filter(|s| *s > 0.0);
    let seconds = if complete { walked.or(stated) } else { stated };
    let fallback = if complete || stated.is_some() {
        0.0
    } else {
        unknown.bound_seconds
    };
    AudioLength {
        seconds,
        bound_seconds: [stated, walked, Some(fallback)]
            .into_iter()
            .flatten()
            .fold(0.0, f64::max),
    }
}

/// The time from the first packet of the audio track to the end of its last (a recording cut
/// from a longer stream starts late; a browser's WebM starts a few ms before 0), and whether
/// every packet was read. Packets are read, not decoded.
fn from_packets(format: &mut dyn FormatReader) -> (Option<f64>, bool) {
    let Some(track) = format.default_track(TrackType::Audio) else {
        return (None, true);
    };
    let (id, Some(time_base)) = (track.id, track.time_base) else {
        return (None, true);
    };
    let deadline = std::time::Instant::now() + READ_FOR;
    let (mut first, mut end): (Option<i128>, i128) = (None, 0);
    let mut complete = true;
    for n in 0u64.. {
        // A read error ends the walk: what was read so far is the length (a recording cut
        // short is what the upstream will hear too).
        let Ok(Some(p)) = format.next_packet() else {
            break;
        };
        if p.track_id == id {
            let pts = i128::from(p.pts.get());
            first = Some(first.map_or(pts, |f| f.min(pts)));
            end = end.max(pts + i128::from(p.dur.get()));
        }
        if n % 256 == 255 && std::time::Instant::now() > deadline {
            complete = false;
            break;
        }
    }
    let span = end - first.unwrap_or(0).max(0);
    let seconds = u64::try_from(span)
        .ok()
        .filter(|s| *s > 0)
        .and_then(|s| time_base.calc_duration(Duration::new(s)))
        .map(|t| t.as_secs_f64())
        .filter(|s| s.is_finite());
    (seconds, complete)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A PCM WAV of `seconds` of silence, 16-bit mono at `rate`; `streamed` writes the
    /// lengths a recorder writes when it cannot seek back (0xFFFFFFFF).
    pub fn wav(seconds: f64, rate: u32, streamed: bool) -> Vec<u8> {
        let data_len = (seconds * f64::from(rate)) as u32 * 2;
        let (riff, data) = if streamed {
            (u32::MAX, u32::MAX)
        } else {
            (36 + data_len, data_len)
        };
        let mut w = Vec::new();
        w.extend_from_slice(b"RIFF");
        w.extend_from_slice(&riff.to_le_bytes());
        w.extend_from_slice(b"WAVEfmt ");
        w.extend_from_slice(&16u32.to_le_bytes());
        w.extend_from_slice(&1u16.to_le_bytes()); // PCM
        w.extend_from_slice(&1u16.to_le_bytes()); // mono
        w.extend_from_slice(&rate.to_le_bytes());
        w.extend_from_slice(&(rate * 2).to_le_bytes());
        w.extend_from_slice(&2u16.to_le_bytes());
        w.extend_from_slice(&16u16.to_le_bytes());
        w.extend_from_slice(b"data");
        w.extend_from_slice(&data.to_le_bytes());
        w.resize(w.len() + data_len as usize, 0);
        w
    }

    #[test]
    fn a_wav_gives_its_length() {
        let l = length(Bytes::from(wav(7.5, 16_000, false)));
        assert_eq!(l.seconds, Some(7.5));
        assert_eq!(l.bound_seconds, 7.5);
    }

    #[test]
    fn a_streamed_wav_is_read_to_its_last_packet() {
        let s = length(Bytes::from(wav(3.25, 8_000, true))).seconds.unwrap();
        // Packets are whole blocks: the last may run a little past the data.
        assert!((3.25..3.4).contains(&s), "{s}");
    }

    /// Files as ffmpeg writes them (tests/fixtures/audio): 3 s of a tone in the formats the
    /// upstreams take, a WebM written as a browser's recorder writes it (no length in its
    /// header; its first packet starts before 0), and 30 s of silence as a streamed FLAC
    /// (no length in its header, 3.5 kbit/s: below the fallback's bitrate, so only the
    /// packets tell).
    #[test]
    fn the_formats_the_upstreams_take_give_their_length() {
        for (file, want) in [
            ("tone.mp3", 3.0),
            ("tone.ogg", 3.0),
            ("tone.m4a", 3.0),
            ("recorded.webm", 3.0),
            ("silence-streamed.flac", 30.0),
        ] {
            let l = length(fixture(file));
            let s = l.seconds.unwrap_or(0.0);
            assert!((want - 0.05..want + 0.1).contains(&s), "{file}: {l:?}");
            assert!(l.bound_seconds >= s, "{file}: {l:?}");
        }
    }

    fn fixture(name: &str) -> Bytes {
        let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/audio");
        Bytes::from(std::fs::read(dir.join(name)).unwrap())
    }

    /// An MP3 whose Xing header says it holds 20 frames (0.6 s) is read to its last frame.
    #[test]
    fn a_header_that_claims_less_is_not_believed() {
        let mut mp3 = fixture("tone.mp3").to_vec();
        let at = mp3
            .windows(4)
            .position(|w| w == b"Xing" || w == b"Info")
            .expect("ffmpeg writes a Xing/Info header");
        assert_eq!(mp3[at + 7] & 1, 1, "the header has a frame count");
        mp3[at + 8..at + 12].copy_from_slice(&20u32.to_be_bytes());
        let l = length(Bytes::from(mp3));
        let s = l.seconds.unwrap_or(0.0);
        assert!((2.95..3.1).contains(&s), "{l:?}");
        assert!(l.bound_seconds >= s, "{l:?}");
    }

    #[test]
    fn bytes_that_are_no_audio_have_no_length() {
        assert_eq!(
            length(Bytes::from_static(b"hello, not audio at all")).seconds,
            None
        );
        assert_eq!(length(Bytes::new()).seconds, None);
    }

    fn part(name: &str, data: &[u8]) -> Vec<u8> {
        [
            format!(
                "--b\r\nContent-Disposition: form-data; name=\"{name}\"; filename=\"x\"\r\n\r\n"
            )
            .as_bytes(),
            data,
            b"\r\n",
        ]
        .concat()
    }

    /// The length of a form's `file` parts, read as the gateway reads a request's form.
    async fn measure_form(body: &Bytes) -> AudioLength {
        let parts = crate::api::multipart::form(body, "b").unwrap();
        let files = parts.into_iter().filter(|p| p.is("file")).map(|p| p.value);
        measure(body, files).await
    }

    #[tokio::test]
    async fn an_unreadable_file_is_bounded_by_its_bytes_and_every_file_counts() {
        let end = b"--b--\r\n";
        // 3,000 bytes at 6 kbit/s: 4 s.
        let body = Bytes::from(
            [
                part("file", &[7u8; 3000]),
                part("model", b"w"),
                end.to_vec(),
            ]
            .concat(),
        );
        let l = measure_form(&body).await;
        assert_eq!((l.seconds, l.bound_seconds), (None, 4.0));
        // Two files: both count (a WAV of 2.5 s, and the same again), rounded up as billed.
        let two = wav(2.5, 8_000, false);
        let body = Bytes::from([part("file", &two), part("file", &two), end.to_vec()].concat());
        let l = measure_form(&body).await;
        assert_eq!((l.seconds, l.bound_seconds), (Some(5.0), 5.0));
        let body = Bytes::from([part("file", &two), part("file", b"??"), end.to_vec()].concat());
        assert_eq!(measure_form(&body).await.seconds, None);
        // No part named `file` (a name the upstream may read otherwise): the whole body counts.
        let body = Bytes::from([part("File ", &[0u8; 7_500]), end.to_vec()].concat());
        let l = measure_form(&body).await;
        assert_eq!(l.seconds, None);
        assert!(l.bound_seconds >= 10.0, "{l:?}");
    }
}
