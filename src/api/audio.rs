//! The length of an uploaded audio file (transcriptions, translations), read before the
//! request goes upstream: what a budget reserves for it, and what the ledger prices when the
//! upstream's answer does not say (`json`, `text`, `srt` and `vtt` answers carry no duration).
//! Only the container is read (symphonia's format readers); no audio is decoded.

use std::io::Cursor;
use std::ops::Range;

use bytes::Bytes;
use symphonia::core::formats::probe::Hint;
use symphonia::core::formats::{FormatOptions, FormatReader, TrackType};
use symphonia::core::io::{MediaSourceStream, MediaSourceStreamOptions};
use symphonia::core::meta::MetadataOptions;
use symphonia::core::units::Duration;

use super::multipart;

/// A file whose length cannot be read counts as this many bits a second: Opus's lowest
/// bitrate, below what any format the upstreams accept produces for speech (a length that
/// is only a bound is never used to price the ledger, only to reserve).
pub const FALLBACK_BITS_PER_SECOND: f64 = 6_000.0;

/// The length of one upload's audio.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct AudioLength {
    /// Seconds, read from the file (its header, else the timestamps of its packets).
    pub seconds: Option<f64>,
    /// What a budget reserves for: `seconds`, else the file's bytes at
    /// `FALLBACK_BITS_PER_SECOND`; 0 without a `file` part.
    pub bound_seconds: f64,
}

/// The byte range of the `file` part of a multipart body.
pub fn file_range(body: &[u8], boundary: &str) -> Option<Range<usize>> {
    multipart::field_range(body, boundary, "file")
}

/// Reads the length of the `file` part of `body`. On a blocking thread: a file whose header
/// does not hold its length (a browser's WebM recording, a streamed WAV or FLAC) is read
/// packet by packet, ~2 ms per MB.
pub async fn measure(body: &Bytes, boundary: &str) -> AudioLength {
    let Some(range) = file_range(body, boundary) else {
        return AudioLength::default();
    };
    let file = body.slice(range);
    let bytes = file.len();
    let seconds = tokio::task::spawn_blocking(move || {
        // A reader that panics on some odd file must not take the request with it.
        std::panic::catch_unwind(move || seconds(file))
            .ok()
            .flatten()
    })
    .await
    .ok()
    .flatten();
    AudioLength {
        seconds,
        bound_seconds: seconds.unwrap_or(bytes as f64 * 8.0 / FALLBACK_BITS_PER_SECOND),
    }
}

/// The file's length in seconds, if a format reader knows the container.
pub fn seconds(file: Bytes) -> Option<f64> {
    let mss = MediaSourceStream::new(
        Box::new(Cursor::new(file)),
        MediaSourceStreamOptions::default(),
    );
    let mut format = symphonia::default::get_probe()
        .probe(
            &Hint::new(),
            mss,
            FormatOptions::default(),
            MetadataOptions::default(),
        )
        .ok()?;
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
        .map(|t| t.as_secs_f64());
    match stated {
        Some(s) if s.is_finite() && s > 0.0 => Some(s),
        _ => from_packets(format.as_mut()),
    }
}

/// The end of the last packet of the audio track: for containers whose header says nothing
/// of the length. Packets are read, not decoded.
fn from_packets(format: &mut dyn FormatReader) -> Option<f64> {
    let track = format.default_track(TrackType::Audio)?;
    let (id, time_base) = (track.id, track.time_base?);
    let mut end: i128 = 0;
    // A read error ends the walk: what was read so far is the length (a recording cut short
    // is what the upstream will hear too).
    while let Ok(Some(p)) = format.next_packet() {
        if p.track_id == id {
            end = end.max(i128::from(p.pts.get()) + i128::from(p.dur.get()));
        }
    }
    let end = u64::try_from(end).ok().filter(|e| *e > 0)?;
    let s = time_base.calc_duration(Duration::new(end))?.as_secs_f64();
    s.is_finite().then_some(s)
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
    fn a_wav_header_gives_its_length() {
        let s = seconds(Bytes::from(wav(7.5, 16_000, false))).unwrap();
        assert!((s - 7.5).abs() < 1e-9, "{s}");
    }

    #[test]
    fn a_streamed_wav_is_read_to_its_last_packet() {
        let s = seconds(Bytes::from(wav(3.25, 8_000, true))).unwrap();
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
        let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/audio");
        for (file, want) in [
            ("tone.mp3", 3.0),
            ("tone.ogg", 3.0),
            ("tone.m4a", 3.0),
            ("recorded.webm", 3.0),
            ("silence-streamed.flac", 30.0),
        ] {
            let bytes = std::fs::read(dir.join(file)).unwrap();
            let s = seconds(Bytes::from(bytes)).unwrap_or(0.0);
            assert!((want - 0.05..want + 0.1).contains(&s), "{file}: {s}");
        }
    }

    #[test]
    fn bytes_that_are_no_audio_have_no_length() {
        assert_eq!(
            seconds(Bytes::from_static(b"hello, not audio at all")),
            None
        );
        assert_eq!(seconds(Bytes::new()), None);
    }

    #[tokio::test]
    async fn an_unreadable_file_is_bounded_by_its_bytes() {
        let body = Bytes::from(
            [
                &b"--b\r\nContent-Disposition: form-data; name=\"file\"; filename=\"x.bin\"\r\n\r\n"[..],
                &[7u8; 3000],
                b"\r\n--b\r\nContent-Disposition: form-data; name=\"model\"\r\n\r\nwhisper\r\n--b--\r\n",
            ]
            .concat(),
        );
        let len = measure(&body, "b").await;
        assert_eq!(len.seconds, None);
        assert!((len.bound_seconds - 4.0).abs() < 1e-9, "{len:?}");
        assert_eq!(
            measure(&Bytes::from_static(b"--b--\r\n"), "b").await,
            AudioLength::default()
        );
    }
}
