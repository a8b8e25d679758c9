//! The link between the two daemons: real vsock, or a Unix socket standing in for it.
//!
//! Every place that talks to the other daemon takes a [`LinkAddr`], written `vsock:CID:PORT`,
//! `hvsock:PATH:PORT` (a guest's vsock as its VMM shows it to the host) or `unix:PATH`. Every
//! form produces a [`Stream`], and everything above this module is the same for all.
//!
//! Every single write to a stream is capped at [`MAX_WRITE`] bytes: on Nitro, vsock writes larger
//! than 32 KiB have caused silent data corruption with guest kernels after Aug 2025
//! (DESIGN.md, "Platform facts"). The cap is applied in [`Stream::poll_write`], so no caller can
//! forget it.

use std::fmt;
use std::io;
use std::path::PathBuf;
use std::pin::Pin;
use std::str::FromStr;
use std::task::{Context, Poll};

use std::io::{Read, Write};
use std::os::fd::{AsFd, OwnedFd};

use tokio::io::unix::AsyncFd;
use tokio::io::{AsyncRead, AsyncWrite, Interest, ReadBuf};
use tokio::net::{UnixListener, UnixStream};
use tokio_vsock::{VsockAddr, VsockListener, VsockStream, VMADDR_CID_ANY};

/// The largest single write to a stream (DESIGN.md: cap every vsock write at 32 KiB).
pub const MAX_WRITE: usize = 32 * 1024;

/// The default vsock buffer for link streams, in bytes.
///
/// vsock's own default (and maximum) is 256 KiB. That is about one bandwidth-delay product at
/// Nitro's published ~12 Gbit/s per stream and ~124 µs median round trip, so any hiccup in
/// credit updates stalls the sender; raising it to 8 MiB fixed stalled bulk uploads in another
/// project (DESIGN.md). 2 MiB is four times the p99-round-trip BDP (12.7 Gbit/s × 263 µs ≈
/// 420 KB), while bounding what a stalled stream can pin in kernel memory: the receiving daemon
/// reads a link only as fast as its TCP peer takes the bytes, so up to this much can wait per
/// stream. `--vsock-buffer-kib` changes it.
pub const DEFAULT_VSOCK_BUFFER: u64 = 2 * 1024 * 1024;

static VSOCK_BUFFER: std::sync::atomic::AtomicU64 =
    std::sync::atomic::AtomicU64::new(DEFAULT_VSOCK_BUFFER);

/// Sets the buffer every vsock link stream made from now on gets (see [`DEFAULT_VSOCK_BUFFER`]).
pub fn set_vsock_buffer(bytes: u64) {
    VSOCK_BUFFER.store(bytes, std::sync::atomic::Ordering::Relaxed);
}

/// Applies the vsock buffer to a socket; failing costs only speed, so it is logged, not fatal.
fn tune_vsock(fd: std::os::fd::BorrowedFd<'_>) {
    let bytes = VSOCK_BUFFER.load(std::sync::atomic::Ordering::Relaxed);
    if let Err(e) = crate::sys::set_vsock_buffer(fd, bytes) {
        crate::warn_limited!("cannot set the vsock buffer to {bytes} bytes: {e}");
    }
}

/// Where the other daemon is, or where to wait for it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum LinkAddr {
    /// Real AF_VSOCK. A CID of `u32::MAX` (`VMADDR_CID_ANY`, written `any`) is for listening.
    Vsock {
        /// Context ID; 3 is the parent instance.
        cid: u32,
        /// vsock port.
        port: u32,
    },
    /// A Unix stream socket standing in for vsock (shared across network namespaces).
    Unix(PathBuf),
    /// A guest's vsock seen from the host as a Unix socket that speaks "hybrid vsock"
    /// (Firecracker, Cloud Hypervisor, `vhost-device-vsock`), written `hvsock:PATH:PORT`. To
    /// reach the guest's port PORT: connect to PATH, send `CONNECT PORT\n`, read `OK ...\n`. To
    /// accept the guest's connections to the host's port PORT: listen on the Unix socket
    /// `PATH_PORT`, where the VMM delivers them.
    Hybrid {
        /// The VMM's Unix socket.
        path: PathBuf,
        /// The vsock port.
        port: u32,
    },
}

