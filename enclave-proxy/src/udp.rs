//! Datagrams from the enclave: UDP egress and its resolver. Every UDP datagram the enclave
//! kernel sends out of the TAP is captured, and each flow (the app's address and port, and the
//! destination's) gets one stream to host-proxy: of kind `DnsUdp` for the gateway's port 53,
//! which host-proxy resolves with the parent's resolvers; of kind `UdpEgress` for anything
//! else, which host-proxy sends from a UDP socket of its own. What comes back returns as UDP
//! from the flow's destination.
//!
//! The stack keeps the flows ([`Flows`]); each flow is a task that owns its stream. A DNS flow
//! ends after [`DNS_IDLE`] without a datagram either way, a UDP flow after `--udp-idle-timeout`;
//! at most `--max-udp-flows` are open at once. A datagram is never waited for: past the cap,
//! into a flow whose queue is full, or when the stream's window is closed, it is dropped and
//! counted (`dns.dropped` or `udp.dropped`, and a debug log line), as a full socket buffer drops
//! UDP. So a flood on one flow never blocks the others, or the stack. Broadcast and multicast
//! are not carried, nor UDP to the gateway's other ports.

use std::net::{Ipv4Addr, SocketAddrV4};
use std::sync::atomic::Ordering;
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

use crate::fragments::IPV4_HEADER;
use crate::stack::{Event, FlowMap};

/// A DNS flow ends after this long without a datagram either way. A stub resolver uses a socket
/// for one lookup (a few queries, retried after 1 to 5 s), so this outlives its retries.
pub const DNS_IDLE: Duration = Duration::from_secs(10);
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

/// What an Ethernet frame from the TAP is to the datagram paths.
#[derive(Debug)]
pub enum Captured<'a> {
    /// A whole UDP datagram: its flow and payload.
    Datagram(UdpFlow, &'a [u8]),
    /// A fragment of a UDP datagram, for [`crate::fragments::Reassembly`].
    Fragment(Ipv4Packet<&'a [u8]>),
    /// Not UDP over IPv4, or malformed.
    Other,
}

/// Sorts out the UDP in a frame from the TAP. Checksums are not checked: the frame comes from
/// the enclave's own kernel, which leaves them partial with checksum offload.
pub fn capture(frame: &[u8]) -> Captured<'_> {
    let eth_len = EthernetFrame::<&[u8]>::header_len();
    let Some(ip) = EthernetFrame::new_checked(frame)
        .ok()
        .filter(|eth| eth.ethertype() == EthernetProtocol::Ipv4)
        .and_then(|_| Ipv4Packet::new_checked(&frame[eth_len..]).ok())
    else {
        return Captured::Other;
    };
    if ip.next_header() != IpProtocol::Udp {
        return Captured::Other;
    }
    if ip.more_frags() || ip.frag_offset() != 0 {
        return Captured::Fragment(ip);
    }
    let (src, dst) = (ip.src_addr(), ip.dst_addr());
    let payload =
        &frame[eth_len + usize::from(ip.header_len())..eth_len + usize::from(ip.total_len())];
    datagram(src, dst, payload).map_or(Captured::Other, |(flow, data)| {
        Captured::Datagram(flow, data)
    })
}

/// The flow and payload of the UDP datagram `udp` (header and payload) from `src` to `dst`.
pub fn datagram(src: Ipv4Addr, dst: Ipv4Addr, udp: &[u8]) -> Option<(UdpFlow, &[u8])> {
    let packet = UdpPacket::new_checked(udp).ok()?;
    let flow = UdpFlow {
        local: SocketAddrV4::new(src, packet.src_port()),
        remote: SocketAddrV4::new(dst, packet.dst_port()),
    };
    Some((flow, &udp[8..usize::from(packet.len())]))
}

/// The largest UDP payload in one IPv4 datagram.
pub const MAX_UDP_PAYLOAD: usize = 65_535 - IPV4_HEADER - 8;

