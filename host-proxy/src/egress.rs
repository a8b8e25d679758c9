//! Egress: streams from enclave-proxy, each asking for one TCP connection out.
//!
//! For every stream: take a slot under `--max-egress` (past it, answer `unreachable` at once),
//! read the header (bounded in time and size), check the policy, connect with a bounded timeout,
//! answer with a status, then splice. A bad stream is answered `bad request` where possible,
//! logged (rate-limited), and closed; every other stream carries on.

use std::io;
use std::net::SocketAddr;
use std::sync::Arc;

use common::handshake::{read_header, write_status};
use common::metrics::{Counters, LiveGuard};
use common::transport::{Listener, Stream};
use common::wire::{Kind, Status};
use tokio::net::TcpStream;
use tracing::{debug, info_span, Instrument, Span};

use crate::limits::EgressPermit;
use crate::policy::Action;
use crate::Shared;

/// Accepts egress streams until the task is cancelled, each for the enclave of `enclaves`
/// (those whose `--listen` this is) that it comes from ([`attribute`]).
pub async fn serve(listener: Listener, enclaves: Vec<Arc<Shared>>) {
    common::serve::accept_loop(listener, "egress", |stream, peer, id| {
        let Some(shared) = attribute(&enclaves, stream.peer_cid()) else {
            // Closed unanswered: the peer is not an enclave this host-proxy serves.
            common::warn_limited!(%peer, "egress stream from no enclave served here; closed");
            return;
        };
        let span = info_span!("egress", conn.id = id, link.peer = %peer, enclave = %shared.label);
        tokio::spawn(handle(stream, shared.clone(), span));
    })
    .await;
}

/// The enclave of `enclaves` (those listening here) a stream belongs to, by its transport: on
/// vsock (`cid` is the peer's), the one whose `--enclave` has that CID, and no other; on a Unix
/// socket (`cid` is `None`: the stand-in, or a hybrid vsock path), the listener's one enclave
/// (`check` refuses a Unix listener shared by two, and a vsock listener of an enclave without a
/// CID).
pub fn attribute(enclaves: &[Arc<Shared>], cid: Option<u32>) -> Option<&Arc<Shared>> {
    match (cid, enclaves) {
        (Some(cid), _) => enclaves.iter().find(|e| e.config.cid() == Some(cid)),
        (None, [only]) => Some(only),
        (None, _) => None,
    }
}

/// Carries one stream. Only the set-up runs inside `span` (`.instrument`); the splice, the
/// task's busiest part, logs its end in the `tcp` span beneath it without running inside either
/// (see [`crate::splice::pump`]).
async fn handle(mut link: Stream, shared: Arc<Shared>, span: Span) {
    let set_up = set_up(&mut link, &shared).instrument(span.clone());
    // The permit and the gauge are held until the connection is over, however it ends.
    let (_permit, _live, mut tcp, span) = match set_up.await {
        SetUp::Tcp(permit, live, tcp, span) => (permit, live, tcp, span),
        SetUp::DnsUdp(_permit, _live) => {
            crate::dns::serve_udp(link, shared.clone())
                .instrument(span)
                .await;
            return;
        }
        SetUp::Udp(_permit, _live, dst) => {
            crate::udp::serve(link, dst, &shared).instrument(span).await;
            return;
        }
        SetUp::Done => return,
    };
    let idle = shared.config.idle_timeout;
    let egress = common::metrics::Direction::Egress;
    crate::splice::pump(&mut tcp, &mut link, &shared.counters, egress, idle, &span).await;
    // Both sockets close before the slot is given back.
    drop((tcp, link));
}

/// What a stream's set-up came to.
enum SetUp<'a> {
    /// A TCP connection to splice, with its `tcp` span.
    Tcp(EgressPermit<'a>, LiveGuard<'a>, TcpStream, Span),
    /// A stream of DNS queries, not yet answered.
    DnsUdp(EgressPermit<'a>, LiveGuard<'a>),
    /// A UDP flow to this destination, not yet answered.
    Udp(EgressPermit<'a>, LiveGuard<'a>, SocketAddr),
    /// The stream has been answered otherwise.
    Done,
}