/// Why a link address could not be parsed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AddrError {
    /// No `vsock:` or `unix:` prefix.
    #[error("{0:?} is not a link address: use vsock:CID:PORT, hvsock:PATH:PORT or unix:PATH")]
    Scheme(String),
    /// A vsock address without both parts, or with non-numbers.
    #[error("{0:?} is not vsock:CID:PORT (CID a number or `any`, PORT a number)")]
    Vsock(String),
    /// `unix:` with nothing after it.
    #[error("unix: needs a path")]
    EmptyPath,
    /// `hvsock:` without a path and a port.
    #[error("{0:?} is not hvsock:PATH:PORT (the VMM's Unix socket, then a vsock port number)")]
    Hybrid(String),
}

impl FromStr for LinkAddr {
    type Err = AddrError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        if let Some(rest) = s.strip_prefix("vsock:") {
            let (cid, port) = rest
                .split_once(':')
                .ok_or_else(|| AddrError::Vsock(s.into()))?;
            let cid = if cid == "any" {
                VMADDR_CID_ANY
            } else {
                cid.parse().map_err(|_| AddrError::Vsock(s.into()))?
            };
            let port = port.parse().map_err(|_| AddrError::Vsock(s.into()))?;
            Ok(LinkAddr::Vsock { cid, port })
        } else if let Some(rest) = s.strip_prefix("hvsock:") {
            let (path, port) = rest
                .rsplit_once(':')
                .ok_or_else(|| AddrError::Hybrid(s.into()))?;
            let port = port.parse().map_err(|_| AddrError::Hybrid(s.into()))?;
            if path.is_empty() {
                return Err(AddrError::Hybrid(s.into()));
            }
            Ok(LinkAddr::Hybrid {
                path: path.into(),
                port,
            })
        } else if let Some(path) = s.strip_prefix("unix:") {
            if path.is_empty() {
                return Err(AddrError::EmptyPath);
            }
            Ok(LinkAddr::Unix(path.into()))
        } else {
            Err(AddrError::Scheme(s.into()))
        }
    }
}

impl fmt::Display for LinkAddr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            LinkAddr::Vsock { cid, port } if *cid == VMADDR_CID_ANY => {
                write!(f, "vsock:any:{port}")
            }
            LinkAddr::Vsock { cid, port } => write!(f, "vsock:{cid}:{port}"),
            LinkAddr::Unix(path) => write!(f, "unix:{}", path.display()),
            LinkAddr::Hybrid { path, port } => write!(f, "hvsock:{}:{port}", path.display()),
        }
    }
}

impl LinkAddr {
    /// Opens a stream to this address.
    pub async fn connect(&self) -> io::Result<Stream> {
        match self {
            LinkAddr::Vsock { cid, port } => {
                let s = VsockStream::connect(VsockAddr::new(*cid, *port)).await?;
                tune_vsock(std::os::fd::AsFd::as_fd(&s));
                Ok(Stream::Vsock(s))
            }
            LinkAddr::Unix(path) => Stream::unix(UnixStream::connect(path).await?),
            LinkAddr::Hybrid { path, port } => {
                let mut s = UnixStream::connect(path).await?;
                hybrid_connect(&mut s, *port).await.map_err(|e| {
                    io::Error::new(e.kind(), format!("hvsock:{}:{port}: {e}", path.display()))
                })?;
                Stream::unix(s)
            }
        }
    }

    /// Starts listening on this address.
    ///
    /// A Unix socket file left behind by a daemon that died is removed first; a live one (some
    /// process still accepts on it) makes this fail with `AddrInUse`.
    pub async fn listen(&self) -> io::Result<Listener> {
        match self {
            LinkAddr::Vsock { cid, port } => {
                let l = VsockListener::bind(VsockAddr::new(*cid, *port))?;
                // Accepted streams inherit the listener's buffer size.
                tune_vsock(std::os::fd::AsFd::as_fd(&l));
                Ok(Listener::Vsock(l))
            }
            LinkAddr::Unix(path) => listen_unix(path.clone()).await,
            LinkAddr::Hybrid { path, port } => {
                let mut name = path.clone().into_os_string();
                name.push(format!("_{port}"));
                listen_unix(name.into()).await
            }
        }
    }
}

