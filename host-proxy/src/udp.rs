//! UDP both ways.
//!
//! Ingress ([`serve_published`]): each client address and port sending to a `--publish-udp`
//! port is one flow, one stream of kind `UdpIngress` into the enclave; what the enclave answers
//! goes back to that client from the published port. At most `--max-udp-flows` at once.
//!
//! Egress ([`serve`]): each stream of kind `UdpEgress` is one flow from an enclave socket to one
//! destination. host-proxy applies the egress policy (UDP may also reach the Amazon Time Sync
//! Service, [`crate::policy::TIME_SYNC`]), sends the flow's datagrams from one connected UDP
//! socket of its own, and sends what comes back from that destination into the flow.
//!
//! A datagram is never waited for: one the destination's socket will not take, or a reply the
//! flow's window has no room for, is dropped and counted (`udp.dropped`, debug log). A flow ends
//! after `--udp-idle-timeout` without a datagram either way, or when the enclave ends it.

use std::collections::HashMap;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::sync::atomic::Ordering::Relaxed;
use std::sync::Arc;
use std::time::Duration;

use common::datagram::DatagramLink;
use common::frame::MAX_DATAGRAM;
use common::handshake::write_status;
use common::metrics::Counters;
use common::transport::Stream;
use common::wire::{Header, Kind, Status};
use tokio::net::UdpSocket;
use tokio::sync::mpsc;
use tracing::debug;

use crate::policy::Action;
use crate::Shared;

