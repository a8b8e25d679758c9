//! Ingress: TCP clients on published ports, each carried to the enclave as one stream.
//!
//! The stream's header names the real client address, so the enclave can source the connection
//! from it. Unless enclave-proxy answers `ok`, the client is reset (not held open), promptly: the
//! link connect and the status wait are both bounded.

use std::net::SocketAddr;
use std::sync::Arc;

use common::handshake::{read_status, write_header};
use common::metrics::Counters;
use common::wire::{Header, Kind, Status};
use tokio::net::{TcpListener, TcpStream};
use tracing::{debug, info_span, warn, Instrument};

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

async fn handle(mut tcp: TcpStream, enclave_port: u16, shared: Arc<Shared>) {
    let Ok(peer) = tcp.peer_addr() else {
        return; // The client is already gone.
    };
    let Ok(_permit) = shared.permits.clone().try_acquire_owned() else {
        warn!("connection cap reached, resetting client");
        Counters::bump(&shared.counters.failed);
        return reset(&tcp);
    };
    let _ = tcp.set_nodelay(true);
    let local = tcp.local_addr().unwrap_or(peer);
    let limit = shared.config.handshake_timeout;
    let mut link = match tokio::time::timeout(limit, shared.config.enclave.connect()).await {
        Ok(Ok(link)) => link,
        Ok(Err(e)) => {
            warn!(enclave = %shared.config.enclave, "enclave unreachable, resetting client: {e}");
            Counters::bump(&shared.counters.failed);
            return reset(&tcp);
        }
        Err(_) => {
            warn!(enclave = %shared.config.enclave, "enclave did not accept within {limit:?}, resetting client");
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
        warn!("enclave link failed, resetting client: {e}");
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
            warn!("no valid status from the enclave, resetting client: {e}");
            Counters::bump(&shared.counters.failed);
            return reset(&tcp);
        }
    }
    Counters::bump(&shared.counters.opened);
    pump(&mut tcp, &mut link, &shared.counters)
        .instrument(info_span!("splice"))
        .await;
}