/// Listens on the Unix socket `path`. A socket file left behind by a daemon that died is
/// removed first; a live one (some process still accepts on it) makes this fail with
/// `AddrInUse`.
async fn listen_unix(path: PathBuf) -> io::Result<Listener> {
    if path.exists() {
        match UnixStream::connect(&path).await {
            Ok(_) => {
                return Err(io::Error::new(
                    io::ErrorKind::AddrInUse,
                    format!("{} is in use by a live listener", path.display()),
                ))
            }
            Err(_) => std::fs::remove_file(&path)?,
        }
    }
    Ok(Listener::Unix(UnixListener::bind(&path)?, path))
}

/// The longest answer to `CONNECT` read: `OK ` and a port number, with room to spare.
pub const HYBRID_ANSWER_MAX: usize = 64;

/// The hybrid vsock handshake on a fresh connection to the VMM's socket: `CONNECT port\n`, then
/// `OK <number>\n` back. Read a byte at a time, so nothing after the answer is consumed. A VMM
/// that closes (nothing listens on the guest's port) is `ConnectionRefused`; any other answer,
/// or one longer than [`HYBRID_ANSWER_MAX`], is `InvalidData`. The caller bounds it in time.
pub async fn hybrid_connect<S>(s: &mut S, port: u32) -> io::Result<()>
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
{
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let refused = || {
        io::Error::new(
            io::ErrorKind::ConnectionRefused,
            format!(
                "the VMM closed the connection instead of answering CONNECT {port} (is anything \
                 listening on that port in the guest?)"
            ),
        )
    };
    let closed = |e: &io::Error| {
        matches!(
            e.kind(),
            io::ErrorKind::BrokenPipe | io::ErrorKind::ConnectionReset
        )
    };
    match s.write_all(format!("CONNECT {port}\n").as_bytes()).await {
        Err(e) if closed(&e) => return Err(refused()),
        r => r?,
    }
    let mut answer = Vec::new();
    loop {
        let mut byte = [0u8; 1];
        match s.read(&mut byte).await {
            Ok(0) => return Err(refused()),
            Err(e) if closed(&e) => return Err(refused()),
            r => r?,
        };
        if byte[0] == b'\n' {
            break;
        }
        answer.push(byte[0]);
        if answer.len() > HYBRID_ANSWER_MAX {
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                format!("answer to CONNECT {port} longer than {HYBRID_ANSWER_MAX} bytes"),
            ));
        }
    }
    let ok = answer
        .strip_prefix(b"OK ")
        .is_some_and(|n| !n.is_empty() && n.iter().all(u8::is_ascii_digit));
    if ok {
        Ok(())
    } else {
        Err(io::Error::new(
            io::ErrorKind::InvalidData,
            format!(
                "answer to CONNECT {port} was {:?}, not OK <port>",
                String::from_utf8_lossy(&answer)
            ),
        ))
    }
}

/// Send buffer for Unix link streams. A Unix stream's sender buffer bounds the bytes in flight;
/// the default (about 208 KiB) makes each side sleep and wake every few 32 KiB writes.
const UNIX_SNDBUF: usize = 4 * 1024 * 1024;

fn tune_unix(s: &impl AsFd) {
    use nix::sys::socket::{setsockopt, sockopt};
    // SNDBUFFORCE passes net.core.wmem_max when privileged; otherwise fall back to the capped
    // option. Either failing only costs speed.
    if setsockopt(s, sockopt::SndBufForce, &UNIX_SNDBUF).is_err() {
        let _ = setsockopt(s, sockopt::SndBuf, &UNIX_SNDBUF);
    }
}

/// A Unix link stream that waits for write space only while a write is blocked.
///
/// tokio registers a socket for both read and write readiness, edge-triggered. A Unix stream
/// signals write space every time its peer reads (`unix_write_space`), so with that registration
/// every read by one daemon wakes the other, which has nothing to write: measured under
/// memcaslap, 42-44% of each daemon's wake-ups, about 5 µs of CPU per request/response across the
/// pair. Here the socket is registered for reading only; a write goes straight to the socket,
/// and only when it would block is a second descriptor of the same socket registered for write
/// readiness, until a write succeeds again. (Registering a socket that already has space reports
/// it at once, so no wake-up is lost in between.) vsock does not need this: it signals write
/// space only when credit comes back, and that rides on the packets being read anyway.
#[derive(Debug)]
pub struct UnixLink {
    read: AsyncFd<std::os::unix::net::UnixStream>,
    /// The same socket, registered for write readiness while a write is blocked.
    write: Option<AsyncFd<OwnedFd>>,
}

