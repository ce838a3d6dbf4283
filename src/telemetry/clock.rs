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
//! On Linux a stamped read is the time the kernel received its bytes (`SO_TIMESTAMPNS`, read
//! with `recvmsg`), not the time the gateway got round to reading them: the wake-up of an
//! idle gateway, and the wait of bytes queued while it was busy or throttled, are the
//! gateway's time too (they are what a client waits for), and an answer waiting to be read
//! is the gateway's time, not the upstream's. Only the reads that take a stamp use `recvmsg` (a
//! request's head, an answer's first bytes); the rest are plain reads. Elsewhere, and when
//! the kernel gives no time, a stamp is the time of the read.
//!
//! Each stamp is one or two clock reads where it is taken; nothing here allocates per
//! request.

use std::io;
use std::pin::Pin;
use std::sync::atomic::{
    AtomicU64,
    Ordering::{AcqRel, Acquire, Relaxed, Release},
};
use std::sync::{Arc, LazyLock};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use hyper_util::client::legacy::connect::{Connected, Connection};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

/// Stamps count from here: as far back as the kernel's times are taken (`MAX_QUEUED`), so that
/// bytes received before the first stamp was taken have one.
static BASE: LazyLock<Instant> = LazyLock::new(|| {
    Instant::now()
        .checked_sub(MAX_QUEUED)
        .unwrap_or_else(Instant::now)
});

/// How long ago the kernel's time of a read may be (more: the wall clock stepped; the read's
/// own time is taken instead). A forward step of the wall clock shorter than this, while
/// bytes wait in a socket, dates them that much too early: kept short for that.
const MAX_QUEUED: Duration = Duration::from_secs(10);

/// Now, as nanoseconds since `BASE`, plus one (0 means "not taken").
fn stamp() -> u64 {
    u64::try_from(BASE.elapsed().as_nanos()).unwrap_or(u64::MAX - 1) + 1
}

fn instant(stamp: u64) -> Instant {
    *BASE + Duration::from_nanos(stamp - 1)
}

/// A stamp for bytes the kernel received at `received` (`CLOCK_REALTIME`), as `stamp`'s
/// monotonic clock puts it: now less how long ago that was. Now when the kernel's time is not
/// in the past (the wall clock stepped), or is more than `MAX_QUEUED` ago.
#[cfg_attr(not(target_os = "linux"), allow(dead_code))]
fn stamp_received(received: Duration) -> u64 {
    let now = stamp();
    let wall = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap_or_default();
    match wall.checked_sub(received) {
        Some(ago) if ago <= MAX_QUEUED => now.saturating_sub(ago.as_nanos() as u64).max(1),
        _ => now,
    }
}

/// What a clocked connection tells its clock.
pub trait Clock {
    /// Whether the next read's time would be kept (only those reads ask the kernel for it).
    fn wants_read(&self) -> bool;
    /// Bytes were read; the kernel received them at `at` (a `stamp`).
    fn read_at(&self, at: u64);
    /// Bytes were read just now.
    fn read(&self) {
        if self.wants_read() {
            self.read_at(stamp());
        }
    }
    /// Bytes were written.
    fn wrote(&self);
    /// A write found the socket full (the peer reads slower than the answer comes).
    fn write_blocked(&self) {}
}

/// A coarse clock for idle connections, advanced by the server's sweeper (one tick a
/// fraction of `server.client_timeout`): read where a precise one would cost a clock read.
pub static TICKS: AtomicU64 = AtomicU64::new(0);

/// A client connection's clock: when the bytes of the request being waited for were last
/// read, and since when it waits for one.
#[derive(Debug)]
pub struct Arrivals {
    /// 0: waiting for a request, nothing read yet; `SERVING`: a request is being served
    /// (what is read now is its body); else the stamp of the latest read.
    at: AtomicU64,
    /// The `TICKS` at which the connection began to wait for its next request's head.
    waiting_since: AtomicU64,
    /// The `TICKS` (plus one) at which a write found the socket full, 0 when the last write
    /// went through: such a connection is not idle, whatever it waits for.
    blocked_since: AtomicU64,
    /// 0 on HTTP/1 (where `at` says whether a request is served); on HTTP/2, `H2` plus the
    /// number of its requests not yet answered (its requests interleave).
    h2: AtomicU64,
}

