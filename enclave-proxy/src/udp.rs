//! Datagrams from the enclave: its resolver. DNS queries to the gateway's port 53 are captured
//! from the TAP, and each client socket (a flow: its address and port, and the gateway's) gets
//! one stream of kind `DnsUdp` to host-proxy, which resolves with the parent's resolvers. The
//! answers come back as UDP from the gateway.
//!
//! The stack keeps the flows ([`Flows`]); each flow is a task that owns its stream. A flow ends
//! after [`FLOW_IDLE`] without a datagram either way; at most [`MAX_FLOWS`] are open at once.
//! A datagram is never waited for: past the cap, into a flow whose queue is full, or when the
//! stream's window is closed, it is dropped and counted (`dns.dropped`), and the client's
//! resolver retries as it would on any lost datagram. So a flood on one flow never blocks the
//! others, or the stack.

use std::net::SocketAddrV4;
use std::sync::Arc;
use std::time::Duration;

use common::datagram::{DatagramError, DatagramLink};
use common::metrics::Counters;
use common::transport::LinkAddr;
use common::wire::{Header, Kind};
use smoltcp::phy::ChecksumCapabilities;
use smoltcp::wire::{
    EthernetAddress, EthernetFrame, EthernetProtocol, EthernetRepr, IpProtocol, Ipv4Packet,
    Ipv4Repr, UdpPacket, UdpRepr,
};
use tokio::sync::mpsc;
use tracing::{debug, Instrument};

use crate::stack::{Event, FlowMap};

/// A flow ends after this long without a datagram either way. A stub resolver uses a socket for
/// one lookup (a few queries, retried after 1 to 5 s), so this outlives its retries.
pub const FLOW_IDLE: Duration = Duration::from_secs(10);
/// The most DNS flows at once: each is a task and a stream to host-proxy.
pub const MAX_FLOWS: usize = 1024;
/// Datagrams a flow queues while its stream is being opened or written.
const FLOW_QUEUE: usize = 64;
/// The DNS port.
pub const DNS_PORT: u16 = 53;

/// A UDP flow as the enclave kernel sees it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct UdpFlow {
    /// The application's endpoint.
    pub local: SocketAddrV4,
    /// The far endpoint (the gateway's DNS port).
    pub remote: SocketAddrV4,
}

/// The flow and payload of a UDP datagram in an Ethernet frame from the TAP; `None` for
/// anything else, a fragment, or a malformed packet. Checksums are not checked: the frame comes
/// from the enclave's own kernel, which leaves them partial with checksum offload.
pub fn parse(frame: &[u8]) -> Option<(UdpFlow, &[u8])> {
    let eth = EthernetFrame::new_checked(frame).ok()?;
    if eth.ethertype() != EthernetProtocol::Ipv4 {
        return None;
    }
    let ip = Ipv4Packet::new_checked(eth.payload()).ok()?;
    if ip.next_header() != IpProtocol::Udp || ip.more_frags() || ip.frag_offset() != 0 {
        return None;
    }
    let udp = UdpPacket::new_checked(ip.payload()).ok()?;
    let flow = UdpFlow {
        local: SocketAddrV4::new(ip.src_addr(), udp.src_port()),
        remote: SocketAddrV4::new(ip.dst_addr(), udp.dst_port()),
    };
    Some((flow, &ip.payload()[8..usize::from(udp.len())]))
}

