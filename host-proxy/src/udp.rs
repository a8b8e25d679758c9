//! UDP egress: each stream of kind `UdpEgress` is one flow from an enclave socket to one
//! destination. host-proxy applies the egress policy (UDP may also reach the Amazon Time Sync
//! Service, [`crate::policy::TIME_SYNC`]), sends the flow's datagrams from one connected UDP
//! socket of its own, and sends what comes back from that destination into the flow.
//!
//! A datagram is never waited for: one the destination's socket will not take, or a reply the
//! flow's window has no room for, is dropped and counted (`udp.dropped`, debug log). A flow ends
//! after `--udp-idle-timeout` without a datagram either way, or when the enclave ends it.

use std::net::{Ipv4Addr, Ipv6Addr, SocketAddr};
use std::sync::atomic::Ordering::Relaxed;
use std::time::Duration;

use common::datagram::DatagramLink;
use common::frame::MAX_DATAGRAM;
use common::handshake::write_status;
use common::metrics::Counters;
use common::transport::Stream;
use common::wire::Status;
use tokio::net::UdpSocket;
use tracing::debug;

use crate::policy::Action;
use crate::Shared;

/// Carries one flow to `dst`, whose header has been read.
pub async fn serve(mut link: Stream, dst: SocketAddr, shared: &Shared) {
    let socket = match open(dst, shared).await {
        Ok(socket) => socket,
        Err(status) => {
            shared.counters.failure(status);
            let _ = write_status(&mut link, status).await;
            return;
        }
    };
    if write_status(&mut link, Status::Ok).await.is_err() {
        return;
    }
    Counters::bump(&shared.counters.udp_flows);
    let _live = shared.counters.live(&shared.counters.live_udp);
    let mut link = DatagramLink::new(link);
    let mut buf = vec![0u8; MAX_DATAGRAM];
    let idle = shared.config.udp_idle_timeout;
    let counters = &shared.counters;
    loop {
        tokio::select! {
            datagram = link.recv() => match datagram {
                Ok(Some(d)) => match socket.send(&d).await {
                    Ok(_) => {
                        counters.bytes_from_enclave.fetch_add(d.len() as u64, Relaxed);
                    }
                    Err(e) => {
                        debug!(len = d.len(), "datagram not sent: {e}");
                        Counters::bump(&counters.udp_dropped);
                    }
                },
                Ok(None) => break,
                Err(e) => {
                    debug!("UDP flow ended: {e}");
                    return;
                }
            },
            reply = socket.recv(&mut buf) => match reply {
                Ok(n) => {
                    if link.queue(&buf[..n]) {
                        counters.bytes_to_enclave.fetch_add(n as u64, Relaxed);
                    } else {
                        debug!(len = n, "reply dropped: the enclave is not reading");
                        Counters::bump(&counters.udp_dropped);
                    }
                }
                // An ICMP error for an earlier datagram (port unreachable): UDP carries on.
                Err(e) => debug!("UDP destination: {e}"),
            },
            () = tokio::time::sleep(idle) => {
                debug!("UDP flow idle for {idle:?}");
                Counters::bump(&counters.idle_closed);
                break;
            }
        }
        if link.flush().await.is_err() {
            return;
        }
    }
    link.finish(Duration::from_secs(1)).await;
}

/// Checks the policy and makes the flow's socket, connected to `dst`.
async fn open(dst: SocketAddr, shared: &Shared) -> Result<UdpSocket, Status> {
    if shared.policy.check_udp(dst) == Action::Deny {
        debug!("denied by egress policy");
        return Err(Status::Denied);
    }
    let local: SocketAddr = match dst {
        SocketAddr::V4(_) => (Ipv4Addr::UNSPECIFIED, 0).into(),
        SocketAddr::V6(_) => (Ipv6Addr::UNSPECIFIED, 0).into(),
    };
    let socket = UdpSocket::bind(local)
        .await
        .map_err(|e| crate::egress::status_of(&e))?;
    socket.connect(dst).await.map_err(|e| {
        debug!("UDP connect failed: {e}");
        crate::egress::status_of(&e)
    })?;
    Ok(socket)
}
