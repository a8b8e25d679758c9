//! The byte pump between a TCP socket and a framed link stream.
//!
//! Two directions, each with its own buffer and state, polled from one future (as tokio's
//! `copy_bidirectional` does), so a full direction never blocks the other (DESIGN.md's
//! virtio-vsock deadlock note):
//! - "to enclave": bytes read from the TCP peer go out as DATA frames of at most one capped link
//!   write each, within the window ([`common::frame`]): with it closed the TCP peer is not read,
//!   so its bytes wait in the kernel and leave as one large frame when credit returns. The
//!   peer's FIN becomes a FIN frame. CREDITs for the other direction go out between frames.
//! - "from enclave": the link is read whenever it has bytes, so the enclave's CREDITs never wait
//!   behind data; frames are decoded ([`common::frame::Deframer`]) and their payload written to
//!   the TCP peer, or kept in a backlog while it cannot take more. A FIN frame becomes
//!   `shutdown(WR)` once the backlog before it is written.
//!
//! How it ends:
//! - FIN both ways: a clean close.
//! - The TCP peer resets (a read or write error): a RST frame goes to the enclave, when the link
//!   is between frames, and the link closes.
//! - A RST frame, a malformed frame, data beyond the window, or a link that ends or fails before
//!   its FIN (the enclave side died): the TCP peer is reset, never closed cleanly.
//! - `idle` passes with no byte moving either way: both sides are reset.
//!
//! Nothing is buffered without bound: 64 KiB each way (pages touched only when data flows), and
//! a backlog of at most the window (4 MiB), held only while the TCP peer is slower than the
//! enclave; every link write is capped at 32 KiB by [`common::transport::Stream`].

use std::future::{poll_fn, Future};
use std::io;
use std::pin::Pin;
use std::sync::atomic::Ordering::Relaxed;
use std::task::{ready, Context, Poll};
use std::time::Duration;

use common::frame::{
    self, Backlog, Chunk, Deframer, End, FrameError, SendWindow, FRAME_HEADER_LEN,
};
use common::metrics::Counters;
use common::transport::Stream;
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt, ReadBuf};
use tokio::net::TcpStream;
use tokio::time::{Instant, Sleep};
use tracing::{debug, Span};

/// Buffer per direction: at glibc's mmap threshold (see `common::sys`), so an idle
/// connection's buffers cost no resident memory.
const BUF: usize = common::sys::MMAP_THRESHOLD;