impl UnixLink {
    fn new(s: std::os::unix::net::UnixStream) -> io::Result<UnixLink> {
        s.set_nonblocking(true)?;
        tune_unix(&s);
        Ok(UnixLink {
            read: crate::sys::register(s, Interest::READABLE)?,
            write: None,
        })
    }

    fn poll_read(&mut self, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        loop {
            let mut guard = std::task::ready!(self.read.poll_read_ready(cx))?;
            let unfilled = buf.initialize_unfilled();
            match guard.try_io(|s| s.get_ref().read(unfilled)) {
                Ok(Ok(n)) => {
                    buf.advance(n);
                    return Poll::Ready(Ok(()));
                }
                Ok(Err(e)) => return Poll::Ready(Err(e)),
                Err(_would_block) => continue,
            }
        }
    }

    fn poll_write(&mut self, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        loop {
            match self.read.get_ref().write(buf) {
                Ok(n) => {
                    self.write = None;
                    return Poll::Ready(Ok(n));
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => return Poll::Ready(Err(e)),
            }
            let write = match &mut self.write {
                Some(w) => w,
                None => {
                    let fd = self.read.get_ref().as_fd().try_clone_to_owned()?;
                    self.write
                        .insert(crate::sys::register(fd, Interest::WRITABLE)?)
                }
            };
            let mut guard = std::task::ready!(write.poll_write_ready(cx))?;
            // Ready as of the last event: try again, and wait for a new event if it still fails.
            guard.clear_ready();
        }
    }

    fn shutdown(&self) -> io::Result<()> {
        match self.read.get_ref().shutdown(std::net::Shutdown::Write) {
            Err(e) if e.kind() != io::ErrorKind::NotConnected => Err(e),
            _ => Ok(()),
        }
    }
}

/// A listening link socket.
#[derive(Debug)]
pub enum Listener {
    /// AF_VSOCK.
    Vsock(VsockListener),
    /// A Unix socket, with its path so that it can be removed on drop.
    Unix(UnixListener, PathBuf),
}

impl Listener {
    /// Waits for the next stream; returns it with a description of the peer for logs.
    pub async fn accept(&self) -> io::Result<(Stream, String)> {
        match self {
            Listener::Vsock(l) => {
                let (s, peer) = l.accept().await?;
                tune_vsock(std::os::fd::AsFd::as_fd(&s));
                Ok((
                    Stream::Vsock(s),
                    format!("vsock:{}:{}", peer.cid(), peer.port()),
                ))
            }
            Listener::Unix(l, path) => {
                let (s, _) = l.accept().await?;
                Ok((Stream::unix(s)?, format!("unix:{}", path.display())))
            }
        }
    }
}

impl Drop for Listener {
    fn drop(&mut self) {
        if let Listener::Unix(_, path) = self {
            let _ = std::fs::remove_file(path);
        }
    }
}

/// A connected link stream, vsock or Unix. Writes are capped at [`MAX_WRITE`] bytes each.
#[derive(Debug)]
pub enum Stream {
    /// AF_VSOCK.
    Vsock(VsockStream),
    /// Unix stream socket.
    Unix(UnixLink),
}

impl Stream {
    /// A link stream over a connected Unix socket.
    pub fn unix(s: UnixStream) -> io::Result<Stream> {
        Ok(Stream::Unix(UnixLink::new(s.into_std()?)?))
    }

    /// The vsock peer's context ID (`None` on a Unix socket, or if the kernel cannot say).
    pub fn peer_cid(&self) -> Option<u32> {
        match self {
            Stream::Vsock(s) => s.peer_addr().ok().map(|a| a.cid()),
            Stream::Unix(_) => None,
        }
    }
}

impl AsyncRead for Stream {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Stream::Vsock(s) => Pin::new(s).poll_read(cx, buf),
            Stream::Unix(s) => s.poll_read(cx, buf),
        }
    }
}