/// Admits the stream under the cap, reads its header and connects where it asks (for DNS over
/// TCP, to a resolver).
async fn set_up<'a>(link: &mut Stream, shared: &'a Shared) -> SetUp<'a> {
    // Taken before the header is read, so streams stuck in the handshake count too.
    let permit = match shared.caps.egress() {
        Ok(permit) => permit,
        Err(cap) => {
            // The enclave application's connect() fails at once rather than waiting.
            debug!("{cap}, refusing egress stream");
            Counters::bump(
                shared
                    .counters
                    .capped
                    .at(common::metrics::Direction::Egress),
            );
            let _ = write_status(link, Status::Unreachable).await;
            return SetUp::Done;
        }
    };
    let live = shared.counters.live(&shared.counters.live_egress);
    let header = match read_header(link, shared.config.handshake_timeout).await {
        Ok(h) => h,
        Err(e) => {
            common::warn_limited!("dropping egress stream: {e}");
            Counters::bump(
                shared
                    .counters
                    .failed
                    .at(common::metrics::Direction::Egress),
            );
            let _ = write_status(link, Status::BadRequest).await;
            return SetUp::Done;
        }
    };
    let dns = match header.kind {
        Kind::TcpEgress => false,
        Kind::DnsTcp => true,
        Kind::DnsUdp => return SetUp::DnsUdp(permit, live),
        Kind::UdpEgress => return SetUp::Udp(permit, live, header.dst),
        Kind::TcpIngress | Kind::UdpIngress => {
            common::warn_limited!(kind = ?header.kind, "dropping stream: not an egress request");
            Counters::bump(
                shared
                    .counters
                    .failed
                    .at(common::metrics::Direction::Egress),
            );
            let _ = write_status(link, Status::BadRequest).await;
            return SetUp::Done;
        }
    };
    let span = info_span!("tcp", tcp.src = %header.src, tcp.dst = %header.dst, dns);
    match open(link, header.dst, dns, shared)
        .instrument(span.clone())
        .await
    {
        Some(tcp) => SetUp::Tcp(permit, live, tcp, span),
        None => SetUp::Done,
    }
}

/// Connects to `dst` (or, for DNS, to a resolver) and answers the stream with the status; `None`
/// unless both succeeded.
async fn open(link: &mut Stream, dst: SocketAddr, dns: bool, shared: &Shared) -> Option<TcpStream> {
    let started = tokio::time::Instant::now();
    let connected = if dns {
        crate::dns::connect_tcp(shared).await
    } else {
        connect(dst, shared).await
    };
    shared
        .observed
        .egress_connect
        .observe(started.elapsed().as_secs_f64());
    let tcp = match connected {
        Ok(tcp) => tcp,
        Err(status) => {
            shared
                .counters
                .failure(status, common::metrics::Direction::Egress);
            let _ = write_status(link, status).await;
            return None;
        }
    };
    if let Err(e) = write_status(link, Status::Ok).await {
        debug!("enclave went away before the status: {e}");
        return None;
    }
    Counters::bump(
        shared
            .counters
            .opened
            .at(common::metrics::Direction::Egress),
    );
    Some(tcp)
}

/// Applies the policy and connects, mapping every failure to the status the enclave sees.
async fn connect(dst: SocketAddr, shared: &Shared) -> Result<TcpStream, Status> {
    if shared.policy.check(dst) == Action::Deny {
        debug!("denied by egress policy");
        return Err(Status::Denied);
    }
    let limit = shared.config.connect_timeout;
    match tokio::time::timeout(limit, TcpStream::connect(dst)).await {
        Err(_) => {
            debug!("connect timed out after {limit:?}");
            Err(Status::TimedOut)
        }
        Ok(Err(e)) => {
            let status = status_of(&e);
            debug!("connect failed ({status}): {e}");
            Err(status)
        }
        Ok(Ok(tcp)) => {
            crate::limits::keepalive(&tcp);
            Ok(tcp)
        }
    }
}

/// The status that best describes a failed connect.
pub fn status_of(e: &io::Error) -> Status {
    match e.kind() {
        io::ErrorKind::ConnectionRefused => Status::Refused,
        io::ErrorKind::TimedOut => Status::TimedOut,
        io::ErrorKind::PermissionDenied => Status::Denied,
        _ => Status::Unreachable,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    fn enclave(addr: &str) -> Arc<Shared> {
        let config = crate::Config::try_parse_from(["host-proxy", "--enclave", addr]).unwrap();
        Arc::new(Shared::new(config))
    }

    #[test]
    fn streams_go_to_the_enclave_of_their_cid_and_no_other() {
        let (a, b) = (enclave("vsock:16:5000"), enclave("vsock:17:5000"));
        let both = [a.clone(), b.clone()];
        let label = |s: Option<&Arc<Shared>>| s.map(|s| s.label.clone());
        assert_eq!(label(attribute(&both, Some(17))), Some(b.label.clone()));
        assert_eq!(label(attribute(&both, Some(16))), Some(a.label.clone()));
        assert_eq!(
            label(attribute(&both, Some(18))),
            None,
            "a CID served by none"
        );
        assert_eq!(label(attribute(&both, None)), None);
        // One vsock enclave still checks the CID; one enclave on a Unix socket takes all its
        // (CID-less) streams, whatever its own address, and no vsock stream.
        assert_eq!(label(attribute(&both[..1], Some(3))), None);
        assert!(
            attribute(&both[..1], None).is_some(),
            "vsock enclave, unix listen"
        );
        let unix = [enclave("unix:/e")];
        assert!(attribute(&unix, None).is_some());
        assert!(attribute(&unix, Some(3)).is_none());
    }
}
