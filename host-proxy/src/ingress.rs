//! Ingress: TCP clients on published ports, each carried to the enclave as one stream.
//!
//! The stream's header names the real client address, so the enclave can source the connection
//! from it. Unless enclave-proxy answers `ok`, the client is reset (not held open), promptly: the
//! link connect and the status wait are both bounded. A client past the ingress cap or its
//! per-client cap ([`crate::limits`]) is reset at once, before any link is opened.
//!
//! Every line logged per client for a failure is at `debug`, or rate-limited when it says
//! something the operator must hear about (the enclave being unreachable): a flood of clients
//! must not become a flood of log lines.

use std::net::SocketAddr;
use std::sync::Arc;

use common::handshake::{read_status, write_header};
use common::metrics::{Counters, LiveGuard};
use common::transport::Stream;
use common::wire::{Header, Kind, Status};
use tokio::net::{TcpListener, TcpStream};
use tracing::{debug, info_span, Instrument, Span};

use crate::limits::IngressPermit;
use crate::splice::{pump, reset};
use crate::Shared;

/// Where a listener's clients go.
#[derive(Debug, Clone)]
pub enum Target {
    /// This enclave port of this enclave (`--publish`).
    Fixed(u16, Arc<Shared>),
    /// The port the client dialled before nftables redirected it (`--publish-transparent`), in
    /// the enclave whose ranges hold that port.
    Original(crate::transparent::Routes),
}

/// Accepts clients on one published listener until the task is cancelled.
pub async fn serve(listener: TcpListener, target: Target) {
    common::serve::accept_loop(listener, "ingress", |tcp, peer, id| {
        let (enclave_port, shared) = match &target {
            Target::Fixed(port, shared) => (*port, shared.clone()),
            Target::Original(routes) => match route_original(&tcp, &peer, routes) {
                Some(found) => found,
                None => return,
            },
        };
        let span = info_span!(
            "ingress",
            conn.id = id,
            tcp.peer = %peer,
            enclave = %shared.label,
            enclave.port = enclave_port
        );
        tokio::spawn(handle(tcp, enclave_port, shared, span));
    })
    .await;
}

/// The original port of a redirected client and the enclave whose ranges hold it; `None`, once
/// the client has been reset, when no range does: a client that dialled the listener itself
/// (or came by another NAT) must not reach an enclave port nobody published. Such a client is
/// counted against the first enclave with ranges.
fn route_original(
    tcp: &TcpStream,
    peer: &str,
    routes: &crate::transparent::Routes,
) -> Option<(u16, Arc<Shared>)> {
    let dst = crate::transparent::original_dst(tcp);
    let port = dst.as_ref().ok().map(SocketAddr::port);
    let found = port.and_then(|p| Some((p, crate::transparent::route(routes, p)?)));
    if found.is_none() {
        let (why, denied) = match &dst {
            Ok(_) => ("not to a transparent range", true),
            Err(_) => ("no original destination", false),
        };
        debug!(%peer, ?dst, "{why}; reset");
        if let Some(e) = crate::transparent::fallback(routes) {
            let counter = if denied {
                &e.counters.denied
            } else {
                &e.counters.failed
            };
            Counters::bump(counter.at(common::metrics::Direction::Ingress));
        }
        reset(tcp);
    }
    found
}

/// Carries one client. Only the set-up runs inside `span` (`.instrument`); the splice, the
/// task's busiest part, logs its end in a `splice` span beneath it without running inside
/// either (see [`pump`]).
async fn handle(tcp: TcpStream, enclave_port: u16, shared: Arc<Shared>, span: Span) {
    let set_up = set_up(tcp, enclave_port, &shared).instrument(span.clone());
    // The permit and the gauge are held until the connection is over, however it ends.
    let Some((_permit, _live, mut tcp, mut link)) = set_up.await else {
        return;
    };
    let span = info_span!(parent: &span, "splice");
    let idle = shared.config.idle_timeout;
    let ingress = common::metrics::Direction::Ingress;
    pump(&mut tcp, &mut link, &shared.counters, ingress, idle, &span).await;
}

