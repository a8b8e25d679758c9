//! Many idle connections held open through the pair, for the scale test and the scale table.
//!
//! Clients in the client namespace connect to published ports from many source addresses; a
//! server in the enclave namespace ([`hold`], run as a process of its own: the `idle-holder`
//! binary, or `enclave-bench --hold-idle`) accepts each connection and holds it. A connection
//! counts only once that server has accepted it, that is once it crossed the pair end to end.
//!
//! Descriptors: the clients cost the calling process one each, the server one each in its own
//! process, and host-proxy two each (client socket and link stream). Without `CAP_SYS_RESOURCE`
//! no process can raise its hard `RLIMIT_NOFILE`, so on a machine whose hard limit is 20,000
//! one process cannot hold both ends of 10,000 connections, and one host-proxy cannot carry
//! quite 10,000 ([`capacity`]).

use std::io::Write;
use std::net::{IpAddr, SocketAddr, SocketAddrV4, TcpListener};
use std::os::fd::AsRawFd;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use nix::errno::Errno;
use nix::sys::socket::{
    bind, listen, recv, setsockopt, socket, sockopt, AddressFamily, Backlog, MsgFlags, SockFlag,
    SockType, SockaddrIn,
};
use tokio::net::TcpStream;
use tokio::task::JoinSet;

use crate::netns::Netns;

/// Connections between the client's `connect` and the server's `accept` at once. A client's
/// `connect` completes as soon as host-proxy's kernel answers, before the pair has set the
/// connection up, so this is what bounds set-ups in the pair: a burst of thousands would meet
/// enclave-proxy's bound on streams in set-up (1,024) and be reset, which is neither what the
/// scale row measures nor what the scale test asks of the pair.
pub const WINDOW: usize = 256;

/// How long the server may accept nothing before opening gives up.
const STALL: Duration = Duration::from_secs(20);

/// The server's listen queue.
const BACKLOG: i32 = 4096;

/// How often the server looks for connections that were closed under it.
const SCAN_EVERY: u32 = 10;

/// The most connections host-proxy can carry with `limit` descriptors when `open` are in use
/// now: two each, less `margin` for the connections measured beside them.
pub fn capacity(limit: u64, open: u64, margin: u64) -> u64 {
    limit.saturating_sub(open).saturating_sub(margin) / 2
}

/// Accepts connections on `addr` and holds them until killed, printing `held N` whenever the
/// number still open changes (at most every 100 ms). Once a second it drops the connections
/// that ended (end of file or reset), printing `closed N` with the total so far, so that a
/// connection the pair closed leaves the count. Raises its soft descriptor limit to the hard
/// one.
pub fn hold(addr: SocketAddrV4) -> std::io::Result<()> {
    let limit = crate::raise_nofile(65_536);
    let fd = socket(
        AddressFamily::Inet,
        SockType::Stream,
        SockFlag::SOCK_CLOEXEC,
        None,
    )?;
    setsockopt(&fd, sockopt::ReuseAddr, &true)?;
    bind(fd.as_raw_fd(), &SockaddrIn::from(addr))?;
    listen(&fd, Backlog::new(BACKLOG)?)?;
    let listener = TcpListener::from(fd);
    println!("holding connections on {addr}; RLIMIT_NOFILE {limit}");
    let _ = std::io::stdout().flush();
    let streams = Arc::new(Mutex::new(Vec::new()));
    let watched = streams.clone();
    std::thread::spawn(move || report(&watched));
    loop {
        match listener.accept() {
            Ok((s, _)) => streams
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .push(s),
            Err(e) => {
                // EMFILE and the like: say so, and keep what is held.
                eprintln!("accept: {e}");
                std::thread::sleep(Duration::from_millis(100));
            }
        }
    }
}