/// Hands `emit` the Ethernet frames carrying `payload` back from `flow.remote` to `flow.local`,
/// checksums filled in: one frame, or IPv4 fragments of at most `mtu` bytes each. Returns how
/// many frames; `None` if the payload is larger than an IPv4 datagram can carry.
pub fn reply_frames(
    flow: &UdpFlow,
    payload: &[u8],
    mtu: usize,
    src_mac: EthernetAddress,
    dst_mac: EthernetAddress,
    mut emit: impl FnMut(&[u8]),
) -> Option<usize> {
    if payload.len() > MAX_UDP_PAYLOAD {
        return None;
    }
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
    // smoltcp sets DF. A datagram to a container crosses Docker's bridge, whose MTU (1,500) is
    // smaller than the TAP's: the enclave kernel must be free to fragment it, and fragments of
    // different datagrams must not share an identification.
    static IDENT: std::sync::atomic::AtomicU16 = std::sync::atomic::AtomicU16::new(1);
    packet.set_dont_frag(false);
    packet.set_ident(IDENT.fetch_add(1, Ordering::Relaxed));
    packet.fill_checksum();
    let mut datagram = UdpPacket::new_unchecked(packet.payload_mut());
    udp.emit(
        &mut datagram,
        &ip.src_addr.into(),
        &ip.dst_addr.into(),
        payload.len(),
        |out| out.copy_from_slice(payload),
        &caps,
    );
    let (link, packet) = buf.split_at(eth.buffer_len());
    if packet.len() <= mtu {
        emit(&buf);
        return Some(1);
    }
    let mut frames = 0;
    crate::fragments::fragment(link, packet, mtu, |f| {
        frames += 1;
        emit(f);
    });
    Some(frames)
}

/// A live flow: its queue, and which flow task it is (a flow that ended and was opened again is
/// another).
struct Live {
    queue: mpsc::Sender<Vec<u8>>,
    id: u64,
}

/// What the stack's flows need to know.
#[derive(Debug, Clone)]
pub struct FlowSettings {
    /// Where streams go.
    pub host: LinkAddr,
    /// Bound on opening a flow's stream.
    pub connect_timeout: Duration,
    /// The gateway's DNS endpoint, if the stack answers DNS.
    pub dns: Option<SocketAddrV4>,
    /// A UDP flow's idle timeout.
    pub udp_idle: Duration,
    /// The most flows at once, DNS and UDP together.
    pub max_flows: usize,
}

/// The stack's datagram flows.
pub struct Flows {
    live: FlowMap<UdpFlow, Live>,
    next_id: u64,
    /// The last gateway port given to an ingress flow from an unrouted client.
    next_port: u16,
    settings: FlowSettings,
    counters: Arc<Counters>,
}

impl Flows {
    /// No flows yet.
    pub fn new(settings: FlowSettings, counters: Arc<Counters>) -> Flows {
        Flows {
            live: FlowMap::default(),
            next_id: 0,
            next_port: 0,
            settings,
            counters,
        }
    }

    /// What a flow to `remote` is: DNS, UDP egress, or not carried (`None`).
    fn kind(&self, remote: SocketAddrV4, gateway: std::net::Ipv4Addr) -> Option<Kind> {
        if Some(remote) == self.settings.dns {
            return Some(Kind::DnsUdp);
        }
        let ip = remote.ip();
        if *ip == gateway || ip.is_broadcast() || ip.is_multicast() || ip.is_unspecified() {
            return None;
        }
        Some(Kind::UdpEgress)
    }

    fn dropped(&self, kind: Kind) -> &std::sync::atomic::AtomicU64 {
        if kind == Kind::DnsUdp {
            &self.counters.dns_dropped
        } else {
            &self.counters.udp_dropped
        }
    }

    /// The counter for datagrams of `flow` dropped: DNS or UDP.
    pub fn dropped_counter(&self, flow: &UdpFlow) -> &std::sync::atomic::AtomicU64 {
        if Some(flow.remote) == self.settings.dns {
            self.dropped(Kind::DnsUdp)
        } else {
            self.dropped(Kind::UdpEgress)
        }
    }