/// Why a carried connection did not end with two clean closes.
#[derive(Debug, thiserror::Error)]
pub enum SpliceError {
    /// The TCP peer reset the connection, or its socket failed.
    #[error("TCP peer failed: {0}")]
    Tcp(#[source] io::Error),
    /// The enclave side sent RST: its application reset the connection.
    #[error("reset by the enclave side")]
    PeerReset,
    /// The link failed or ended before the enclave side finished: it died or went away.
    #[error("link to the enclave broke: {0}")]
    Link(#[source] io::Error),
    /// The enclave side sent a malformed frame.
    #[error("bad frame from the enclave: {0}")]
    Frame(#[from] FrameError),
    /// No byte moved either way for the idle timeout.
    #[error("idle for {0:?}")]
    Idle(Duration),
}

impl SpliceError {
    /// Whether the enclave should be told with a RST frame (it is still there to hear it).
    fn tell_enclave(&self) -> bool {
        matches!(self, SpliceError::Tcp(_) | SpliceError::Idle(_))
    }
}

/// TCP peer -> link: DATA frames within the window, then FIN; CREDITs for the other direction
/// go out between them, also after the FIN.
struct ToEnclave {
    buf: Box<[u8]>,
    /// Bytes of `buf` written so far, and the end of the frame being written.
    at: usize,
    end: usize,
    /// The TCP peer sent FIN, so a FIN frame is (or was) queued.
    fin: bool,
    done: bool,
    bytes: u64,
    /// The frame being written is a CREDIT.
    credit: bool,
    /// A CREDIT could not be written: the enclave side has closed the link, so none is sent
    /// again.
    credits_off: bool,
}

/// Link -> TCP peer: decoded frames, payload written out, what the TCP peer cannot take yet kept
/// in a backlog so the link is always read (CREDITs must never wait behind data).
struct FromEnclave {
    buf: Box<[u8]>,
    backlog: Backlog,
    /// The link ended after the enclave's FIN: only the backlog is left to write.
    link_ended: bool,
    /// FIN passed on to the TCP peer.
    done: bool,
    bytes: u64,
}

fn link_err(e: io::Error) -> SpliceError {
    SpliceError::Link(e)
}

impl ToEnclave {
    /// Moves bytes until both the TCP side and the link would block (or the window is closed),
    /// or the direction is done. Called again after it is done, to send CREDITs.
    fn poll(
        &mut self,
        cx: &mut Context<'_>,
        tcp: &mut TcpStream,
        link: &mut Stream,
        flow: &mut Flow<'_>,
    ) -> Poll<Result<(), SpliceError>> {
        loop {
            if self.at < self.end {
                let n =
                    match ready!(Pin::new(&mut *link).poll_write(cx, &self.buf[self.at..self.end]))
                    {
                        // enclave-proxy closes the link once both FINs have crossed, which may be
                        // before this side has read its FIN: a CREDIT it no longer needs can fail.
                        // Whether the stream ended cleanly is for the reading side to see.
                        Err(_) if self.credit => {
                            (self.at, self.credits_off) = (self.end, true);
                            continue;
                        }
                        r => r.map_err(link_err)?,
                    };
                if n == 0 {
                    return Poll::Ready(Err(link_err(io::ErrorKind::WriteZero.into())));
                }
                self.at += n;
                *flow.moved = true;
                continue;
            }
            self.credit = false;
            if let Some(credit) = flow.incoming.credit_due().filter(|_| !self.credits_off) {
                self.buf[..FRAME_HEADER_LEN].copy_from_slice(&credit);
                (self.at, self.end, self.credit) = (0, FRAME_HEADER_LEN, true);
                continue;
            }
            if self.fin {
                self.done = true;
                return Poll::Ready(Ok(()));
            }
            // A closed window leaves the TCP peer's bytes in the kernel; the CREDIT that reopens
            // it arrives on the link, whose reader wakes this task.
            let room = flow.window.room();
            if room == 0 {
                return Poll::Pending;
            }
            let mut rb = ReadBuf::new(&mut self.buf[FRAME_HEADER_LEN..FRAME_HEADER_LEN + room]);
            ready!(Pin::new(&mut *tcp).poll_read(cx, &mut rb)).map_err(SpliceError::Tcp)?;
            let n = rb.filled().len();
            *flow.moved = true;
            if n == 0 {
                self.buf[..FRAME_HEADER_LEN].copy_from_slice(&frame::FIN);
                (self.at, self.end, self.fin) = (0, FRAME_HEADER_LEN, true);
            } else {
                self.buf[..FRAME_HEADER_LEN].copy_from_slice(&frame::data_header(n));
                (self.at, self.end) = (0, FRAME_HEADER_LEN + n);
                flow.window.sent(n);
                self.bytes += n as u64;
            }
        }
    }
}

/// What the two directions share: the decoder of what comes from the enclave (which knows what
/// credit is owed), the window toward the enclave, and whether anything moved.
struct Flow<'a> {
    incoming: &'a mut Deframer,
    window: &'a mut SendWindow,
    moved: &'a mut bool,
    /// The window opened or credit became owed: "to enclave" has something new to do.
    poke: bool,
    /// "to enclave" has written its FIN.
    fin_sent: bool,
}

impl FromEnclave {
    /// Writes what the TCP peer takes of the backlog. Returns whether it would block.
    fn hand_on(
        &mut self,
        cx: &mut Context<'_>,
        tcp: &mut TcpStream,
        flow: &mut Flow<'_>,
    ) -> Result<bool, SpliceError> {
        while !self.backlog.is_empty() {
            let Poll::Ready(n) = Pin::new(&mut *tcp).poll_write(cx, self.backlog.front()) else {
                return Ok(true);
            };
            let n = write_count(n)?;
            self.backlog.consume(n);
            self.delivered(n, flow);
        }
        Ok(false)
    }

    fn delivered(&mut self, n: usize, flow: &mut Flow<'_>) {
        flow.incoming.delivered(n);
        self.bytes += n as u64;
        *flow.moved = true;
        flow.poke = true;
    }

    /// Moves bytes until both sides would block. After the FIN has been passed on it keeps
    /// reading the link, for CREDITs and to notice the enclave side going away before this
    /// side finishes.
    fn poll(
        &mut self,
        cx: &mut Context<'_>,
        tcp: &mut TcpStream,
        link: &mut Stream,
        flow: &mut Flow<'_>,
    ) -> Poll<Result<(), SpliceError>> {
        loop {
            let mut blocked = self.hand_on(cx, tcp, flow)?;
            if self.backlog.is_empty() {
                if flow.incoming.end() == End::Fin && !self.done {
                    ready!(Pin::new(&mut *tcp).poll_shutdown(cx)).map_err(SpliceError::Tcp)?;
                    self.done = true;
                }
                if self.link_ended {
                    // The enclave side closed after its FIN: fine only once this side has
                    // finished too, which the caller checks.
                    return Poll::Ready(Ok(()));
                }
            }
            if self.link_ended {
                return Poll::Pending;
            }
            let mut rb = ReadBuf::new(&mut self.buf);
            match ready!(Pin::new(&mut *link).poll_read(cx, &mut rb)) {
                // Once both FINs have crossed, enclave-proxy may close the link without reading
                // the last CREDITs, which a Unix socket reports as a reset: the stream is over.
                Err(_) if flow.incoming.end() == End::Fin && flow.fin_sent => {
                    self.link_ended = true;
                    continue;
                }
                r => r.map_err(link_err)?,
            }
            let n = rb.filled().len();
            if n == 0 {
                if flow.incoming.end() == End::Fin {
                    self.link_ended = true;
                    continue;
                }
                return Poll::Ready(Err(link_err(io::Error::new(
                    io::ErrorKind::UnexpectedEof,
                    if flow.incoming.mid_frame() {
                        "link ended inside a frame"
                    } else {
                        "link ended without FIN"
                    },
                ))));
            }
            *flow.moved = true;
            let mut at = 0;
            while at < n {
                let (used, chunk) = flow.incoming.decode(&self.buf[at..n])?;
                at += used;
                match chunk {
                    Some(Chunk::Data(k)) => {
                        let mut data = &self.buf[at - k..at];
                        if !blocked && self.backlog.is_empty() {
                            match Pin::new(&mut *tcp).poll_write(cx, data) {
                                Poll::Ready(r) => {
                                    let m = write_count(r)?;
                                    data = &data[m..];
                                    flow.incoming.delivered(m);
                                    self.bytes += m as u64;
                                    flow.poke = true;
                                }
                                Poll::Pending => blocked = true,
                            }
                        }
                        if !data.is_empty() {
                            blocked = true;
                            self.backlog.push(data);
                        }
                    }
                    Some(Chunk::Credit(amount)) => {
                        flow.window.credited(amount)?;
                        flow.poke = true;
                    }
                    Some(Chunk::Rst) => return Poll::Ready(Err(SpliceError::PeerReset)),
                    // A byte stream's decoder yields no datagrams.
                    Some(Chunk::Fin | Chunk::Datagram { .. }) | None => {}
                }
            }
        }
    }
}

/// The byte count of a finished write to the TCP peer.
fn write_count(r: io::Result<usize>) -> Result<usize, SpliceError> {
    match r {
        Ok(0) => Err(SpliceError::Tcp(io::ErrorKind::WriteZero.into())),
        Ok(n) => Ok(n),
        Err(e) => Err(SpliceError::Tcp(e)),
    }
}

/// The idle timer, cheap enough for every poll of a busy connection.
///
/// Reading the clock on every poll, to note when bytes last moved, cost measurable CPU under
/// load. Instead the pump only sets a flag when bytes move, and the clock is read when this
/// timer fires, every quarter of the limit: if bytes moved since the last firing, the quiet time
/// starts afresh now. Bytes moved no later than that, so a connection is never reset before the
/// limit of silence; and no earlier than the firing before, so it is reset at most a quarter of
/// the limit (and the timer's millisecond) after it.
struct IdleTimer {
    limit: Duration,
    every: Duration,
    sleep: Pin<Box<Sleep>>,
    /// Nothing is known to have moved since this instant.
    quiet_since: Instant,
}

impl IdleTimer {
    fn new(limit: Duration) -> IdleTimer {
        // At least a millisecond (the timer's resolution), so a tiny limit cannot make it spin.
        let every = (limit / 4).max(Duration::from_millis(1));
        let now = Instant::now();
        IdleTimer {
            limit,
            every,
            sleep: Box::pin(tokio::time::sleep_until(now + every)),
            quiet_since: now,
        }
    }

    /// `Ready` once nothing has moved for the limit. `moved` says bytes moved since the last
    /// call that found the timer fired; this clears it.
    fn poll(&mut self, cx: &mut Context<'_>, moved: &mut bool) -> Poll<()> {
        while self.sleep.as_mut().poll(cx).is_ready() {
            let now = Instant::now();
            if std::mem::take(moved) {
                self.quiet_since = now;
            }
            let due = self.quiet_since + self.limit;
            if now >= due {
                return Poll::Ready(());
            }
            self.sleep.as_mut().reset(due.min(now + self.every));
        }
        Poll::Pending
    }
}

/// Carries bytes both ways until both directions have closed, or one side resets.
/// Bytes read from `tcp` count as going to the enclave.
///
/// The end of the connection is logged in `span`. The pump does not run inside it: entering and
/// leaving a connection's spans on every poll of this, the busiest future, cost about 3% of
/// host-proxy's CPU, and nothing is logged between set-up and the end.
pub async fn pump(
    tcp: &mut TcpStream,
    link: &mut Stream,
    counters: &Counters,
    direction: common::metrics::Direction,
    idle: Option<Duration>,
    span: &Span,
) {
    let mut up = ToEnclave {
        buf: vec![0u8; BUF].into_boxed_slice(),
        at: 0,
        end: 0,
        fin: false,
        done: false,
        bytes: 0,
        credit: false,
        credits_off: false,
    };
    let mut down = FromEnclave {
        buf: vec![0u8; BUF].into_boxed_slice(),
        backlog: Backlog::default(),
        link_ended: false,
        done: false,
        bytes: 0,
    };
    let mut timer = idle.map(IdleTimer::new);
    // Set whenever bytes move; only the idle timer reads and clears it.
    let mut moved = false;
    let mut incoming = Deframer::new();
    let mut window = SendWindow::default();
    let result = poll_fn(|cx| {
        {
            let mut flow = Flow {
                incoming: &mut incoming,
                window: &mut window,
                moved: &mut moved,
                poke: false,
                fin_sent: false,
            };
            if let Poll::Ready(Err(e)) = up.poll(cx, tcp, link, &mut flow) {
                return Poll::Ready(Err(e));
            }
            flow.fin_sent = up.done;
            let down_result = down.poll(cx, tcp, link, &mut flow);
            // What came from the enclave may have opened the window or made a CREDIT due.
            if flow.poke {
                if let Poll::Ready(Err(e)) = up.poll(cx, tcp, link, &mut flow) {
                    return Poll::Ready(Err(e));
                }
            }
            match down_result {
                Poll::Ready(Err(e)) => return Poll::Ready(Err(e)),
                // The link ended after the enclave's FIN: the enclave side is gone, so this side
                // must have finished too, or what it still sends would be lost.
                Poll::Ready(Ok(())) if !up.done => {
                    return Poll::Ready(Err(link_err(io::Error::new(
                        io::ErrorKind::UnexpectedEof,
                        "link ended while the TCP peer was still sending",
                    ))))
                }
                Poll::Ready(Ok(())) => return Poll::Ready(Ok(())),
                Poll::Pending => {}
            }
        }
        if up.done && down.done {
            return Poll::Ready(Ok(()));
        }
        if let Some(timer) = timer.as_mut() {
            if timer.poll(cx, &mut moved).is_ready() {
                return Poll::Ready(Err(SpliceError::Idle(timer.limit)));
            }
        }
        Poll::Pending
    })
    .await;
    counters.bytes_to_enclave.fetch_add(up.bytes, Relaxed);
    counters.bytes_from_enclave.fetch_add(down.bytes, Relaxed);
    match result {
        Ok(()) => span.in_scope(|| {
            debug!(
                bytes.to_enclave = up.bytes,
                bytes.from_enclave = down.bytes,
                "connection closed"
            )
        }),
        Err(e) => {
            Counters::bump(
                if matches!(e, SpliceError::Idle(_)) {
                    &counters.idle_closed
                } else {
                    &counters.reset
                }
                .at(direction),
            );
            span.in_scope(|| {
                debug!(
                    bytes.to_enclave = up.bytes,
                    bytes.from_enclave = down.bytes,
                    "connection reset: {e}"
                )
            });
            reset(tcp);
            // Between frames, the enclave side can be told; mid-frame, closing the link tells
            // it just as surely (a cut frame is a reset).
            if e.tell_enclave() && up.at == up.end {
                let _ =
                    tokio::time::timeout(Duration::from_secs(1), link.write_all(&frame::RST)).await;
            }
        }
    }
}

/// Makes the kernel answer the TCP peer with RST rather than FIN when the socket is dropped.
pub fn reset(tcp: &TcpStream) {
    let _ = socket2::SockRef::from(tcp).set_linger(Some(std::time::Duration::ZERO));
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::AsyncReadExt;
    use tokio::net::UnixStream;

    /// A TCP connection through `pump`: returns the far TCP end (the "client"), the enclave's
    /// end of the link, and the pump task.
    async fn rig(
        idle: Option<Duration>,
    ) -> (
        TcpStream,
        UnixStream,
        tokio::task::JoinHandle<std::sync::Arc<Counters>>,
    ) {
        rig_with(idle, None).await
    }

    /// [`rig`], with the TCP socket buffers on both ends of the client's connection set to
    /// `buffers` bytes (the kernel doubles them), so little fits between the pump and a client
    /// that does not read.
    async fn rig_with(
        idle: Option<Duration>,
        buffers: Option<u32>,
    ) -> (
        TcpStream,
        UnixStream,
        tokio::task::JoinHandle<std::sync::Arc<Counters>>,
    ) {
        let server = tokio::net::TcpSocket::new_v4().unwrap();
        let client = tokio::net::TcpSocket::new_v4().unwrap();
        if let Some(size) = buffers {
            server.set_send_buffer_size(size).unwrap();
            client.set_recv_buffer_size(size).unwrap();
        }
        server.bind("127.0.0.1:0".parse().unwrap()).unwrap();
        let listener = server.listen(1).unwrap();
        let client = client
            .connect(listener.local_addr().unwrap())
            .await
            .unwrap();
        let (mut tcp, _) = listener.accept().await.unwrap();
        let (ours, enclave) = UnixStream::pair().unwrap();
        let task = tokio::spawn(async move {
            let counters = std::sync::Arc::new(Counters::default());
            let link = &mut Stream::unix(ours).unwrap();
            pump(
                &mut tcp,
                link,
                &counters,
                common::metrics::Direction::Ingress,
                idle,
                &tracing::Span::none(),
            )
            .await;
            counters
        });
        (client, enclave, task)
    }

    async fn read_to_end(s: &mut (impl AsyncRead + Unpin)) -> io::Result<Vec<u8>> {
        let mut out = Vec::new();
        s.read_to_end(&mut out).await.map(|_| out)
    }

    #[tokio::test]
    async fn bytes_both_ways_and_half_close_each_way() {
        let (mut client, mut enclave, task) = rig(None).await;
        client.write_all(b"request").await.unwrap();
        client.shutdown().await.unwrap();
        let mut got = vec![0u8; 15];
        enclave.read_exact(&mut got).await.unwrap();
        assert_eq!(got, frame::encode_all(b"request", Some(Chunk::Fin)));
        // The client has half-closed; the enclave still answers, then closes.
        enclave
            .write_all(&frame::encode_all(b"answer", Some(Chunk::Fin)))
            .await
            .unwrap();
        assert_eq!(read_to_end(&mut client).await.unwrap(), b"answer");
        drop(enclave);
        let counters = task.await.unwrap();
        assert_eq!(counters.reset.total(), 0);
        assert_eq!(counters.bytes_to_enclave.load(Relaxed), 7);
        assert_eq!(counters.bytes_from_enclave.load(Relaxed), 6);
    }

    #[tokio::test]
    async fn rst_frame_resets_the_client() {
        let (mut client, mut enclave, task) = rig(None).await;
        enclave
            .write_all(&frame::encode_all(b"partial", Some(Chunk::Rst)))
            .await
            .unwrap();
        let mut buf = [0u8; 7];
        client.read_exact(&mut buf).await.unwrap();
        let err = read_to_end(&mut client).await.unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::ConnectionReset);
        assert_eq!(task.await.unwrap().reset.total(), 1);
    }

    #[tokio::test]
    async fn a_link_that_dies_resets_the_client_never_a_clean_eof() {
        for cut in [&b""[..], &[1, 0, 0, 9, b'x'][..], &[1, 0][..]] {
            let (mut client, mut enclave, task) = rig(None).await;
            enclave.write_all(cut).await.unwrap();
            drop(enclave);
            let err = read_to_end(&mut client).await.unwrap_err();
            assert_eq!(err.kind(), io::ErrorKind::ConnectionReset, "cut {cut:?}");
            assert_eq!(task.await.unwrap().reset.total(), 1);
        }
    }

    #[tokio::test]
    async fn a_malformed_frame_resets_the_client() {
        let (mut client, mut enclave, task) = rig(None).await;
        enclave.write_all(&[7, 0, 0, 0]).await.unwrap();
        let err = read_to_end(&mut client).await.unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::ConnectionReset);
        task.await.unwrap();
    }

