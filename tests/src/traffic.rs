//! Test traffic: seeded random payloads, SHA-256 checks, and the servers that answer them.

use std::net::SocketAddr;

use rand::{RngCore, SeedableRng};
use sha2::{Digest, Sha256};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;

/// A SHA-256 digest.
pub type Hash = [u8; 32];

/// `len` pseudo-random bytes from `seed`.
pub fn payload(seed: u64, len: usize) -> Vec<u8> {
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let mut v = vec![0u8; len];
    rng.fill_bytes(&mut v);
    v
}

/// SHA-256 of `data`.
pub fn sha(data: &[u8]) -> Hash {
    Sha256::digest(data).into()
}

/// The seed a server answers a client seed with.
pub fn reply_seed(seed: u64) -> u64 {
    seed ^ 0x5eed_5eed_5eed_5eed
}

/// Sends `data` (which must start with its 8-byte seed) then half-closes, while reading the
/// other side to EOF at the same time. Returns the hash and length of what was read.
pub async fn exchange(stream: TcpStream, data: &[u8]) -> std::io::Result<(Hash, usize)> {
    let (mut r, mut w) = stream.into_split();
    let send = async {
        w.write_all(data).await?;
        w.shutdown().await
    };
    let recv = read_hashed(&mut r, Sha256::new());
    let (sent, got) = tokio::join!(send, recv);
    sent?;
    got
}

async fn read_hashed(
    r: &mut (impl AsyncReadExt + Unpin),
    mut hasher: Sha256,
) -> std::io::Result<(Hash, usize)> {
    let mut buf = vec![0u8; 256 * 1024];
    let mut total = 0;
    loop {
        let n = r.read(&mut buf).await?;
        if n == 0 {
            return Ok((hasher.finalize().into(), total));
        }
        hasher.update(&buf[..n]);
        total += n;
    }
}

/// A client payload of `len` bytes whose first 8 bytes are its seed.
pub fn client_payload(seed: u64, len: usize) -> Vec<u8> {
    let mut v = payload(seed, len);
    v[..8].copy_from_slice(&seed.to_be_bytes());
    v
}

/// Serves [`exchange`] clients: reads the 8-byte seed, then concurrently sends `reply_len`
/// bytes of `payload(reply_seed(seed))` and hashes everything received. Reports
/// `(seed, hash of received, bytes received)` on the channel.
pub fn serve_exchange(
    listener: TcpListener,
    reply_len: usize,
) -> mpsc::UnboundedReceiver<(u64, Hash, usize)> {
    let (tx, rx) = mpsc::unbounded_channel();
    tokio::spawn(async move {
        while let Ok((stream, _)) = listener.accept().await {
            let tx = tx.clone();
            tokio::spawn(async move {
                let _ = stream.set_nodelay(true);
                let (mut r, mut w) = stream.into_split();
                let mut head = [0u8; 8];
                if r.read_exact(&mut head).await.is_err() {
                    return;
                }
                let seed = u64::from_be_bytes(head);
                let reply = payload(reply_seed(seed), reply_len);
                let send = async {
                    w.write_all(&reply).await?;
                    w.shutdown().await
                };
                let mut hasher = Sha256::new();
                hasher.update(head);
                let recv = read_hashed(&mut r, hasher);
                let (_, got) = tokio::join!(send, recv);
                if let Ok((hash, n)) = got {
                    let _ = tx.send((seed, hash, n + 8));
                }
            });
        }
    });
    rx
}

/// Serves the half-close check: reads to EOF, then answers `"<len> <sha256 hex>"` and closes.
pub fn serve_after_eof(listener: TcpListener) {
    tokio::spawn(async move {
        while let Ok((mut stream, _)) = listener.accept().await {
            tokio::spawn(async move {
                let mut data = Vec::new();
                if stream.read_to_end(&mut data).await.is_ok() {
                    let reply = format!("{} {}", data.len(), hex(&sha(&data)));
                    let _ = stream.write_all(reply.as_bytes()).await;
                    let _ = stream.shutdown().await;
                }
            });
        }
    });
}