    /// Hands a datagram from the enclave to its flow, opening the flow if need be. Never waits.
    pub fn datagram(
        &mut self,
        flow: UdpFlow,
        payload: &[u8],
        gateway: std::net::Ipv4Addr,
        events: &mpsc::Sender<Event>,
    ) {
        let Some(kind) = self.kind(flow.remote, gateway) else {
            debug!(
                ?flow,
                "datagram not carried (gateway, broadcast or multicast)"
            );
            Counters::bump(&self.counters.udp_dropped);
            return;
        };
        if let Some(live) = self.live.get(&flow) {
            match live.queue.try_send(payload.to_vec()) {
                Ok(()) => return,
                Err(mpsc::error::TrySendError::Full(_)) => {
                    debug!(?flow, "flow queue full: datagram dropped");
                    Counters::bump(self.dropped(kind));
                    return;
                }
                // The flow just ended: open it again.
                Err(mpsc::error::TrySendError::Closed(_)) => {
                    self.count_live(false);
                    self.live.remove(&flow);
                }
            }
        }
        if self.live.len() >= self.settings.max_flows {
            debug!(
                ?flow,
                "{} flows open: datagram dropped", self.settings.max_flows
            );
            Counters::bump(self.dropped(kind));
            return;
        }
        let (queue, rx) = mpsc::channel(FLOW_QUEUE);
        let _ = queue.try_send(payload.to_vec());
        let id = self.next_id;
        self.next_id += 1;
        self.live.insert(flow, Live { queue, id });
        self.count_live(true);
        let (span, idle) = if kind == Kind::DnsUdp {
            Counters::bump(&self.counters.dns_queries);
            let span = tracing::debug_span!("dns", udp.src = %flow.local, udp.dst = %flow.remote);
            (span, DNS_IDLE)
        } else {
            Counters::bump(&self.counters.udp_flows);
            let span = tracing::debug_span!("udp", udp.src = %flow.local, udp.dst = %flow.remote);
            (span, self.settings.udp_idle)
        };
        tokio::spawn(
            run(
                self.settings.clone(),
                Stream {
                    kind,
                    flow,
                    id,
                    idle,
                },
                rx,
                events.clone(),
                self.counters.clone(),
            )
            .instrument(span),
        );
    }

    fn count_live(&self, up: bool) {
        if up {
            self.counters.live_udp.fetch_add(1, Ordering::Relaxed);
        } else {
            self.counters.live_udp.fetch_sub(1, Ordering::Relaxed);
        }
    }

    /// Takes a UDP ingress stream: its datagrams go from the client (or, for a client not routed
    /// out of the TAP, from the gateway) to the enclave's address at the header's port, and what
    /// the app answers goes back on the stream.
    pub fn ingress(
        &mut self,
        header: Header,
        link: common::transport::Stream,
        routed: bool,
        (enclave, gateway): (std::net::Ipv4Addr, std::net::Ipv4Addr),
        events: &mpsc::Sender<Event>,
    ) {
        let local = SocketAddrV4::new(enclave, header.dst.port());
        let remote = match header.src {
            std::net::SocketAddr::V4(client) if routed => client,
            _ => match self.gateway_port(local, gateway) {
                Some(port) => SocketAddrV4::new(gateway, port),
                None => return self.refuse(link, "no free gateway port"),
            },
        };
        let flow = UdpFlow { local, remote };
        if self.live.contains_key(&flow) {
            return self.refuse(link, "a flow from this client is already open");
        }
        if self.live.len() >= self.settings.max_flows {
            return self.refuse(link, "UDP flow cap reached");
        }
        let (queue, rx) = mpsc::channel(FLOW_QUEUE);
        let id = self.next_id;
        self.next_id += 1;
        self.live.insert(flow, Live { queue, id });
        self.count_live(true);
        Counters::bump(&self.counters.udp_flows);
        let span = tracing::debug_span!("udp", udp.client = %header.src, udp.local = %local);
        let stream = Stream {
            kind: Kind::UdpIngress,
            flow,
            id,
            idle: self.settings.udp_idle,
        };
        tokio::spawn(
            run_ingress(link, stream, rx, events.clone(), self.counters.clone()).instrument(span),
        );
    }