/// Admits the client under the caps and opens its stream to the enclave; `None` once the client
/// has been reset (or was already gone).
async fn set_up(
    tcp: TcpStream,
    enclave_port: u16,
    shared: &Shared,
) -> Option<(IngressPermit<'_>, LiveGuard<'_>, TcpStream, Stream)> {
    let Ok(peer) = tcp.peer_addr() else {
        return None; // The client is already gone.
    };
    let permit = match shared.caps.ingress(peer.ip()) {
        Ok(permit) => permit,
        Err(cap) => {
            debug!("{cap}, resetting client");
            Counters::bump(
                shared
                    .counters
                    .capped
                    .at(common::metrics::Direction::Ingress),
            );
            reset(&tcp);
            return None;
        }
    };
    let live = shared.counters.live(&shared.counters.live_ingress);
    crate::limits::keepalive(&tcp);
    let Some(link) = open(&tcp, peer, enclave_port, shared).await else {
        drop(tcp); // Closed before its slots are given back, as after a splice.
        return None;
    };
    Some((permit, live, tcp, link))
}

/// Opens the client's stream to the enclave and waits for its `ok`; otherwise resets the client
/// and returns `None`.
async fn open(
    tcp: &TcpStream,
    peer: SocketAddr,
    enclave_port: u16,
    shared: &Shared,
) -> Option<Stream> {
    let local = tcp.local_addr().unwrap_or(peer);
    let header = Header {
        kind: Kind::TcpIngress,
        src: peer,
        dst: SocketAddr::new(local.ip(), enclave_port),
    };
    let Some(link) = open_stream(&header, shared).await else {
        reset(tcp);
        return None;
    };
    Counters::bump(
        shared
            .counters
            .opened
            .at(common::metrics::Direction::Ingress),
    );
    Some(link)
}

/// Opens a stream to enclave-proxy for `header` and waits for its `ok`; `None` (counted and
/// logged) if the enclave is unreachable or answers otherwise.
pub async fn open_stream(header: &Header, shared: &Shared) -> Option<Stream> {
    let enclave = &shared.config.enclave;
    let limit = shared.config.handshake_timeout;
    let mut link = match tokio::time::timeout(limit, enclave.connect()).await {
        Ok(Ok(link)) => link,
        Ok(Err(e)) => {
            common::warn_limited!(%enclave, "enclave unreachable, dropping the client: {e}");
            Counters::bump(
                shared
                    .counters
                    .failed
                    .at(common::metrics::Direction::Ingress),
            );
            return None;
        }
        Err(_) => {
            common::warn_limited!(%enclave, "enclave did not accept within {limit:?}, dropping the client");
            Counters::bump(
                shared
                    .counters
                    .failed
                    .at(common::metrics::Direction::Ingress),
            );
            return None;
        }
    };
    if let Err(e) = write_header(&mut link, header).await {
        common::warn_limited!(%enclave, "enclave link failed, dropping the client: {e}");
        Counters::bump(
            shared
                .counters
                .failed
                .at(common::metrics::Direction::Ingress),
        );
        return None;
    }
    let status_limit = shared.config.connect_timeout + limit;
    match read_status(&mut link, status_limit).await {
        Ok(Status::Ok) => Some(link),
        Ok(status) => {
            debug!("enclave answered {status}, dropping the client");
            shared
                .counters
                .failure(status, common::metrics::Direction::Ingress);
            None
        }
        Err(e) => {
            common::warn_limited!(%enclave, "no valid status from the enclave, dropping the client: {e}");
            Counters::bump(
                shared
                    .counters
                    .failed
                    .at(common::metrics::Direction::Ingress),
            );
            None
        }
    }
}