/// The Ethernet frame carrying `payload` back from `flow.remote` to `flow.local`, checksums
/// filled in. `None` if it does not fit one frame of `mtu` (IPv4 fragmentation is not done yet).
pub fn reply_frame(
    flow: &UdpFlow,
    payload: &[u8],
    mtu: usize,
    src_mac: EthernetAddress,
    dst_mac: EthernetAddress,
) -> Option<Vec<u8>> {
    let udp = UdpRepr {
        src_port: flow.remote.port(),
        dst_port: flow.local.port(),
    };
    let ip = Ipv4Repr {
        src_addr: *flow.remote.ip(),
        dst_addr: *flow.local.ip(),
        next_header: IpProtocol::Udp,
        payload_len: udp.header_len() + payload.len(),
        hop_limit: 64,
    };
    if ip.buffer_len() + ip.payload_len > mtu {
        return None;
    }
    let eth = EthernetRepr {
        src_addr: src_mac,
        dst_addr: dst_mac,
        ethertype: EthernetProtocol::Ipv4,
    };
    let mut buf = vec![0u8; eth.buffer_len() + ip.buffer_len() + ip.payload_len];
    let caps = ChecksumCapabilities::default();
    let mut frame = EthernetFrame::new_unchecked(&mut buf[..]);
    eth.emit(&mut frame);
    let mut packet = Ipv4Packet::new_unchecked(frame.payload_mut());
    ip.emit(&mut packet, &caps);
    let mut datagram = UdpPacket::new_unchecked(packet.payload_mut());
    udp.emit(
        &mut datagram,
        &ip.src_addr.into(),
        &ip.dst_addr.into(),
        payload.len(),
        |out| out.copy_from_slice(payload),
        &caps,
    );
    Some(buf)
}

/// A live flow: its queue, and which flow task it is (a flow that ended and was opened again is
/// another).
struct Live {
    queue: mpsc::Sender<Vec<u8>>,
    id: u64,
}

/// The stack's DNS flows.
pub struct Flows {
    live: FlowMap<UdpFlow, Live>,
    next_id: u64,
    host: LinkAddr,
    connect_timeout: Duration,
    counters: Arc<Counters>,
}

impl Flows {
    /// No flows yet; streams go to `host`.
    pub fn new(host: LinkAddr, connect_timeout: Duration, counters: Arc<Counters>) -> Flows {
        Flows {
            live: FlowMap::default(),
            next_id: 0,
            host,
            connect_timeout,
            counters,
        }
    }

    /// Hands a query to its flow, opening the flow if need be. Never waits.
    pub fn query(&mut self, flow: UdpFlow, payload: &[u8], events: &mpsc::Sender<Event>) {
        if let Some(live) = self.live.get(&flow) {
            match live.queue.try_send(payload.to_vec()) {
                Ok(()) => return,
                Err(mpsc::error::TrySendError::Full(_)) => {
                    debug!(?flow, "DNS flow queue full: query dropped");
                    Counters::bump(&self.counters.dns_dropped);
                    return;
                }
                // The flow just ended: open it again.
                Err(mpsc::error::TrySendError::Closed(_)) => {
                    self.live.remove(&flow);
                }
            }
        }
        if self.live.len() >= MAX_FLOWS {
            debug!(?flow, "{MAX_FLOWS} DNS flows open: query dropped");
            Counters::bump(&self.counters.dns_dropped);
            return;
        }
        let (queue, rx) = mpsc::channel(FLOW_QUEUE);
        let _ = queue.try_send(payload.to_vec());
        let id = self.next_id;
        self.next_id += 1;
        self.live.insert(flow, Live { queue, id });
        Counters::bump(&self.counters.dns_queries);
        let span = tracing::debug_span!("dns", udp.src = %flow.local, udp.dst = %flow.remote);
        tokio::spawn(
            run(
                self.host.clone(),
                flow,
                id,
                rx,
                events.clone(),
                self.connect_timeout,
                self.counters.clone(),
            )
            .instrument(span),
        );
    }

    /// Forgets a flow whose task has ended, unless it has been opened again since.
    pub fn ended(&mut self, flow: UdpFlow, id: u64) {
        if self.live.get(&flow).is_some_and(|live| live.id == id) {
            self.live.remove(&flow);
        }
    }

    /// Flows open now.
    pub fn len(&self) -> usize {
        self.live.len()
    }

    /// Whether no flow is open.
    pub fn is_empty(&self) -> bool {
        self.live.is_empty()
    }
}