/// [`hold`]'s reporter: prints the count held whenever it changes, and drops ended connections.
fn report(streams: &Mutex<Vec<std::net::TcpStream>>) {
    let mut shown = usize::MAX;
    let mut closed = 0usize;
    for tick in 1u32.. {
        let held = {
            let mut streams = streams.lock().unwrap_or_else(PoisonError::into_inner);
            if tick % SCAN_EVERY == 0 {
                let before = streams.len();
                streams.retain(|s| is_open(s.as_raw_fd()));
                let ended = before - streams.len();
                if ended > 0 {
                    closed += ended;
                    println!("closed {closed}");
                }
            }
            streams.len()
        };
        if held != shown {
            println!("held {held}");
            shown = held;
        }
        let _ = std::io::stdout().flush();
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// Whether a connected socket has neither ended nor failed, without reading from it or
/// blocking: a peek that finds nothing to read yet (or bytes the peer sent) means open; an end
/// of file or an error (a reset) means it ended.
fn is_open(fd: std::os::fd::RawFd) -> bool {
    let mut b = [0u8; 1];
    match recv(fd, &mut b, MsgFlags::MSG_PEEK | MsgFlags::MSG_DONTWAIT) {
        Ok(n) => n > 0,
        Err(e) => e == Errno::EAGAIN || e == Errno::EINTR,
    }
}

/// The last `held N` a [`hold`] process printed.
pub fn held(log: &str) -> usize {
    log.lines()
        .rev()
        .find_map(|l| l.strip_prefix("held ")?.trim().parse().ok())
        .unwrap_or(0)
}

/// How many held connections a [`hold`] process has seen end (its last `closed N`).
pub fn closed(log: &str) -> usize {
    log.lines()
        .rev()
        .find_map(|l| l.strip_prefix("closed ")?.trim().parse().ok())
        .unwrap_or(0)
}

/// Idle client connections, closed on drop.
#[derive(Debug)]
pub struct Idle {
    clients: Vec<TcpStream>,
    // Last: the sockets above deregister from its reactor when they drop.
    runtime: tokio::runtime::Runtime,
}

impl Idle {
    /// Opens `n` connections from `client`, spread evenly over `sources` and, within each
    /// source, in turn over `dsts`, and waits until `accepted()` (the server's count) reaches
    /// `n`. Call it outside any tokio runtime: it runs one of its own.
    pub fn open(
        client: &Netns,
        dsts: &[SocketAddr],
        sources: &[IpAddr],
        n: usize,
        accepted: &dyn Fn() -> usize,
    ) -> Result<Idle, String> {
        if dsts.is_empty() || sources.is_empty() {
            return Err("idle connections need a destination and a source".into());
        }
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .map_err(|e| format!("runtime: {e}"))?;
        let started = Instant::now();
        let opened = runtime.block_on(open_all(client, dsts, sources, n, accepted));
        // Built before `?`, so that a failure closes whatever did open.
        let mut idle = Idle {
            clients: Vec::new(),
            runtime,
        };
        idle.clients = opened?;
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let got = accepted();
            if got >= n {
                break;
            }
            if Instant::now() > deadline {
                return Err(format!(
                    "only {got} of {n} connections reached the enclave server"
                ));
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        println!(
            "{n} idle connections open in {:.1} s",
            started.elapsed().as_secs_f64()
        );
        Ok(idle)
    }

    /// How many connections are held.
    pub fn len(&self) -> usize {
        self.clients.len()
    }

    /// Whether none are.
    pub fn is_empty(&self) -> bool {
        self.clients.is_empty()
    }

    /// How many of the client ends are still open: each is peeked at without blocking for an
    /// end of stream or an error.
    pub fn still_open(&self) -> usize {
        self.clients
            .iter()
            .filter(|s| is_open(s.as_raw_fd()))
            .count()
    }
}

impl Drop for Idle {
    fn drop(&mut self) {
        let _guard = self.runtime.enter();
        self.clients.clear();
    }
}

/// Opens the connections, keeping at most [`WINDOW`] of them between the client's `connect`
/// and the server's `accept`.
async fn open_all(
    client: &Netns,
    dsts: &[SocketAddr],
    sources: &[IpAddr],
    n: usize,
    accepted: &dyn Fn() -> usize,
) -> Result<Vec<TcpStream>, String> {
    let mut sockets = Vec::with_capacity(n);
    for (i, ip) in sources.iter().enumerate() {
        let count = n / sources.len() + usize::from(i < n % sources.len());
        let made = client
            .sockets(count, Some(*ip))
            .map_err(|e| format!("{count} sockets from {ip}: {e}"))?;
        sockets.extend(made.into_iter().zip(dsts.iter().cycle()));
    }
    let mut opening = JoinSet::new();
    let (mut started, mut done, mut progress) = (0usize, 0usize, Instant::now());
    for (socket, dst) in sockets {
        while started - done.min(started) >= WINDOW {
            tokio::time::sleep(Duration::from_millis(10)).await;
            let now = accepted();
            if now > done {
                (done, progress) = (now, Instant::now());
            } else if progress.elapsed() > STALL {
                return Err(format!(
                    "the enclave server has accepted {done} of {started} connections and no \
                     more for {} s",
                    STALL.as_secs()
                ));
            }
        }
        let dst = *dst;
        opening.spawn(async move {
            tokio::time::timeout(Duration::from_secs(15), socket.connect(dst))
                .await
                .unwrap_or_else(|_| Err(std::io::ErrorKind::TimedOut.into()))
        });
        started += 1;
    }
    let mut clients = Vec::with_capacity(n);
    let mut failed = 0usize;
    let mut first_error = None;
    while let Some(r) = opening.join_next().await {
        match r
            .map_err(|e| e.to_string())
            .and_then(|r| r.map_err(|e| e.to_string()))
        {
            Ok(s) => clients.push(s),
            Err(e) => {
                failed += 1;
                first_error.get_or_insert(e);
            }
        }
    }
    if failed > 0 {
        return Err(format!(
            "{failed} of {n} idle connections failed to connect, e.g. {}",
            first_error.unwrap_or_default()
        ));
    }
    Ok(clients)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn capacity_is_what_fits_at_two_descriptors_each() {
        // host-proxy with 20,000 descriptors, 14 open and 16 kept for the measurement.
        assert_eq!(capacity(20_000, 14, 16), 9985);
        assert_eq!(capacity(100, 200, 16), 0);
    }

    #[test]
    fn held_and_closed_read_the_last_count() {
        let log = "holding connections\nheld 0\nheld 512\nheld 9985\nclosed 2\nheld 9983\n";
        assert_eq!(held(log), 9983);
        assert_eq!(closed(log), 2);
        assert_eq!(held("holding connections\n"), 0);
        assert_eq!(closed("holding connections\nheld 3\n"), 0);
    }

    #[test]
    fn a_socket_is_open_until_its_peer_closes() {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let client = std::net::TcpStream::connect(listener.local_addr().unwrap()).unwrap();
        let (server, _) = listener.accept().unwrap();
        assert!(is_open(client.as_raw_fd()), "idle, nothing sent");
        (&server).write_all(b"x").unwrap();
        std::thread::sleep(Duration::from_millis(50));
        assert!(is_open(client.as_raw_fd()), "a byte waiting is still open");
        drop(server);
        std::thread::sleep(Duration::from_millis(50));
        // The byte is still ahead of the end of file: the peek sees it first.
        let mut b = [0u8; 1];
        std::io::Read::read_exact(&mut &client, &mut b).unwrap();
        assert!(!is_open(client.as_raw_fd()), "after the peer's FIN");
    }
}
