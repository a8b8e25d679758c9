//! The enclave's resolver, parent side: enclave-proxy answers DNS at its gateway address and
//! forwards every query here, over a stream of kind `DnsUdp` (datagram frames, one stream per
//! client socket) or `DnsTcp` (one DNS-over-TCP connection).
//!
//! A query goes to the resolvers in order (`--dns-upstream`, or the `nameserver` lines of the
//! parent's resolv.conf, re-read when the file changes), each from a fresh UDP socket, until one
//! answers with the query's id; the answer goes back byte for byte (id, TTLs, the TC bit). When
//! none answers within `--dns-timeout`, or there is none, the enclave gets SERVFAIL and the log
//! says why. DNS over TCP is carried to the first resolver that accepts a connection.
//!
//! Nothing from the enclave is trusted: a datagram that is not a DNS query (shorter than a
//! header, or a response) is dropped and counted; a reply from a resolver is passed on only if
//! it came from that resolver's address and carries the query's id.

use std::io;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, SystemTime};

use common::datagram::DatagramLink;
use common::dns::{is_query, servfail, HEADER_LEN};
use common::frame::MAX_DATAGRAM;
use common::handshake::write_status;
use common::metrics::Counters;
use common::transport::Stream;
use common::wire::Status;
use tokio::net::{TcpStream, UdpSocket};
use tokio::time::Instant;
use tracing::{debug, Instrument};

use crate::Shared;

/// How long a DNS stream may stay without a query before host-proxy ends it. enclave-proxy
/// ends its side sooner; this only bounds a stream it forgot.
const STREAM_IDLE: Duration = Duration::from_secs(60);
/// Queries one DNS flow may have out with the resolvers at once.
pub const MAX_PENDING_QUERIES: usize = 64;

/// Parses `--dns-upstream`: `IP` (port 53) or `IP:PORT` (`[IPv6]:PORT`).
pub fn parse_upstream(s: &str) -> Result<SocketAddr, String> {
    if let Ok(ip) = s.parse::<IpAddr>() {
        return Ok(SocketAddr::new(ip, 53));
    }
    match s.parse::<SocketAddr>() {
        Ok(addr) if addr.port() != 0 => Ok(addr),
        _ => Err(format!("{s:?} is not IP or IP:PORT (IPv6 as [IP]:PORT)")),
    }
}

/// The nameservers of a resolv.conf text, on port 53. Lines that are not a `nameserver` with an
/// IP address (comments, options, a scoped IPv6 address) are skipped.
pub fn nameservers(text: &str) -> Vec<SocketAddr> {
    text.lines()
        .filter_map(|line| {
            let mut words = line.split_whitespace();
            (words.next() == Some("nameserver"))
                .then(|| words.next()?.parse::<IpAddr>().ok())
                .flatten()
        })
        .map(|ip| SocketAddr::new(ip, 53))
        .collect()
}

/// A resolv.conf as last read: its modification time and length, and its nameservers.
type Read = ((SystemTime, u64), Arc<Vec<SocketAddr>>);

/// Where queries go: the configured resolvers, or those of the parent's resolv.conf.
#[derive(Debug)]
pub struct Resolvers {
    configured: Vec<SocketAddr>,
    path: PathBuf,
    cache: Mutex<Option<Read>>,
}

impl Resolvers {
    /// `configured` if not empty, else the nameservers in the file at `path`.
    pub fn new(configured: Vec<SocketAddr>, path: PathBuf) -> Resolvers {
        Resolvers {
            configured,
            path,
            cache: Mutex::new(None),
        }
    }

    /// The resolvers to try now, or why there are none.
    pub fn current(&self) -> Result<Arc<Vec<SocketAddr>>, String> {
        if !self.configured.is_empty() {
            return Ok(Arc::new(self.configured.clone()));
        }
        let stamp = std::fs::metadata(&self.path)
            .and_then(|m| Ok((m.modified()?, m.len())))
            .map_err(|e| format!("cannot read {}: {e}", self.path.display()))?;
        let mut cache = self.cache.lock().unwrap_or_else(PoisonError::into_inner);
        if let Some((at, servers)) = cache.as_ref() {
            if *at == stamp {
                return non_empty(servers.clone(), &self.path);
            }
        }
        let text = std::fs::read_to_string(&self.path)
            .map_err(|e| format!("cannot read {}: {e}", self.path.display()))?;
        let servers = Arc::new(nameservers(&text));
        debug!(path = %self.path.display(), ?servers, "resolvers read");
        *cache = Some((stamp, servers.clone()));
        non_empty(servers, &self.path)
    }
}

fn non_empty(servers: Arc<Vec<SocketAddr>>, path: &Path) -> Result<Arc<Vec<SocketAddr>>, String> {
    if servers.is_empty() {
        Err(format!("no nameserver in {}", path.display()))
    } else {
        Ok(servers)
    }
}