/// Carries one flow to `dst`, whose header has been read.
pub async fn serve(mut link: Stream, dst: SocketAddr, shared: &Shared) {
    let socket = match open(dst, shared).await {
        Ok(socket) => socket,
        Err(status) => {
            shared
                .counters
                .failure(status, common::metrics::Direction::Egress);
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
                Counters::bump(counters.idle_closed.at(common::metrics::Direction::Egress));
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

/// Datagrams a client's flow queues while its stream is being opened or written.
const FLOW_QUEUE: usize = 64;

/// Serves one published UDP port until cancelled: one flow into the enclave per client.
pub async fn serve_published(socket: UdpSocket, enclave_port: u16, shared: Arc<Shared>) {
    let socket = Arc::new(socket);
    let local = socket
        .local_addr()
        .unwrap_or_else(|_| SocketAddr::from((Ipv4Addr::UNSPECIFIED, 0)));
    let dst = SocketAddr::new(local.ip(), enclave_port);
    let mut flows = ClientFlows::default();
    let (ended_tx, mut ended) = mpsc::channel::<(SocketAddr, u64)>(64);
    let mut next_id = 0u64;
    let mut buf = vec![0u8; MAX_DATAGRAM];
    loop {
        let (n, client) = tokio::select! {
            r = socket.recv_from(&mut buf) => match r {
                Ok(r) => r,
                Err(e) => {
                    debug!("published UDP port: {e}");
                    continue;
                }
            },
            Some((client, id)) = ended.recv() => {
                if flows.map.get(&client).is_some_and(|(_, live)| *live == id) {
                    flows.remove(client);
                }
                continue;
            }
        };
        if let Some((queue, _)) = flows.map.get(&client) {
            match queue.try_send(buf[..n].to_vec()) {
                Ok(()) => continue,
                Err(mpsc::error::TrySendError::Full(_)) => {
                    debug!(%client, "flow queue full: datagram dropped");
                    Counters::bump(&shared.counters.udp_dropped);
                    continue;
                }
                // The flow just ended: open it again.
                Err(mpsc::error::TrySendError::Closed(_)) => {
                    flows.remove(client);
                }
            }
        }
        let capped = if flows.map.len() >= shared.config.max_udp_flows {
            Some("UDP flow cap reached")
        } else if flows.of(client.ip()) >= shared.config.max_per_client {
            Some("UDP flows of this client at --max-per-client")
        } else {
            None
        };
        if let Some(why) = capped {
            debug!(%client, "{why}: datagram dropped");
            let capped = &shared.counters.capped;
            Counters::bump(capped.at(common::metrics::Direction::Ingress));
            continue;
        }
        let (queue, rx) = mpsc::channel(FLOW_QUEUE);
        let _ = queue.try_send(buf[..n].to_vec());
        flows.insert(client, (queue, next_id));
        let flow = IngressFlow {
            client,
            dst,
            socket: socket.clone(),
            id: next_id,
            ended: ended_tx.clone(),
        };
        next_id += 1;
        let span = tracing::info_span!("udp", udp.client = %client, enclave.port = enclave_port);
        tokio::spawn(tracing::Instrument::instrument(
            flow.run(rx, shared.clone()),
            span,
        ));
    }
}

/// The flows of one published port, by client endpoint, and how many each client address (IPv6:
/// each /64, as for TCP) has.
#[derive(Default)]
struct ClientFlows {
    map: HashMap<SocketAddr, (mpsc::Sender<Vec<u8>>, u64)>,
    per_client: HashMap<IpAddr, usize>,
}

impl ClientFlows {
    fn of(&self, ip: IpAddr) -> usize {
        self.per_client
            .get(&crate::limits::client_key(ip))
            .copied()
            .unwrap_or(0)
    }

    fn insert(&mut self, client: SocketAddr, flow: (mpsc::Sender<Vec<u8>>, u64)) {
        if self.map.insert(client, flow).is_none() {
            *self
                .per_client
                .entry(crate::limits::client_key(client.ip()))
                .or_default() += 1;
        }
    }

    fn remove(&mut self, client: SocketAddr) {
        if self.map.remove(&client).is_some() {
            let key = crate::limits::client_key(client.ip());
            if let Some(n) = self.per_client.get_mut(&key) {
                *n -= 1;
                if *n == 0 {
                    self.per_client.remove(&key);
                }
            }
        }
    }
}

/// One client's flow into the enclave.
struct IngressFlow {
    client: SocketAddr,
    dst: SocketAddr,
    socket: Arc<UdpSocket>,
    id: u64,
    ended: mpsc::Sender<(SocketAddr, u64)>,
}

impl IngressFlow {
    async fn run(self, mut datagrams: mpsc::Receiver<Vec<u8>>, shared: Arc<Shared>) {
        let header = Header {
            kind: Kind::UdpIngress,
            src: self.client,
            dst: self.dst,
        };
        if let Some(link) = crate::ingress::open_stream(&header, &shared).await {
            Counters::bump(&shared.counters.udp_flows);
            let _live = shared.counters.live(&shared.counters.live_udp);
            self.carry(DatagramLink::new(link), &mut datagrams, &shared)
                .await;
        }
        datagrams.close();
        let _ = self.ended.send((self.client, self.id)).await;
    }

    async fn carry(
        &self,
        mut link: DatagramLink,
        datagrams: &mut mpsc::Receiver<Vec<u8>>,
        shared: &Shared,
    ) {
        let counters = &shared.counters;
        let idle = shared.config.udp_idle_timeout;
        loop {
            tokio::select! {
                datagram = datagrams.recv() => {
                    let Some(d) = datagram else { break };
                    if link.queue(&d) {
                        counters.bytes_to_enclave.fetch_add(d.len() as u64, Relaxed);
                    } else {
                        debug!(len = d.len(), "datagram dropped: the enclave is not reading");
                        Counters::bump(&counters.udp_dropped);
                    }
                }
                reply = link.recv() => match reply {
                    Ok(Some(r)) => match self.socket.send_to(&r, self.client).await {
                        Ok(_) => {
                            counters.bytes_from_enclave.fetch_add(r.len() as u64, Relaxed);
                        }
                        Err(e) => {
                            debug!("reply not sent: {e}");
                            Counters::bump(&counters.udp_dropped);
                        }
                    },
                    Ok(None) => return,
                    Err(e) => {
                        debug!("UDP flow ended: {e}");
                        return;
                    }
                },
                () = tokio::time::sleep(idle) => {
                    debug!("UDP flow idle for {idle:?}");
                    Counters::bump(counters.idle_closed.at(common::metrics::Direction::Ingress));
                    break;
                }
            }
            if link.flush().await.is_err() {
                return;
            }
        }
        link.finish(Duration::from_secs(1)).await;
    }
}