/// Sends `data`, half-closes, and returns the reply read to EOF.
pub async fn send_then_read(mut stream: TcpStream, data: &[u8]) -> std::io::Result<String> {
    stream.write_all(data).await?;
    stream.shutdown().await?;
    let mut reply = String::new();
    stream.read_to_string(&mut reply).await?;
    Ok(reply)
}

/// The reply [`serve_after_eof`] gives for `data`.
pub fn after_eof_reply(data: &[u8]) -> String {
    format!("{} {}", data.len(), hex(&sha(data)))
}

/// Lower-case hex.
pub fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// Serves one line naming the peer's address, then closes.
pub fn serve_peer_addr(listener: TcpListener) {
    tokio::spawn(async move {
        while let Ok((mut stream, peer)) = listener.accept().await {
            tokio::spawn(async move {
                let _ = stream
                    .write_all(format!("{}\n", peer.ip()).as_bytes())
                    .await;
                let _ = stream.shutdown().await;
            });
        }
    });
}

/// Reads everything the server says.
pub async fn read_all(mut stream: TcpStream) -> std::io::Result<String> {
    let mut s = String::new();
    stream.read_to_string(&mut s).await?;
    Ok(s)
}

/// Any address on `port`.
pub fn any(port: u16) -> SocketAddr {
    SocketAddr::from(([0, 0, 0, 0], port))
}

/// Sends memcached text-protocol `request` and reads until the response ends with `until`.
pub async fn memcached(
    stream: &mut TcpStream,
    request: &str,
    until: &str,
) -> std::io::Result<String> {
    stream.write_all(request.as_bytes()).await?;
    let mut out = Vec::new();
    let mut buf = [0u8; 4096];
    while !out.ends_with(until.as_bytes()) {
        let n = stream.read(&mut buf).await?;
        if n == 0 {
            return Err(std::io::ErrorKind::UnexpectedEof.into());
        }
        out.extend_from_slice(&buf[..n]);
    }
    Ok(String::from_utf8_lossy(&out).into_owned())
}

/// Echoes every byte back on each connection until the client closes.
pub fn serve_echo(listener: TcpListener) {
    tokio::spawn(async move {
        while let Ok((stream, _)) = listener.accept().await {
            tokio::spawn(async move {
                let _ = stream.set_nodelay(true);
                let (mut r, mut w) = stream.into_split();
                if tokio::io::copy(&mut r, &mut w).await.is_ok() {
                    let _ = w.shutdown().await;
                }
            });
        }
    });
}

/// Sends an endless stream to each connection (a download that never ends) until writing fails.
pub fn serve_stream(listener: TcpListener) {
    tokio::spawn(async move {
        let chunk = std::sync::Arc::new(payload(0xd0, 64 * 1024));
        while let Ok((mut stream, _)) = listener.accept().await {
            let chunk = chunk.clone();
            tokio::spawn(async move { while stream.write_all(&chunk).await.is_ok() {} });
        }
    });
}

/// Aborts a connection: `SO_LINGER` 0, then close, so the kernel sends a RST.
pub fn reset(stream: TcpStream) {
    let linger = libc::linger {
        l_onoff: 1,
        l_linger: 0,
    };
    nix::sys::socket::setsockopt(&stream, nix::sys::socket::sockopt::Linger, &linger)
        .expect("SO_LINGER");
    drop(stream);
}

/// Reads until the stream ends: returns the bytes read and how it ended, `Ok(())` for a clean
/// end of file or the error.
pub async fn drain(r: &mut (impl AsyncReadExt + Unpin)) -> (u64, std::io::Result<()>) {
    let mut buf = vec![0u8; 256 * 1024];
    let mut total = 0u64;
    loop {
        match r.read(&mut buf).await {
            Ok(0) => return (total, Ok(())),
            Ok(n) => total += n as u64,
            Err(e) => return (total, Err(e)),
        }
    }
}