    /// A gateway port no live flow to `local` uses.
    fn gateway_port(&mut self, local: SocketAddrV4, gateway: std::net::Ipv4Addr) -> Option<u16> {
        const PORTS: std::ops::RangeInclusive<u16> = 32768..=60999;
        let span = usize::from(PORTS.end() - PORTS.start()) + 1;
        for _ in 0..span.min(4096) {
            self.next_port = if self.next_port < *PORTS.start() || self.next_port >= *PORTS.end() {
                *PORTS.start()
            } else {
                self.next_port + 1
            };
            let remote = SocketAddrV4::new(gateway, self.next_port);
            if !self.live.contains_key(&UdpFlow { local, remote }) {
                return Some(self.next_port);
            }
        }
        None
    }

    fn refuse(&self, mut link: common::transport::Stream, why: &str) {
        debug!("UDP ingress stream refused: {why}");
        Counters::bump(self.counters.capped.at(common::metrics::Direction::Ingress));
        tokio::spawn(async move {
            let _ =
                common::handshake::write_status(&mut link, common::wire::Status::Unreachable).await;
        });
    }

    /// Forgets a flow whose task has ended, unless it has been opened again since.
    pub fn ended(&mut self, flow: UdpFlow, id: u64) {
        if self.live.get(&flow).is_some_and(|live| live.id == id) {
            self.live.remove(&flow);
            self.count_live(false);
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

/// A flow's task: what it carries.
struct Stream {
    kind: Kind,
    flow: UdpFlow,
    id: u64,
    idle: Duration,
}

/// One flow: opens its stream, then carries datagrams out and replies back until it is idle,
/// either side ends it, or the stack is gone.
async fn run(
    settings: FlowSettings,
    stream: Stream,
    mut datagrams: mpsc::Receiver<Vec<u8>>,
    events: mpsc::Sender<Event>,
    counters: Arc<Counters>,
) {
    let Stream {
        kind,
        flow,
        id,
        idle,
    } = stream;
    let header = Header {
        kind,
        src: flow.local.into(),
        dst: flow.remote.into(),
    };
    let dropped = if kind == Kind::DnsUdp {
        &counters.dns_dropped
    } else {
        &counters.udp_dropped
    };
    match crate::egress::open(&settings.host, &header, settings.connect_timeout).await {
        Ok(link) => {
            if let Err(why) = carry(link, flow, &mut datagrams, &events, dropped, idle).await {
                debug!("flow ended: {why}");
            }
        }
        Err(status) => {
            debug!("no stream for the flow: {status}");
            counters.failure(status, common::metrics::Direction::Egress);
            Counters::bump(dropped);
        }
    }
    // Datagrams still queued are lost with the flow, as datagrams are.
    datagrams.close();
    let _ = events.send(Event::FlowEnded { flow, id }).await;
}

/// One ingress flow: answers the stream `ok`, then carries like an egress flow.
async fn run_ingress(
    mut link: common::transport::Stream,
    stream: Stream,
    mut datagrams: mpsc::Receiver<Vec<u8>>,
    events: mpsc::Sender<Event>,
    counters: Arc<Counters>,
) {
    let Stream { flow, id, idle, .. } = stream;
    if common::handshake::write_status(&mut link, common::wire::Status::Ok)
        .await
        .is_ok()
    {
        if let Err(why) = carry(
            link,
            flow,
            &mut datagrams,
            &events,
            &counters.udp_dropped,
            idle,
        )
        .await
        {
            debug!("flow ended: {why}");
        }
    }
    datagrams.close();
    let _ = events.send(Event::FlowEnded { flow, id }).await;
}

async fn carry(
    link: common::transport::Stream,
    flow: UdpFlow,
    datagrams: &mut mpsc::Receiver<Vec<u8>>,
    events: &mpsc::Sender<Event>,
    dropped: &std::sync::atomic::AtomicU64,
    idle: Duration,
) -> Result<(), DatagramError> {
    let mut link = DatagramLink::new(link);
    loop {
        tokio::select! {
            datagram = datagrams.recv() => {
                let Some(datagram) = datagram else { break };
                if !link.queue(&datagram) {
                    debug!("datagram dropped: host-proxy is not reading");
                    Counters::bump(dropped);
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

    /// The frames [`reply_frames`] emits.
    fn frames(flow: &UdpFlow, payload: &[u8], mtu: usize) -> Option<Vec<Vec<u8>>> {
        let mut out = Vec::new();
        let n = reply_frames(flow, payload, mtu, APP, GW, |f| out.push(f.to_vec()))?;
        assert_eq!(n, out.len());
        Some(out)
    }

    fn whole(frame: &[u8]) -> Option<(UdpFlow, &[u8])> {
        match capture(frame) {
            Captured::Datagram(flow, payload) => Some((flow, payload)),
            _ => None,
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
            let frames = frames(&reversed, &payload, 65520).unwrap();
            assert_eq!(frames.len(), 1);
            let (got, body) = whole(&frames[0]).unwrap();
            assert_eq!(got, f, "the app's query as the kernel would send it");
            assert_eq!(body, &payload[..]);
            let ip = Ipv4Packet::new_checked(&frames[0][14..]).unwrap();
            assert!(ip.verify_checksum());
            assert!(
                !ip.dont_frag(),
                "the kernel may fragment it for a smaller MTU"
            );
            let udp = UdpPacket::new_checked(ip.payload()).unwrap();
            assert!(udp.verify_checksum(&ip.src_addr().into(), &ip.dst_addr().into()));
        }
        assert!(frames(&f, &[0; MAX_UDP_PAYLOAD + 1], 65520).is_none());
    }

    #[test]
    fn a_reply_over_the_mtu_leaves_in_fragments_that_join_again() {
        let payload: Vec<u8> = (0..MAX_UDP_PAYLOAD).map(|i| (i % 251) as u8).collect();
        let frames = frames(&flow(), &payload, 1500).unwrap();
        assert_eq!(frames.len(), (MAX_UDP_PAYLOAD + 8).div_ceil(1480));
        let mut reassembly = crate::fragments::Reassembly::default();
        let now = tokio::time::Instant::now();
        let mut joined = None;
        for f in &frames {
            assert!(f.len() <= 14 + 1500);
            let Captured::Fragment(ip) = capture(f) else {
                panic!("not a fragment");
            };
            assert!(ip.verify_checksum());
            if let crate::fragments::Outcome::Whole(w) = reassembly.push(&ip, now) {
                joined = Some(w);
            }
        }
        let w = joined.expect("reassembled");
        let (got, body) = datagram(w.src, w.dst, &w.payload).unwrap();
        assert_eq!(got.remote, flow().local);
        assert!(body == &payload[..]);
        let udp = UdpPacket::new_checked(&w.payload[..]).unwrap();
        assert!(udp.verify_checksum(&w.src.into(), &w.dst.into()));
    }

    #[test]
    fn fragments_and_other_protocols_are_told_apart() {
        let mut frame = frames(&flow(), b"query", 1500).unwrap().remove(0);
        assert!(whole(&frame).is_some());
        // More fragments follow.
        frame[14 + 6] |= 0x20;
        assert!(matches!(capture(&frame), Captured::Fragment(_)));
        frame[14 + 6] &= !0x20;
        // TCP.
        frame[14 + 9] = 6;
        assert!(matches!(capture(&frame), Captured::Other));
        frame[14 + 9] = 17;
        // A UDP length past the packet.
        frame[14 + 20 + 5] = 200;
        assert!(matches!(capture(&frame), Captured::Other));
        assert!(matches!(capture(&frame[..20]), Captured::Other));
    }
}
