//! The byte pump between a TCP socket and a framed link stream.
//!
//! Two directions, each with its own buffer and state, polled from one future (as tokio's
//! `copy_bidirectional` does), so a full direction never blocks the other (DESIGN.md's
//! virtio-vsock deadlock note):
//! - "to enclave": bytes read from the TCP peer go out as DATA frames of at most one capped link
//!   write each; the peer's FIN becomes a FIN frame.
//! - "from enclave": frames from the link are decoded ([`common::frame::Deframer`]) and their
//!   payload written to the TCP peer; a FIN frame becomes `shutdown(WR)`.
//!
//! How it ends:
//! - FIN both ways: a clean close.
//! - The TCP peer resets (a read or write error): a RST frame goes to the enclave, when the link
//!   is between frames, and the link closes.
//! - A RST frame, a malformed frame, or a link that ends or fails before its FIN (the enclave
//!   side died): the TCP peer is reset, never closed cleanly.
//! - `idle` passes with no byte moving either way: both sides are reset.
//!
//! Buffers are fixed (64 KiB each way, pages touched only when data flows), so nothing is
//! buffered without bound; every link write is capped at 32 KiB by
//! [`common::transport::Stream`].

use std::future::{poll_fn, Future};
use std::io;
use std::pin::Pin;
use std::sync::atomic::Ordering::Relaxed;
use std::task::{ready, Context, Poll};
use std::time::Duration;

use common::frame::{self, Chunk, Deframer, End, FrameError, FRAME_HEADER_LEN, MAX_DATA};
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

/// TCP peer -> link: DATA frames, then FIN.
struct ToEnclave {
    buf: Box<[u8]>,
    /// Bytes of `buf` written so far, and the end of the frame being written.
    at: usize,
    end: usize,
    /// The TCP peer sent FIN, so a FIN frame is (or was) queued.
    fin: bool,
    done: bool,
    bytes: u64,
}

/// Link -> TCP peer: decoded frames, payload written out.
struct FromEnclave {
    buf: Box<[u8]>,
    /// Undecoded bytes are `buf[at..end]`; payload waiting for the TCP peer is `buf[data]`.
    at: usize,
    end: usize,
    data: std::ops::Range<usize>,
    /// FIN passed on to the TCP peer.
    done: bool,
    bytes: u64,
}

fn link_err(e: io::Error) -> SpliceError {
    SpliceError::Link(e)
}

impl ToEnclave {
    /// Moves bytes until both the TCP side and the link would block, or the direction is done.
    fn poll(
        &mut self,
        cx: &mut Context<'_>,
        tcp: &mut TcpStream,
        link: &mut Stream,
        flow: &mut Flow<'_>,
    ) -> Poll<Result<(), SpliceError>> {
        loop {
            if self.at < self.end {
                let n = ready!(Pin::new(&mut *link).poll_write(cx, &self.buf[self.at..self.end]))
                    .map_err(link_err)?;
                if n == 0 {
                    return Poll::Ready(Err(link_err(io::ErrorKind::WriteZero.into())));
                }
                self.at += n;
                *flow.moved = true;
                continue;
            }
            if self.fin {
                self.done = true;
                return Poll::Ready(Ok(()));
            }
            let mut rb = ReadBuf::new(&mut self.buf[FRAME_HEADER_LEN..FRAME_HEADER_LEN + MAX_DATA]);
            ready!(Pin::new(&mut *tcp).poll_read(cx, &mut rb)).map_err(SpliceError::Tcp)?;
            let n = rb.filled().len();
            *flow.moved = true;
            if n == 0 {
                self.buf[..FRAME_HEADER_LEN].copy_from_slice(&frame::FIN);
                (self.at, self.end, self.fin) = (0, FRAME_HEADER_LEN, true);
            } else {
                self.buf[..FRAME_HEADER_LEN].copy_from_slice(&frame::data_header(n));
                (self.at, self.end) = (0, FRAME_HEADER_LEN + n);
                self.bytes += n as u64;
            }
        }
    }
}

/// What the two directions share: the decoder of what comes from the enclave, and whether
/// anything moved.
struct Flow<'a> {
    incoming: &'a mut Deframer,
    moved: &'a mut bool,
}