const SERVING: u64 = u64::MAX;
const H2: u64 = 1 << 32;

impl Default for Arrivals {
    fn default() -> Self {
        Arrivals {
            at: AtomicU64::new(0),
            waiting_since: AtomicU64::new(TICKS.load(Relaxed)),
            blocked_since: AtomicU64::new(0),
            h2: AtomicU64::new(0),
        }
    }
}

impl Arrivals {
    /// How many ticks the connection has been waiting for a request's head (however many
    /// of its bytes came), or on HTTP/2 with no request open; `None` while it serves one.
    pub fn waiting_ticks(&self, now: u64) -> Option<u64> {
        let idle = match self.h2.load(Acquire) {
            0 => self.at.load(Acquire) != SERVING,
            open => open == H2,
        };
        (idle && self.blocked_since.load(Relaxed) == 0)
            .then(|| now.saturating_sub(self.waiting_since.load(Relaxed)))
    }

    /// How many ticks its writes have found the socket full with nothing going through
    /// (`None`: its last write went through).
    pub fn blocked_ticks(&self, now: u64) -> Option<u64> {
        match self.blocked_since.load(Relaxed) {
            0 => None,
            since => Some(now.saturating_sub(since - 1)),
        }
    }

    /// When the request now handed to the gateway was read (`None` when its bytes came in
    /// with the previous request's). What is read from here on is its own.
    pub fn take(&self) -> Option<Instant> {
        match self.at.swap(SERVING, Relaxed) {
            0 | SERVING => None,
            s => Some(instant(s)),
        }
    }

    /// An HTTP/2 request is handed to the gateway. Its requests interleave, so none is timed
    /// by the connection's reads: the clock stays serving from the first on, and its reads
    /// stay plain (no `recvmsg` for a time nobody takes).
    pub fn opened(&self) {
        self.at.store(SERVING, Relaxed);
        // Counted first, then marked HTTP/2: the sweeper never sees it with none open.
        if self.h2.fetch_add(1, AcqRel) & H2 == 0 {
            self.h2.fetch_or(H2, AcqRel);
        }
    }

    /// The answer is done: on HTTP/1 the next bytes read begin the next request; on HTTP/2
    /// the connection is idle once its last open request is done.
    pub fn done(&self) {
        if self.h2.load(Relaxed) != 0 {
            // The wait starts before the count says idle: a sweep between the two must not
            // see an old start (and close a connection whose answer is still going out).
            self.waiting_since.store(TICKS.load(Relaxed), Relaxed);
            self.h2.fetch_sub(1, AcqRel);
            return;
        }
        self.waiting_since.store(TICKS.load(Relaxed), Relaxed);
        self.at.store(0, Release);
    }
}

impl Clock for Arrivals {
    fn wants_read(&self) -> bool {
        self.at.load(Relaxed) != SERVING
    }

    fn read_at(&self, at: u64) {
        if self.wants_read() {
            self.at.store(at, Relaxed);
        }
    }

    /// An answer's last bytes may still be going out after its body ended (to a slow
    /// reader): the wait for the next request starts at the last write, not before.
    fn wrote(&self) {
        self.waiting_since.store(TICKS.load(Relaxed), Relaxed);
        if self.blocked_since.load(Relaxed) != 0 {
            self.blocked_since.store(0, Relaxed);
        }
    }

    fn write_blocked(&self) {
        if self.blocked_since.load(Relaxed) == 0 {
            self.blocked_since.store(TICKS.load(Relaxed) + 1, Relaxed);
        }
    }
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
    fn wants_read(&self) -> bool {
        self.answered.load(Relaxed) == 0
    }