/// One flow: opens its stream, then carries queries out and answers back until it is idle,
/// either side ends it, or the stack is gone.
async fn run(
    host: LinkAddr,
    flow: UdpFlow,
    id: u64,
    mut queries: mpsc::Receiver<Vec<u8>>,
    events: mpsc::Sender<Event>,
    connect_timeout: Duration,
    counters: Arc<Counters>,
) {
    let header = Header {
        kind: Kind::DnsUdp,
        src: flow.local.into(),
        dst: flow.remote.into(),
    };
    match crate::egress::open(&host, &header, connect_timeout).await {
        Ok(link) => {
            if let Err(why) = carry(link, flow, &mut queries, &events, &counters, FLOW_IDLE).await {
                debug!("DNS flow ended: {why}");
            }
        }
        Err(status) => {
            debug!("no DNS stream: {status}");
            Counters::bump(&counters.dns_dropped);
        }
    }
    // Queries still queued are lost with the flow, as datagrams are.
    queries.close();
    let _ = events.send(Event::FlowEnded { flow, id }).await;
}

async fn carry(
    link: common::transport::Stream,
    flow: UdpFlow,
    datagrams: &mut mpsc::Receiver<Vec<u8>>,
    events: &mpsc::Sender<Event>,
    counters: &Counters,
    idle: Duration,
) -> Result<(), DatagramError> {
    let mut link = DatagramLink::new(link);
    loop {
        tokio::select! {
            datagram = datagrams.recv() => {
                let Some(datagram) = datagram else { break };
                if !link.queue(&datagram) {
                    debug!("datagram dropped: host-proxy is not reading");
                    Counters::bump(&counters.dns_dropped);
                }
            }
            answer = link.recv() => match answer? {
                Some(payload) => {
                    let _ = events.send(Event::Datagram { flow, payload }).await;
                }
                None => return Ok(()),
            },
            () = tokio::time::sleep(idle) => break,
        }
        link.flush().await?;
    }
    // Idle, or the stack is gone: end the stream cleanly.
    link.finish(Duration::from_secs(1)).await;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::Ipv4Addr;

    const APP: EthernetAddress = EthernetAddress([2, 0, 0, 0, 0, 2]);
    const GW: EthernetAddress = EthernetAddress([2, 0, 0, 0, 0, 1]);

    fn flow() -> UdpFlow {
        UdpFlow {
            local: SocketAddrV4::new(Ipv4Addr::new(10, 240, 0, 2), 40000),
            remote: SocketAddrV4::new(Ipv4Addr::new(10, 240, 0, 1), DNS_PORT),
        }
    }

    #[test]
    fn a_reply_frame_parses_back_with_valid_checksums() {
        let f = flow();
        let reversed = UdpFlow {
            local: f.remote,
            remote: f.local,
        };
        for len in [0, 1, 512, 4000] {
            let payload: Vec<u8> = (0..len).map(|i| i as u8).collect();
            let frame = reply_frame(&reversed, &payload, 65520, APP, GW).unwrap();
            let (got, body) = parse(&frame).unwrap();
            assert_eq!(got, f, "the app's query as the kernel would send it");
            assert_eq!(body, &payload[..]);
            let ip = Ipv4Packet::new_checked(&frame[14..]).unwrap();
            assert!(ip.verify_checksum());
            let udp = UdpPacket::new_checked(ip.payload()).unwrap();
            assert!(udp.verify_checksum(&ip.src_addr().into(), &ip.dst_addr().into()));
        }
        assert!(
            reply_frame(&f, &[0; 1500], 1500, GW, APP).is_none(),
            "over the MTU"
        );
    }

    #[test]
    fn fragments_and_other_protocols_are_not_taken() {
        let mut frame = reply_frame(&flow(), b"query", 1500, APP, GW).unwrap();
        assert!(parse(&frame).is_some());
        // More fragments follow.
        frame[14 + 6] |= 0x20;
        assert!(parse(&frame).is_none());
        frame[14 + 6] &= !0x20;
        // TCP.
        frame[14 + 9] = 6;
        assert!(parse(&frame).is_none());
        frame[14 + 9] = 17;
        // A UDP length past the packet.
        frame[14 + 20 + 5] = 200;
        assert!(parse(&frame).is_none());
        assert!(parse(&frame[..20]).is_none());
    }
}