    #[tokio::test]
    async fn a_client_reset_reaches_the_enclave_as_rst() {
        let (client, mut enclave, task) = rig(None).await;
        reset(&client);
        drop(client);
        let got = read_to_end(&mut enclave).await.unwrap();
        assert_eq!(got, frame::RST);
        assert_eq!(task.await.unwrap().reset.total(), 1);
    }

    #[tokio::test]
    async fn idle_connections_are_reset_both_ways() {
        let (mut client, mut enclave, task) = rig(Some(Duration::from_millis(300))).await;
        // Traffic keeps it alive past the limit...
        for _ in 0..4 {
            client.write_all(b"x").await.unwrap();
            let mut got = [0u8; 5];
            enclave.read_exact(&mut got).await.unwrap();
            tokio::time::sleep(Duration::from_millis(150)).await;
        }
        // ...silence ends it.
        let got = read_to_end(&mut enclave).await.unwrap();
        assert_eq!(got, frame::RST);
        let err = read_to_end(&mut client).await.unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::ConnectionReset);
        assert_eq!(task.await.unwrap().idle_closed.total(), 1);
    }

    /// Reads the frames the pump has written until none comes for `quiet`: the DATA frames'
    /// payload sizes and the CREDITs.
    async fn frames_until_quiet(
        enclave: &mut UnixStream,
        deframer: &mut Deframer,
        quiet: Duration,
    ) -> (Vec<usize>, Vec<usize>) {
        let (mut data, mut credits) = (Vec::new(), Vec::new());
        let mut buf = vec![0u8; 64 * 1024];
        while let Ok(r) = tokio::time::timeout(quiet, enclave.read(&mut buf)).await {
            let n = r.unwrap();
            assert!(n > 0, "the link closed");
            let mut at = 0;
            while at < n {
                let (used, chunk) = deframer.decode(&buf[at..n]).unwrap();
                match chunk {
                    Some(Chunk::Data(k)) if deframer.data_left() == 0 && k == used - 4 => {
                        data.push(k);
                        // Only this decoder's own window: what the pump may send is up to the
                        // test's CREDITs.
                        deframer.delivered(k);
                        let _ = deframer.credit_due();
                    }
                    Some(Chunk::Data(k)) => panic!("frame cut across reads ({k} of {used})"),
                    Some(Chunk::Credit(c)) => credits.push(c),
                    other => panic!("unexpected {other:?}"),
                }
                at += used;
            }
        }
        (data, credits)
    }

    /// A client that trickles single bytes toward an enclave that has stopped reading puts at
    /// most `WINDOW_FRAMES` frames on the link; the rest waits in the kernel and leaves as one
    /// frame once credit returns.
    #[tokio::test]
    async fn a_trickle_under_back_pressure_stops_at_the_window_then_coalesces() {
        let (mut client, mut enclave, task) = rig(None).await;
        let total = 3 * frame::WINDOW_FRAMES;
        for _ in 0..total {
            client.write_all(b"x").await.unwrap();
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
        let mut deframer = Deframer::new();
        let quiet = Duration::from_millis(300);
        let (sizes, _) = frames_until_quiet(&mut enclave, &mut deframer, quiet).await;
        assert_eq!(sizes.len(), frame::WINDOW_FRAMES, "{sizes:?}");
        let crossed: usize = sizes.iter().sum();
        assert!(crossed < total, "all {total} bytes crossed in {sizes:?}");
        // Half the window back: everything that waited leaves in one frame.
        enclave
            .write_all(&frame::credit(frame::WINDOW / 2))
            .await
            .unwrap();
        let (sizes, _) = frames_until_quiet(&mut enclave, &mut deframer, quiet).await;
        assert_eq!(sizes, [total - crossed]);
        client.shutdown().await.unwrap();
        enclave
            .write_all(&frame::encode_all(b"", Some(Chunk::Fin)))
            .await
            .unwrap();
        let mut rest = Vec::new();
        enclave.read_to_end(&mut rest).await.unwrap();
        assert_eq!(rest, frame::FIN);
        assert_eq!(task.await.unwrap().reset.total(), 0);
    }

    /// What the client cannot take waits in the pump, which keeps reading the link: the
    /// overhead of every frame comes back at once, the payload as the client reads it.
    #[tokio::test]
    async fn the_link_is_read_while_the_client_is_not_and_credit_follows_delivery() {
        let (mut client, mut enclave, task) = rig_with(None, Some(4096)).await;
        let payload: Vec<u8> = (0..frame::WINDOW / common::transport::MAX_WRITE * frame::MAX_DATA)
            .map(|i| i as u8)
            .collect();
        let frames = frame::encode_all(&payload, None);
        assert_eq!(frames.len(), frame::WINDOW, "exactly a full window");
        enclave.write_all(&frames).await.unwrap();
        // The client has not read: nothing is owed back but what the frames cost beyond payload.
        let mut deframer = Deframer::new();
        let quiet = Duration::from_millis(200);
        let (data, credits) = frames_until_quiet(&mut enclave, &mut deframer, quiet).await;
        assert!(
            data.is_empty() && credits.is_empty(),
            "{data:?} {credits:?}"
        );
        let mut got = vec![0u8; payload.len()];
        client.read_exact(&mut got).await.unwrap();
        assert!(got == payload);
        let (_, credits) = frames_until_quiet(&mut enclave, &mut deframer, quiet).await;
        // Returned a quarter window at a time: what is left owed is less than that.
        let returned: usize = credits.iter().sum();
        assert!(
            returned > frame::WINDOW - frame::CREDIT_EVERY
                && credits.iter().all(|&c| c >= frame::CREDIT_EVERY),
            "{credits:?}"
        );
        drop(enclave);
        assert_eq!(task.await.unwrap().reset.total(), 1);
    }

    /// A peer that sends beyond the window is broken: the client is reset.
    #[tokio::test]
    async fn a_peer_past_the_window_resets_the_client() {
        let (mut client, mut enclave, task) = rig_with(None, Some(4096)).await;
        let frames = frame::encode_all(&vec![7u8; frame::WINDOW], None);
        assert!(frames.len() > frame::WINDOW);
        let _ = enclave.write_all(&frames).await;
        let err = read_to_end(&mut client).await.unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::ConnectionReset);
        assert_eq!(task.await.unwrap().reset.total(), 1);
    }
}