impl AsyncWrite for Stream {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let buf = &buf[..buf.len().min(MAX_WRITE)];
        match self.get_mut() {
            Stream::Vsock(s) => Pin::new(s).poll_write(cx, buf),
            Stream::Unix(s) => s.poll_write(cx, buf),
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Stream::Vsock(s) => Pin::new(s).poll_flush(cx),
            Stream::Unix(_) => Poll::Ready(Ok(())),
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Stream::Vsock(s) => Pin::new(s).poll_shutdown(cx),
            Stream::Unix(s) => Poll::Ready(s.shutdown()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_both_forms_and_rejects_the_rest() {
        assert_eq!(
            "vsock:3:5001".parse(),
            Ok(LinkAddr::Vsock { cid: 3, port: 5001 })
        );
        assert_eq!(
            "vsock:any:5000".parse(),
            Ok(LinkAddr::Vsock {
                cid: VMADDR_CID_ANY,
                port: 5000
            })
        );
        assert_eq!(
            "unix:/run/x.sock".parse(),
            Ok(LinkAddr::Unix("/run/x.sock".into()))
        );
        assert!(matches!(
            "tcp:1.2.3.4:5".parse::<LinkAddr>(),
            Err(AddrError::Scheme(_))
        ));
        assert!(matches!(
            "vsock:3".parse::<LinkAddr>(),
            Err(AddrError::Vsock(_))
        ));
        assert!(matches!(
            "vsock:x:1".parse::<LinkAddr>(),
            Err(AddrError::Vsock(_))
        ));
        assert_eq!("unix:".parse::<LinkAddr>(), Err(AddrError::EmptyPath));
        let h: LinkAddr = "hvsock:/run/fc:v.sock:5000".parse().unwrap();
        assert_eq!(
            h,
            LinkAddr::Hybrid {
                path: "/run/fc:v.sock".into(),
                port: 5000
            }
        );
        assert_eq!(h.to_string(), "hvsock:/run/fc:v.sock:5000");
        for bad in [
            "hvsock:/v.sock",
            "hvsock::5000",
            "hvsock:/v.sock:x",
            "hvsock:5000",
        ] {
            assert!(
                matches!(bad.parse::<LinkAddr>(), Err(AddrError::Hybrid(_))),
                "{bad}"
            );
        }
        assert_eq!(
            "vsock:any:5000".parse::<LinkAddr>().unwrap().to_string(),
            "vsock:any:5000"
        );
    }

    /// The hybrid handshake: `OK <port>` lets the stream through with nothing after it read;
    /// a refusal, a garbled answer or an endless one is an error that says what came back.
    #[tokio::test]
    async fn hybrid_connect_checks_the_answer() {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        async fn answer(reply: &[u8], close: bool) -> (io::Result<()>, Vec<u8>) {
            let (mut ours, mut vmm) = tokio::io::duplex(4096);
            vmm.write_all(reply).await.unwrap();
            if close {
                drop(vmm);
                return (hybrid_connect(&mut ours, 5000).await, Vec::new());
            }
            let result = hybrid_connect(&mut ours, 5000).await;
            let mut asked = vec![0u8; 13];
            vmm.read_exact(&mut asked).await.unwrap();
            (result, asked)
        }
        let (ok, asked) = answer(b"OK 1073741824\npayload", false).await;
        ok.unwrap();
        assert_eq!(asked, b"CONNECT 5000\n");
        let (refused, _) = answer(b"", true).await;
        assert_eq!(
            refused.unwrap_err().kind(),
            io::ErrorKind::ConnectionRefused
        );
        for bad in [&b"NO 5000\n"[..], b"OK\n", b"OK 50x0\n", &[b'O'; 100]] {
            let (e, _) = answer(bad, false).await;
            let e = e.unwrap_err();
            assert_eq!(e.kind(), io::ErrorKind::InvalidData, "{bad:?}: {e}");
        }
        // The bytes after the answer are left for the stream.
        let (mut ours, mut vmm) = tokio::io::duplex(4096);
        vmm.write_all(b"OK 7\nrest").await.unwrap();
        hybrid_connect(&mut ours, 1).await.unwrap();
        let mut rest = [0u8; 4];
        ours.read_exact(&mut rest).await.unwrap();
        assert_eq!(&rest, b"rest");
    }

    #[tokio::test]
    async fn writes_are_capped_at_32k() {
        use tokio::io::AsyncWriteExt;
        let (a, _b) = UnixStream::pair().unwrap();
        let mut s = Stream::unix(a).unwrap();
        let big = vec![7u8; 200 * 1024];
        let n = s.write(&big).await.unwrap();
        assert!(n <= MAX_WRITE, "wrote {n} bytes in one call");
    }
}