/// Asks the resolvers in turn, sharing `budget` between them; returns the first answer with the
/// query's id, or why there is none.
pub async fn resolve(
    query: &[u8],
    servers: &[SocketAddr],
    budget: Duration,
) -> Result<Vec<u8>, String> {
    let deadline = Instant::now() + budget;
    let mut why = String::new();
    for (i, &server) in servers.iter().enumerate() {
        let left = deadline.saturating_duration_since(Instant::now());
        // An equal share of what is left, so a dead first resolver leaves time for the others.
        let share = left / (servers.len() - i) as u32;
        match tokio::time::timeout(share, ask(query, server)).await {
            Ok(Ok(answer)) => return Ok(answer),
            Ok(Err(e)) => why = format!("{server}: {e}"),
            Err(_) => why = format!("{server}: no answer within {share:?}"),
        }
    }
    Err(why)
}

/// One query to one resolver, from a fresh socket (a random source port).
async fn ask(query: &[u8], server: SocketAddr) -> io::Result<Vec<u8>> {
    let local: SocketAddr = match server {
        SocketAddr::V4(_) => (Ipv4Addr::UNSPECIFIED, 0).into(),
        SocketAddr::V6(_) => (Ipv6Addr::UNSPECIFIED, 0).into(),
    };
    let socket = UdpSocket::bind(local).await?;
    socket.connect(server).await?;
    socket.send(query).await?;
    let mut buf = vec![0u8; MAX_DATAGRAM];
    loop {
        let n = socket.recv(&mut buf).await?;
        // A connected socket only takes the resolver's datagrams; the id must match too.
        if n >= HEADER_LEN && buf[..2] == query[..2] {
            buf.truncate(n);
            return Ok(buf);
        }
    }
}

/// Connects to the first resolver that accepts DNS over TCP within the budget.
pub async fn connect_tcp(shared: &Shared) -> Result<TcpStream, Status> {
    let servers = shared.resolvers.current().map_err(|why| {
        common::warn_limited!("enclave DNS over TCP failed: {why}");
        Status::Unreachable
    })?;
    let deadline = Instant::now() + shared.config.dns_timeout;
    for (i, &server) in servers.iter().enumerate() {
        let share = deadline.saturating_duration_since(Instant::now()) / (servers.len() - i) as u32;
        match tokio::time::timeout(share, TcpStream::connect(server)).await {
            Ok(Ok(tcp)) => {
                crate::limits::keepalive(&tcp);
                return Ok(tcp);
            }
            Ok(Err(e)) => debug!(%server, "DNS over TCP: {e}"),
            Err(_) => debug!(%server, "DNS over TCP: no connection within {share:?}"),
        }
    }
    common::warn_limited!("enclave DNS over TCP failed: no resolver accepted a connection");
    Err(Status::Unreachable)
}

/// Serves one `DnsUdp` stream, whose header has been read: answers `ok`, then answers its
/// queries until the enclave ends the stream or it stays idle. Queries are resolved side by side,
/// as a stub resolver expects (glibc asks for A and AAAA at once on one socket): one slow or
/// unanswered query never holds up the next. At most [`MAX_PENDING_QUERIES`] are out at once;
/// past that a query is dropped and counted, as a busy resolver drops one.
pub async fn serve_udp(mut link: Stream, shared: Arc<Shared>) {
    if write_status(&mut link, Status::Ok).await.is_err() {
        return;
    }
    Counters::bump(
        shared
            .counters
            .opened
            .at(common::metrics::Direction::Egress),
    );
    let mut link = DatagramLink::new(link);
    let mut pending = tokio::task::JoinSet::new();
    loop {
        tokio::select! {
            received = tokio::time::timeout(STREAM_IDLE, link.recv()) => match received {
                Ok(Ok(Some(query))) if pending.len() < MAX_PENDING_QUERIES => {
                    let shared = shared.clone();
                    pending.spawn(async move { answer(&query, &shared).await }.in_current_span());
                }
                Ok(Ok(Some(_))) => {
                    debug!("DNS query dropped: {MAX_PENDING_QUERIES} already out");
                    Counters::bump(&shared.counters.dns_dropped);
                }
                Ok(Ok(None)) => break,
                Err(_) if pending.is_empty() => break,
                Err(_) => {}
                Ok(Err(e)) => {
                    debug!("DNS stream ended: {e}");
                    return;
                }
            },
            Some(done) = pending.join_next(), if !pending.is_empty() => {
                if let Ok(Some(reply)) = done {
                    if !link.queue(&reply) {
                        debug!("DNS answer dropped: the enclave is not reading");
                        Counters::bump(&shared.counters.dns_dropped);
                    }
                }
            }
        }
        if link.flush().await.is_err() {
            return;
        }
    }
    // Answers still being resolved go out before the end.
    while let Some(done) = pending.join_next().await {
        if let Ok(Some(reply)) = done {
            if !link.queue(&reply) {
                Counters::bump(&shared.counters.dns_dropped);
            }
        }
    }
    link.finish(Duration::from_secs(1)).await;
}