    fn read_at(&self, at: u64) {
        if self.wants_read() {
            // Not before the request's last byte went out (the two clocks' readings differ
            // by the time between them, nanoseconds).
            self.answered
                .store(at.max(self.wrote.load(Relaxed)), Relaxed);
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
    /// Clocks a connection. Its reads carry the kernel's times when its socket asked for them
    /// (`time_receipts`, or inherited from its listener); else they are timed as they are made.
    pub fn new(inner: T, clock: Arc<C>) -> Self {
        Clocked { inner, clock }
    }
}

impl<T, C: Clock> Clocked<T, C> {
    /// Tells the clock of a write that wrote something; passes its result on.
    fn told(&self, r: Poll<io::Result<usize>>) -> Poll<io::Result<usize>> {
        match r {
            Poll::Ready(Ok(n)) if n > 0 => self.clock.wrote(),
            Poll::Pending => self.clock.write_blocked(),
            _ => {}
        }
        r
    }
}

impl<C: Clock> AsyncRead for Clocked<tokio::net::TcpStream, C> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        if !self.clock.wants_read() {
            return Pin::new(&mut self.inner).poll_read(cx, buf);
        }
        #[cfg(target_os = "linux")]
        {
            kernel_time::poll_read(&self.inner, &*self.clock, cx, buf)
        }
        #[cfg(not(target_os = "linux"))]
        {
            let before = buf.filled().len();
            let r = Pin::new(&mut self.inner).poll_read(cx, buf);
            if buf.filled().len() > before {
                self.clock.read();
            }
            r
        }
    }
}

/// Asks the kernel to time what a socket receives, on Linux (elsewhere, nothing): a
/// listener's connections inherit the option, for as long as it listens. The kernel turns its
/// timing on a moment after the first socket on the machine asks and off when the last one
/// closes, so the listener, which stays, also keeps it on: without it a connection made after
/// all others closed would have its first request untimed.
pub fn time_receipts(socket: &impl std::os::fd::AsRawFd) {
    #[cfg(target_os = "linux")]
    kernel_time::enable(socket);
    #[cfg(not(target_os = "linux"))]
    let _ = socket;
}

/// Reads timed by the kernel: `SO_TIMESTAMPNS` on the socket, the time each read's last
/// bytes were received given with them by `recvmsg`.
#[cfg(target_os = "linux")]
mod kernel_time {
    use super::{stamp, stamp_received, Clock};
    use std::io;
    use std::mem::MaybeUninit;
    use std::os::fd::AsRawFd;
    use std::task::{ready, Context, Poll};
    use std::time::Duration;
    use tokio::io::{Interest, ReadBuf};
    use tokio::net::TcpStream;

    pub(super) fn enable(socket: &impl AsRawFd) {
        let on: libc::c_int = 1;
        // SAFETY: a valid socket and an option value of the size given. A failure leaves
        // the socket as it was (its reads are then timed as they are made).
        unsafe {
            libc::setsockopt(
                socket.as_raw_fd(),
                libc::SOL_SOCKET,
                libc::SO_TIMESTAMPNS,
                (&on as *const libc::c_int).cast(),
                std::mem::size_of::<libc::c_int>() as libc::socklen_t,
            );
        }
    }

    /// As tokio's own read of a `TcpStream` (wait until readable, read, and on
    /// `WouldBlock` wait again), with `recvmsg`; tells `clock` when the bytes came. As tokio
    /// does, a read that did not fill the buffer took all there was: the socket is taken as
    /// not readable until epoll says it is again (the `WouldBlock` given to `try_io` below
    /// is how to tell it), which saves a read that would find nothing.
    pub(super) fn poll_read(
        stream: &TcpStream,
        clock: &impl Clock,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        loop {
            ready!(stream.poll_read_ready(cx))?;
            // SAFETY: `recv` only writes into the unfilled part, and what it reports
            // written is marked filled below.
            let unfilled = unsafe { buf.unfilled_mut() };
            let room = unfilled.len();
            let fd = stream.as_raw_fd();
            let mut short = None;
            let read = stream.try_io(Interest::READABLE, || {
                let (n, received) = recv(fd, unfilled)?;
                if n > 0 && n < room {
                    short = Some((n, received));
                    return Err(io::ErrorKind::WouldBlock.into());
                }
                Ok((n, received))
            });
            let (n, received) = match (read, short) {
                (_, Some(got)) | (Ok(got), None) => got,
                (Err(e), None) if e.kind() == io::ErrorKind::WouldBlock => continue,
                (Err(e), None) => return Poll::Ready(Err(e)),
            };
            // SAFETY: `recv` wrote `n` bytes.
            unsafe { buf.assume_init(n) };
            buf.advance(n);
            if n > 0 {
                clock.read_at(received.map_or_else(stamp, stamp_received));
            }
            return Poll::Ready(Ok(()));
        }
    }

