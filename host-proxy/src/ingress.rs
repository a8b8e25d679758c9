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
use common::metrics::Counters;
use common::wire::{Header, Kind, Status};
use tokio::net::{TcpListener, TcpStream};
use tracing::{debug, info_span, Instrument};

use crate::splice::{pump, reset};
use crate::Shared;

/// Accepts clients on one published port until the task is cancelled.
pub async fn serve(listener: TcpListener, enclave_port: u16, shared: Arc<Shared>) {
    common::serve::accept_loop(listener, "ingress", |tcp, peer, id| {
        let span =
            info_span!("ingress", conn.id = id, tcp.peer = %peer, enclave.port = enclave_port);
        tokio::spawn(handle(tcp, enclave_port, shared.clone()).instrument(span));
    })
    .await;
}

async fn handle(tcp: TcpStream, enclave_port: u16, shared: Arc<Shared>) {
    let Ok(peer) = tcp.peer_addr() else {
        return; // The client is already gone.
    };
    // Held until the connection is over, however it ends.
    let _permit = match shared.caps.ingress(peer.ip()) {
        Ok(permit) => permit,
        Err(cap) => {
            debug!("{cap}, resetting client");
            Counters::bump(&shared.counters.capped);
            return reset(&tcp);
        }
    };
    let _live = shared.counters.live(&shared.counters.live_ingress);
    crate::limits::keepalive(&tcp);
    carry(tcp, peer, enclave_port, &shared).await;
}

async fn carry(mut tcp: TcpStream, peer: SocketAddr, enclave_port: u16, shared: &Shared) {
    let local = tcp.local_addr().unwrap_or(peer);
    let enclave = &shared.config.enclave;
    let limit = shared.config.handshake_timeout;
    let mut link = match tokio::time::timeout(limit, enclave.connect()).await {
        Ok(Ok(link)) => link,
        Ok(Err(e)) => {
            common::warn_limited!(%enclave, "enclave unreachable, resetting client: {e}");
            Counters::bump(&shared.counters.failed);
            return reset(&tcp);
        }
        Err(_) => {
            common::warn_limited!(%enclave, "enclave did not accept within {limit:?}, resetting client");
            Counters::bump(&shared.counters.failed);
            return reset(&tcp);
        }
    };
    let header = Header {
        kind: Kind::TcpIngress,
        src: peer,
        dst: SocketAddr::new(local.ip(), enclave_port),
    };
    if let Err(e) = write_header(&mut link, &header).await {
        common::warn_limited!(%enclave, "enclave link failed, resetting client: {e}");
        Counters::bump(&shared.counters.failed);
        return reset(&tcp);
    }
    // The enclave's own connect is bounded by the same timeout as ours; allow for both.
    let status_limit = shared.config.connect_timeout + limit;
    match read_status(&mut link, status_limit).await {
        Ok(Status::Ok) => {}
        Ok(status) => {
            debug!("enclave answered {status}, resetting client");
            shared.counters.failure(status);
            return reset(&tcp);
        }
        Err(e) => {
            common::warn_limited!(%enclave, "no valid status from the enclave, resetting client: {e}");
            Counters::bump(&shared.counters.failed);
            return reset(&tcp);
        }
    }
    Counters::bump(&shared.counters.opened);
    pump(
        &mut tcp,
        &mut link,
        &shared.counters,
        shared.config.idle_timeout,
    )
    .instrument(info_span!("splice"))
    .await;
}