impl FromEnclave {
    /// Moves bytes until both sides would block. After the FIN has been passed on it keeps
    /// reading the link, only to notice the enclave side going away before this side finishes.
    fn poll(
        &mut self,
        cx: &mut Context<'_>,
        tcp: &mut TcpStream,
        link: &mut Stream,
        flow: &mut Flow<'_>,
    ) -> Poll<Result<(), SpliceError>> {
        loop {
            if !self.data.is_empty() {
                let n = ready!(Pin::new(&mut *tcp).poll_write(cx, &self.buf[self.data.clone()]))
                    .map_err(SpliceError::Tcp)?;
                if n == 0 {
                    return Poll::Ready(Err(SpliceError::Tcp(io::ErrorKind::WriteZero.into())));
                }
                self.data.start += n;
                self.bytes += n as u64;
                *flow.moved = true;
                continue;
            }
            if self.at < self.end {
                let (used, chunk) = flow.incoming.decode(&self.buf[self.at..self.end])?;
                self.at += used;
                match chunk {
                    Some(Chunk::Data(n)) => self.data = self.at - n..self.at,
                    Some(Chunk::Fin) => {}
                    Some(Chunk::Rst) => return Poll::Ready(Err(SpliceError::PeerReset)),
                    None => {}
                }
                continue;
            }
            if flow.incoming.end() == End::Fin && !self.done {
                ready!(Pin::new(&mut *tcp).poll_shutdown(cx)).map_err(SpliceError::Tcp)?;
                self.done = true;
            }
            let mut rb = ReadBuf::new(&mut self.buf);
            ready!(Pin::new(&mut *link).poll_read(cx, &mut rb)).map_err(link_err)?;
            let n = rb.filled().len();
            if n == 0 {
                return Poll::Ready(if self.done {
                    // The enclave side closed after its FIN: fine only once this side has
                    // finished too, which the caller checks.
                    Ok(())
                } else {
                    Err(link_err(io::Error::new(
                        io::ErrorKind::UnexpectedEof,
                        if flow.incoming.mid_frame() {
                            "link ended inside a frame"
                        } else {
                            "link ended without FIN"
                        },
                    )))
                });
            }
            *flow.moved = true;
            (self.at, self.end) = (0, n);
        }
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
    };
    let mut down = FromEnclave {
        buf: vec![0u8; BUF].into_boxed_slice(),
        at: 0,
        end: 0,
        data: 0..0,
        done: false,
        bytes: 0,
    };
    let mut timer = idle.map(IdleTimer::new);
    // Set whenever bytes move; only the idle timer reads and clears it.
    let mut moved = false;
    let mut incoming = Deframer::new();
    let result = poll_fn(|cx| {
        {
            let mut flow = Flow {
                incoming: &mut incoming,
                moved: &mut moved,
            };
            if !up.done {
                if let Poll::Ready(Err(e)) = up.poll(cx, tcp, link, &mut flow) {
                    return Poll::Ready(Err(e));
                }
            }
            match down.poll(cx, tcp, link, &mut flow) {
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
            Counters::bump(if matches!(e, SpliceError::Idle(_)) {
                &counters.idle_closed
            } else {
                &counters.reset
            });
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
    use tokio::net::{TcpListener, UnixStream};

    /// A TCP connection through `pump`: returns the far TCP end (the "client"), the enclave's
    /// end of the link, and the pump task.
    async fn rig(
        idle: Option<Duration>,
    ) -> (
        TcpStream,
        UnixStream,
        tokio::task::JoinHandle<std::sync::Arc<Counters>>,
    ) {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let client = TcpStream::connect(listener.local_addr().unwrap())
            .await
            .unwrap();
        let (mut tcp, _) = listener.accept().await.unwrap();
        let (ours, enclave) = UnixStream::pair().unwrap();
        let task = tokio::spawn(async move {
            let counters = std::sync::Arc::new(Counters::default());
            let link = &mut Stream::unix(ours).unwrap();
            pump(&mut tcp, link, &counters, idle, &tracing::Span::none()).await;
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
        assert_eq!(counters.reset.load(Relaxed), 0);
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
        assert_eq!(task.await.unwrap().reset.load(Relaxed), 1);
    }

    #[tokio::test]
    async fn a_link_that_dies_resets_the_client_never_a_clean_eof() {
        for cut in [&b""[..], &[1, 0, 0, 9, b'x'][..], &[1, 0][..]] {
            let (mut client, mut enclave, task) = rig(None).await;
            enclave.write_all(cut).await.unwrap();
            drop(enclave);
            let err = read_to_end(&mut client).await.unwrap_err();
            assert_eq!(err.kind(), io::ErrorKind::ConnectionReset, "cut {cut:?}");
            assert_eq!(task.await.unwrap().reset.load(Relaxed), 1);
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
        assert_eq!(task.await.unwrap().reset.load(Relaxed), 1);
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
        assert_eq!(task.await.unwrap().idle_closed.load(Relaxed), 1);
    }
}