/// The answer to `query`: a resolver's, or SERVFAIL; `None` if it is not a query.
async fn answer(query: &[u8], shared: &Shared) -> Option<Vec<u8>> {
    if !is_query(query) {
        debug!(
            len = query.len(),
            "dropped a datagram that is not a DNS query"
        );
        Counters::bump(&shared.counters.dns_dropped);
        return None;
    }
    Counters::bump(&shared.counters.dns_queries);
    let reply = match shared.resolvers.current() {
        Ok(servers) => resolve(query, &servers, shared.config.dns_timeout).await,
        Err(why) => Err(why),
    };
    Some(reply.unwrap_or_else(|why| {
        common::warn_limited!("enclave DNS query answered SERVFAIL: {why}");
        Counters::bump(&shared.counters.dns_servfail);
        servfail(query)
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A query for `x.` type A.
    fn query() -> Vec<u8> {
        b"\xab\xcd\x01\x00\x00\x01\x00\x00\x00\x00\x00\x00\x01x\x00\x00\x01\x00\x01".to_vec()
    }

    #[test]
    fn upstreams_and_resolv_conf_parse() {
        assert_eq!(
            parse_upstream("10.0.0.2"),
            Ok("10.0.0.2:53".parse().unwrap())
        );
        assert_eq!(
            parse_upstream("10.0.0.2:5353"),
            Ok("10.0.0.2:5353".parse().unwrap())
        );
        assert_eq!(parse_upstream("[::1]:53"), Ok("[::1]:53".parse().unwrap()));
        assert_eq!(parse_upstream("::1"), Ok("[::1]:53".parse().unwrap()));
        assert!(parse_upstream("resolver.test").is_err());
        assert!(parse_upstream("10.0.0.2:0").is_err());
        let text = "# comment\nsearch test\nnameserver 10.0.0.2\nnameserver fe80::1%eth0\n\
                    nameserver   2001:db8::53 \noptions ndots:2\nnameserver\n";
        assert_eq!(
            nameservers(text),
            [
                "10.0.0.2:53".parse().unwrap(),
                "[2001:db8::53]:53".parse().unwrap()
            ]
        );
    }

    #[tokio::test]
    async fn the_first_resolver_that_answers_wins_and_a_dead_one_is_skipped() {
        let good = UdpSocket::bind("127.0.0.1:0").await.unwrap();
        let good_addr = good.local_addr().unwrap();
        // Nothing answers here: it swallows the query.
        let dead = UdpSocket::bind("127.0.0.1:0").await.unwrap();
        let dead_addr = dead.local_addr().unwrap();
        tokio::spawn(async move {
            let mut buf = [0u8; 512];
            let (n, from) = good.recv_from(&mut buf).await.unwrap();
            // A reply with another id first: ignored.
            let mut wrong = buf[..n].to_vec();
            wrong[0] ^= 0xff;
            good.send_to(&wrong, from).await.unwrap();
            let mut reply = buf[..n].to_vec();
            reply[2] |= 0x80;
            good.send_to(&reply, from).await.unwrap();
        });
        let q = query();
        let answer = resolve(&q, &[dead_addr, good_addr], Duration::from_millis(600))
            .await
            .unwrap();
        assert_eq!(&answer[..2], &q[..2]);
        assert_eq!(answer[2] & 0x80, 0x80);
        let err = resolve(&q, &[dead_addr], Duration::from_millis(100))
            .await
            .unwrap_err();
        assert!(err.contains("no answer"), "{err}");
        drop(dead);
    }

    #[test]
    fn resolv_conf_is_followed_when_it_changes() {
        let dir = std::env::temp_dir().join(format!("enclave-net-dns-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("resolv.conf");
        std::fs::write(&path, "nameserver 10.0.0.2\n").unwrap();
        let r = Resolvers::new(Vec::new(), path.clone());
        assert_eq!(*r.current().unwrap(), ["10.0.0.2:53".parse().unwrap()]);
        std::fs::write(&path, "nameserver 10.0.0.3\nnameserver 10.0.0.4\n").unwrap();
        assert_eq!(r.current().unwrap().len(), 2);
        std::fs::write(&path, "# nothing\n").unwrap();
        assert!(r.current().unwrap_err().contains("no nameserver"));
        std::fs::remove_dir_all(&dir).unwrap();
        assert!(r.current().unwrap_err().contains("cannot read"));
        let fixed = Resolvers::new(vec!["10.0.0.9:53".parse().unwrap()], path);
        assert_eq!(fixed.current().unwrap().len(), 1);
    }
}