    /// One `recvmsg` into `buf`: the bytes read, and when the kernel received the last of
    /// them (`CLOCK_REALTIME`), when it says.
    fn recv(fd: i32, buf: &mut [MaybeUninit<u8>]) -> io::Result<(usize, Option<Duration>)> {
        let mut iov = libc::iovec {
            iov_base: buf.as_mut_ptr().cast(),
            iov_len: buf.len(),
        };
        // Room for one `timespec` message (`CMSG_SPACE(16)` = 32 bytes), aligned for its
        // header.
        let mut control = [0u64; 8];
        // SAFETY: a zeroed `msghdr` is a valid empty one; its pointers are set below to
        // buffers that outlive the call.
        let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
        msg.msg_iov = &mut iov;
        msg.msg_iovlen = 1;
        msg.msg_control = control.as_mut_ptr().cast();
        msg.msg_controllen = std::mem::size_of_val(&control) as _;
        // SAFETY: as above; the socket is non-blocking (tokio's).
        let n = unsafe { libc::recvmsg(fd, &mut msg, libc::MSG_CMSG_CLOEXEC) };
        if n < 0 {
            return Err(io::Error::last_os_error());
        }
        let mut received = None;
        if msg.msg_flags & libc::MSG_CTRUNC != 0 {
            return Ok((n as usize, None));
        }
        // SAFETY: the kernel filled `msg`'s control part, not truncated; `CMSG_FIRSTHDR`/
        // `CMSG_NXTHDR` stay within it, and a `SCM_TIMESTAMPNS` message long enough holds
        // one `timespec`.
        unsafe {
            let whole = libc::CMSG_LEN(std::mem::size_of::<libc::timespec>() as u32) as usize;
            let mut c = libc::CMSG_FIRSTHDR(&msg);
            while !c.is_null() {
                if (*c).cmsg_level == libc::SOL_SOCKET
                    && (*c).cmsg_type == libc::SCM_TIMESTAMPNS
                    && (*c).cmsg_len as usize >= whole
                {
                    let ts: libc::timespec = std::ptr::read_unaligned(libc::CMSG_DATA(c).cast());
                    if let (Ok(secs), Ok(nanos)) =
                        (u64::try_from(ts.tv_sec), u32::try_from(ts.tv_nsec))
                    {
                        received = Some(Duration::new(secs, nanos));
                    }
                }
                c = libc::CMSG_NXTHDR(&msg, c);
            }
        }
        Ok((n as usize, received))
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

    /// A clocked connection and its peer, over loopback.
    async fn clocked_pair<C>(
        clock: Arc<C>,
    ) -> (Clocked<tokio::net::TcpStream, C>, tokio::net::TcpStream) {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        time_receipts(&listener);
        let peer = tokio::net::TcpStream::connect(listener.local_addr().unwrap());
        let (accepted, peer) = tokio::join!(listener.accept(), peer);
        (Clocked::new(accepted.unwrap().0, clock), peer.unwrap())
    }

    /// The kernel times received packets from a moment after the first socket on the
    /// machine asks it to until the last one that asked closes: one is kept open meanwhile.
    async fn timing_on<C: Default>() -> Clocked<tokio::net::TcpStream, C> {
        let (kept, _) = clocked_pair(Arc::new(C::default())).await;
        tokio::time::sleep(Duration::from_millis(20)).await;
        kept
    }

    #[cfg(target_os = "linux")]
    #[tokio::test]
    async fn a_request_read_late_is_timed_when_its_bytes_came() {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let _on = timing_on::<Arrivals>().await;
        let arrivals = Arc::new(Arrivals::default());
        let (mut conn, mut client) = clocked_pair(arrivals.clone()).await;
        client.write_all(b"GET / HTTP/1.1\r\n\r\n").await.unwrap();
        // Once the bytes are in the socket (the sender's kernel may hold them a while), the
        // gateway is busy elsewhere: the request waits there.
        conn.inner.readable().await.unwrap();
        let arrived = Instant::now();
        tokio::time::sleep(Duration::from_millis(80)).await;
        let mut buf = [0u8; 64];
        assert_eq!(conn.read(&mut buf).await.unwrap(), 18);
        let came = arrivals.take().expect("a request was read");
        assert!(
            came <= arrived,
            "timed {:?} after it was in the socket",
            came - arrived
        );
        // Not absurdly early either: within the 80 ms the read was held back (a loaded
        // machine may wake this task a good while after the bytes came).
        assert!(
            arrived - came < Duration::from_millis(80),
            "{:?}",
            arrived - came
        );
        // Its body: read plainly, not timed.
        client.write_all(b"body").await.unwrap();
        assert_eq!(conn.read(&mut buf).await.unwrap(), 4);
        assert_eq!(arrivals.take(), None);
    }

    #[cfg(target_os = "linux")]
    #[tokio::test]
    async fn an_answer_read_late_is_the_gateways_time_not_the_upstreams() {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let _on = timing_on::<Exchange>().await;
        let exchange = Arc::new(Exchange::default());
        let (mut conn, mut upstream) = clocked_pair(exchange.clone()).await;
        tokio::time::sleep(Duration::from_millis(1)).await;
        let sent = Instant::now();
        conn.write_all(b"POST / HTTP/1.1\r\n\r\n").await.unwrap();
        let mut buf = [0u8; 64];
        assert!(upstream.read(&mut buf).await.unwrap() > 0);
        tokio::time::sleep(Duration::from_millis(30)).await; // the upstream's own time
        upstream
            .write_all(b"HTTP/1.1 200 OK\r\n\r\n")
            .await
            .unwrap();
        conn.inner.readable().await.unwrap();
        let answered = Instant::now();
        tokio::time::sleep(Duration::from_millis(80)).await; // the answer waits to be read
        assert!(conn.read(&mut buf).await.unwrap() > 0);
        let wait = exchange.wait(sent).expect("written and answered");
        assert!(
            wait >= Duration::from_millis(30) && wait <= answered - sent,
            "{wait:?}, answered after {:?}",
            answered - sent
        );
    }

    #[test]
    fn an_exchange_is_the_last_write_to_the_first_read_after_it() {
        let e = Exchange::default();
        std::thread::sleep(Duration::from_millis(1));
        let sent = Instant::now();
        assert_eq!(e.wait(sent), None);
        let before_write = Instant::now();
        e.wrote();
        let after_write = Instant::now();
        assert_eq!(e.wait(sent), None, "no answer yet");
        std::thread::sleep(Duration::from_millis(3));
        let before_read = Instant::now();
        e.read();
        let after_read = Instant::now();
        std::thread::sleep(Duration::from_millis(3));
        e.read(); // more of the answer: not counted (3 ms later, past the bound below)
        let w = e.wait(sent).expect("written and answered");
        // Bounded by the instants around the calls, not by the sleeps (a loaded machine
        // oversleeps): from the write to the first read, not the second.
        assert!(
            w >= before_read - after_write && w <= after_read - before_write,
            "{w:?} outside {:?}..={:?}",
            before_read - after_write,
            after_read - before_write
        );
        assert_eq!(e.wait(e.made), None, "a connection made for the request");
        e.wrote(); // the next request on the connection
        assert_eq!(e.wait(sent), None);
    }
}
