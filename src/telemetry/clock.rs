//! When a connection's bytes came and went, for `switchyard_overhead_seconds` and the
//! request's duration. Both ends of the gateway's own time are taken at its sockets:
//!
//! - a request starts at the last read before it was handed to the gateway (`Arrivals`, on
//!   the client's connection): the read that completed its head, so parsing it counts, and
//!   a client slow to send its head does not;
//! - the upstream's share is from the request's last byte written to the answer's first byte
//!   read (`Exchange`, on a pooled upstream connection), so building the upstream request,
//!   the connection pool and the client's parsing of the answer count as the gateway's too.
//!   On a connection made for the request, its setup (TCP, TLS) is the upstream's share.
//!
//! Each stamp is one clock read where it is taken; nothing here allocates per request.

use std::io;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, LazyLock};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use hyper_util::client::legacy::connect::{Connected, Connection};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

static BASE: LazyLock<Instant> = LazyLock::new(Instant::now);

/// Now, as nanoseconds since `BASE`, plus one (0 means "not taken").
fn stamp() -> u64 {
    u64::try_from(BASE.elapsed().as_nanos()).unwrap_or(u64::MAX - 1) + 1
}

fn instant(stamp: u64) -> Instant {
    *BASE + Duration::from_nanos(stamp - 1)
}

/// What a clocked connection tells its clock.
pub trait Clock {
    /// Bytes were read.
    fn read(&self);
    /// Bytes were written.
    fn wrote(&self);
}

/// A client connection's clock: when the bytes of the request being waited for were last
/// read.
#[derive(Debug, Default)]
pub struct Arrivals {
    /// 0: waiting for a request, nothing read yet; `SERVING`: a request is being served
    /// (what is read now is its body); else the stamp of the latest read.
    at: AtomicU64,
}

const SERVING: u64 = u64::MAX;

impl Arrivals {
    /// When the request now handed to the gateway was read (`None` when its bytes came in
    /// with the previous request's). What is read from here on is its own.
    pub fn take(&self) -> Option<Instant> {
        match self.at.swap(SERVING, Relaxed) {
            0 | SERVING => None,
            s => Some(instant(s)),
        }
    }

    /// The answer is done: the next bytes read begin the next request.
    pub fn done(&self) {
        self.at.store(0, Relaxed);
    }
}

impl Clock for Arrivals {
    fn read(&self) {
        if self.at.load(Relaxed) != SERVING {
            self.at.store(stamp(), Relaxed);
        }
    }

    fn wrote(&self) {}
}

/// An upstream connection's clock: its last write and the first read after it. On an
/// HTTP/1 connection (one request at a time) that is the upstream's own time for the request
/// whose answer has just begun.
#[derive(Debug)]
pub struct Exchange {
    made: Instant,
    wrote: AtomicU64,
    answered: AtomicU64,
}

impl Default for Exchange {
    fn default() -> Self {
        Exchange {
            made: Instant::now(),
            wrote: AtomicU64::new(0),
            answered: AtomicU64::new(0),
        }
    }
}

impl Exchange {
    /// From the request's last byte written to the answer's first byte read, once both are;
    /// `None` on a connection made after `sent` (the request was sent), whose setup is the
    /// upstream's time too.
    pub fn wait(&self, sent: Instant) -> Option<Duration> {
        let (w, a) = (self.wrote.load(Relaxed), self.answered.load(Relaxed));
        (self.made < sent && w != 0 && a >= w).then(|| Duration::from_nanos(a - w))
    }
}

impl Clock for Exchange {
    fn read(&self) {
        if self.answered.load(Relaxed) == 0 {
            self.answered.store(stamp(), Relaxed);
        }
    }

    fn wrote(&self) {
        self.wrote.store(stamp(), Relaxed);
        self.answered.store(0, Relaxed);
    }
}

/// An upstream connection's `Exchange`, as the upstream client hands it on with each answer
/// (an extension of the response; taken off an HTTP/2 answer, whose connection interleaves).
#[derive(Debug, Clone)]
pub struct UpstreamClock(pub Arc<Exchange>);

/// An I/O stream that tells its clock when bytes come and go.
pub struct Clocked<T, C> {
    inner: T,
    clock: Arc<C>,
}

impl<T, C> Clocked<T, C> {
    pub fn new(inner: T, clock: Arc<C>) -> Self {
        Clocked { inner, clock }
    }
}

impl<T, C: Clock> Clocked<T, C> {
    /// Tells the clock of a write that wrote something; passes its result on.
    fn told(&self, r: Poll<io::Result<usize>>) -> Poll<io::Result<usize>> {
        if matches!(r, Poll::Ready(Ok(n)) if n > 0) {
            self.clock.wrote();
        }
        r
    }
}

impl<T: AsyncRead + Unpin, C: Clock> AsyncRead for Clocked<T, C> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let before = buf.filled().len();
        let r = Pin::new(&mut self.inner).poll_read(cx, buf);
        if buf.filled().len() > before {
            self.clock.read();
        }
        r
    }
}

impl<T: AsyncWrite + Unpin, C: Clock> AsyncWrite for Clocked<T, C> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let r = Pin::new(&mut self.inner).poll_write(cx, buf);
        self.told(r)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let r = Pin::new(&mut self.inner).poll_write_vectored(cx, bufs);
        self.told(r)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

/// The upstream client learns the clock of the connection an answer came on with it (in
/// the answer's extensions; the only extra, so no `HttpInfo` is boxed for every answer).
impl Connection for Clocked<tokio::net::TcpStream, Exchange> {
    fn connected(&self) -> Connected {
        Connected::new().extra(UpstreamClock(self.clock.clone()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_arrival_is_the_last_read_before_the_request_and_body_reads_do_not_move_it() {
        let a = Arrivals::default();
        assert_eq!(a.take(), None, "nothing read yet");
        a.done();
        a.read();
        let first = a.at.load(Relaxed);
        std::thread::sleep(Duration::from_millis(2));
        a.read(); // the rest of its head
        let head = a.at.load(Relaxed);
        assert!(head > first);
        let t = a.take().expect("the request was read");
        assert_eq!(t, instant(head));
        a.read(); // its body
        assert_eq!(a.take(), None, "a body read does not start a request");
        a.done();
        a.read();
        assert!(a.take().is_some_and(|t2| t2 > t));
    }

    #[test]
    fn an_exchange_is_the_last_write_to_the_first_read_after_it() {
        let e = Exchange::default();
        std::thread::sleep(Duration::from_millis(1));
        let sent = Instant::now();
        assert_eq!(e.wait(sent), None);
        e.wrote();
        assert_eq!(e.wait(sent), None, "no answer yet");
        std::thread::sleep(Duration::from_millis(3));
        e.read();
        std::thread::sleep(Duration::from_millis(3));
        e.read(); // more of the answer
        let w = e.wait(sent).expect("written and answered");
        assert!(
            w >= Duration::from_millis(3) && w < Duration::from_millis(6),
            "{w:?}"
        );
        assert_eq!(e.wait(e.made), None, "a connection made for the request");
        e.wrote(); // the next request on the connection
        assert_eq!(e.wait(sent), None);
    }
}
