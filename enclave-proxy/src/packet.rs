//! Sans-IO packet work on raw Ethernet frames from the TAP: spotting the SYNs that open new
//! egress connections, writing the ICMP errors that make a failed egress `connect()` fail, and
//! the `virtio_net_hdr` and MSS work that lets TCP cross the TAP in super-frames
//! ([`VnetHdr`], [`raise_mss`], [`mark_gso`]).
//!
//! # How a SYN becomes a socket
//!
//! smoltcp only answers a SYN if a socket is listening on its destination. Rather than listen on
//! every port, enclave-proxy looks at each frame before smoltcp does ([`classify`]):
//! - a SYN for a flow it has never seen is *held* (copied aside) and a stream to host-proxy is
//!   opened for it;
//! - a retransmitted SYN for a flow still waiting on host-proxy is dropped;
//! - once host-proxy answers `ok`, a socket listening on exactly that destination is created and
//!   the held SYN is replayed into smoltcp, which answers SYN-ACK: only now does the
//!   application's `connect()` complete;
//! - if host-proxy answers `refused`, the held SYN is replayed with no socket, and smoltcp
//!   answers RST (`ECONNREFUSED`); for any other failure an ICMP destination-unreachable is sent
//!   ([`icmp_unreachable`]), which Linux turns into a failed `connect()` (`EHOSTUNREACH`) while
//!   the socket is in SYN-SENT.

use smoltcp::wire::{
    ArpOperation, ArpPacket, ArpRepr, EthernetAddress, EthernetFrame, EthernetProtocol,
    EthernetRepr, Icmpv4DstUnreachable, Icmpv4Packet, Icmpv4Repr, IpEndpoint, IpProtocol,
    Ipv4Address, Ipv4Packet, Ipv4Repr, TcpPacket,
};

use crate::sys::VNET_HDR_LEN;

/// A TCP flow as the enclave kernel sees it: its own endpoint and the far endpoint.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct FlowKey {
    /// The enclave-kernel side (the application, after any NAT).
    pub local: IpEndpoint,
    /// The far side (the destination for egress, the client for ingress).
    pub remote: IpEndpoint,
}

/// What a frame from the TAP is, as far as the stack's dispatch is concerned.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Frame {
    /// An initial SYN (no ACK) for this flow.
    Syn(FlowKey),
    /// Any other TCP segment of this flow.
    Tcp(FlowKey),
    /// Another IPv4 packet (ICMP, a fragment, UDP): the control shard's business.
    Ip,
    /// ARP: answered by [`arp_reply`] when it asks for the gateway.
    Arp,
    /// Anything else (IPv6 neighbour discovery while the TAP is IPv4-only, junk): dropped.
    Other,
}

/// Classifies a frame without copying it.
pub fn classify(frame: &[u8]) -> Frame {
    let Ok(eth) = EthernetFrame::new_checked(frame) else {
        return Frame::Other;
    };
    match eth.ethertype() {
        EthernetProtocol::Ipv4 => {}
        EthernetProtocol::Arp => return Frame::Arp,
        _ => return Frame::Other,
    }
    let Ok(ip) = Ipv4Packet::new_checked(eth.payload()) else {
        return Frame::Other;
    };
    if ip.next_header() != IpProtocol::Tcp || ip.frag_offset() != 0 {
        return Frame::Ip;
    }
    let Ok(tcp) = TcpPacket::new_checked(ip.payload()) else {
        return Frame::Ip;
    };
    let key = FlowKey {
        local: IpEndpoint::new(ip.src_addr().into(), tcp.src_port()),
        remote: IpEndpoint::new(ip.dst_addr().into(), tcp.dst_port()),
    };
    if tcp.syn() && !tcp.ack() && !tcp.rst() && !tcp.fin() {
        Frame::Syn(key)
    } else {
        Frame::Tcp(key)
    }
}

/// The answer to an ARP request for `gateway`, from `our_mac`; `None` for any other frame. The
/// stack answers ARP itself, once, for every shard (see [`crate::shard`]).
pub fn arp_reply(frame: &[u8], our_mac: EthernetAddress, gateway: Ipv4Address) -> Option<Vec<u8>> {
    let eth = EthernetFrame::new_checked(frame).ok()?;
    let arp = ArpPacket::new_checked(eth.payload()).ok()?;
    let ArpRepr::EthernetIpv4 {
        operation: ArpOperation::Request,
        source_hardware_addr,
        source_protocol_addr,
        target_protocol_addr,
        ..
    } = ArpRepr::parse(&arp).ok()?
    else {
        return None;
    };
    if target_protocol_addr != gateway {
        return None;
    }
    let reply = ArpRepr::EthernetIpv4 {
        operation: ArpOperation::Reply,
        source_hardware_addr: our_mac,
        source_protocol_addr: gateway,
        target_hardware_addr: source_hardware_addr,
        target_protocol_addr: source_protocol_addr,
    };
    let eth_repr = EthernetRepr {
        src_addr: our_mac,
        dst_addr: source_hardware_addr,
        ethertype: EthernetProtocol::Arp,
    };
    let mut out = vec![0u8; eth_repr.buffer_len() + reply.buffer_len()];
    let mut f = EthernetFrame::new_unchecked(&mut out[..]);
    eth_repr.emit(&mut f);
    reply.emit(&mut ArpPacket::new_unchecked(f.payload_mut()));
    Some(out)
}

/// Why an egress connection failed, as told to the application by ICMP.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Unreachable {
    /// Host unreachable (code 1): no route, time-out, host-proxy down.
    Host,
    /// Communication administratively prohibited (code 13): egress policy.
    Prohibited,
}

/// Builds the Ethernet frame of an ICMP destination-unreachable answering `syn_frame`, sent from
/// `gateway` (the stack's own address, acting as the router that gave up) and `our_mac`.
/// Returns `None` if `syn_frame` is not an IPv4 frame.
pub fn icmp_unreachable(
    syn_frame: &[u8],
    our_mac: EthernetAddress,
    gateway: Ipv4Address,
    why: Unreachable,
) -> Option<Vec<u8>> {
    let eth = EthernetFrame::new_checked(syn_frame).ok()?;
    let ip = Ipv4Packet::new_checked(eth.payload()).ok()?;
    let original = Ipv4Repr {
        src_addr: ip.src_addr(),
        dst_addr: ip.dst_addr(),
        next_header: ip.next_header(),
        payload_len: ip.payload().len(),
        hop_limit: ip.hop_limit(),
    };
    // RFC 792: the original IP header plus the first 8 bytes of its payload.
    let data = &ip.payload()[..ip.payload().len().min(8)];
    let reason = match why {
        Unreachable::Host => Icmpv4DstUnreachable::HostUnreachable,
        Unreachable::Prohibited => Icmpv4DstUnreachable::CommProhibited,
    };
    let icmp = Icmpv4Repr::DstUnreachable {
        reason,
        header: original,
        data,
    };
    let ip_repr = Ipv4Repr {
        src_addr: gateway,
        dst_addr: ip.src_addr(),
        next_header: IpProtocol::Icmp,
        payload_len: icmp.buffer_len(),
        hop_limit: 64,
    };
    let eth_repr = EthernetRepr {
        src_addr: our_mac,
        dst_addr: eth.src_addr(),
        ethertype: EthernetProtocol::Ipv4,
    };
    let mut out = vec![0u8; eth_repr.buffer_len() + ip_repr.buffer_len() + icmp.buffer_len()];
    let mut frame = EthernetFrame::new_unchecked(&mut out[..]);
    eth_repr.emit(&mut frame);
    let caps = smoltcp::phy::ChecksumCapabilities::default();
    let mut ip_packet = Ipv4Packet::new_unchecked(frame.payload_mut());
    ip_repr.emit(&mut ip_packet, &caps);
    icmp.emit(
        &mut Icmpv4Packet::new_unchecked(ip_packet.payload_mut()),
        &caps,
    );
    Some(out)
}

/// A `virtio_net_hdr` as the TAP exchanges it ahead of every frame (`IFF_VNET_HDR`, see
/// [`crate::sys::open_tap`]): how the kernel and we tell each other that a frame is a TCP
/// super-frame to be cut into segments, or that its checksum is left partial.
///
/// # Super-frames on the TAP
///
/// With TSO on ([`crate::sys::set_offload`]), the enclave kernel stops cutting TCP into
/// MSS-sized segments before the TAP. A container's traffic, built as 64 KiB GSO packets by its
/// own stack and kept whole across veth and the bridge, reaches us as one frame of up to 64 KiB
/// marked [`VnetHdr::GSO_TCPV4`] with the real segment size in `gso_size`, usually with
/// [`VnetHdr::F_NEEDS_CSUM`] (the TCP checksum field holds only the pseudo-header sum). smoltcp
/// takes such a segment as it is: it checks neither the segment against its MTU or MSS nor the
/// checksum (the shards do not verify receive checksums), so only the receive buffer had to grow.
///
/// The other way, smoltcp never sends a segment larger than the peer's MSS, and a container
/// behind Docker's bridge advertises 1,460. So the SYN and SYN-ACK of each flow have their MSS
/// option raised to what the TAP's MTU allows before smoltcp sees them ([`raise_mss`]), the real
/// one is remembered, and a packet smoltcp then sends with more payload than the flow's real
/// segment size is marked GSO ([`mark_gso`]): the kernel cuts it into segments that each fit the
/// real MSS and the bridge's MTU. No frame larger than the TAP's MTU is ever written, GSO or not.
/// smoltcp then counts in the raised MSS elsewhere too: its slow start grows the congestion
/// window by up to one MSS per ACK, which suits a peer that acknowledges each super-frame once;
/// and it would hold back the ACK of a super-frame, which the stack's receive loop prevents.
///
/// IPv4 only, like the TAP's addressing: TCP/IPv6 super-frames from the kernel are accepted at
/// this layer but dropped with every other IPv6 frame ([`classify`]), and nothing is marked
/// `GSO_TCPV6`.
///
/// The fields are in the host's byte order: the TUN driver's "legacy" layout, which it uses
/// unless told otherwise with `TUNSETVNETLE`/`TUNSETVNETBE` (never done here).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct VnetHdr {
    /// `F_NEEDS_CSUM`, `F_DATA_VALID`.
    pub flags: u8,
    /// `GSO_*`, with `GSO_ECN` or'ed in when the segments carry ECN.
    pub gso_type: u8,
    /// Length of the headers each segment repeats (Ethernet, IP and TCP).
    pub hdr_len: u16,
    /// Payload bytes per segment.
    pub gso_size: u16,
    /// Where the checksummed part starts, from the start of the Ethernet frame.
    pub csum_start: u16,
    /// Where in it the checksum field is.
    pub csum_offset: u16,
}

/// What a received frame's [`VnetHdr`] asks of us.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Gso {
    /// An ordinary frame.
    None,
    /// A TCP super-frame (IPv4 or IPv6): one TCP segment carrying what would have been several
    /// segments of `size` payload bytes each.
    Tcp {
        /// The segment size the sender would have cut to.
        size: u16,
    },
    /// UDP fragmentation or segmentation offload, or a type this code does not know: never
    /// asked for (only TSO is enabled), and not to be handed to smoltcp as one datagram.
    Unsupported,
}

impl VnetHdr {
    /// `flags`: the checksum from `csum_start` on is still to be completed.
    pub const F_NEEDS_CSUM: u8 = 1;
    /// `flags`: the checksums are known good.
    pub const F_DATA_VALID: u8 = 2;
    /// `gso_type`: not a super-frame.
    pub const GSO_NONE: u8 = 0;
    /// `gso_type`: a TCP/IPv4 super-frame.
    pub const GSO_TCPV4: u8 = 1;
    /// `gso_type`: UDP fragmentation offload.
    pub const GSO_UDP: u8 = 3;
    /// `gso_type`: a TCP/IPv6 super-frame.
    pub const GSO_TCPV6: u8 = 4;
    /// `gso_type`: UDP segmentation offload.
    pub const GSO_UDP_L4: u8 = 5;
    /// `gso_type` bit: the segments carry ECN (CWR on the first only).
    pub const GSO_ECN: u8 = 0x80;

    /// The header of every frame we send that needs no segmenting: checksums complete and valid.
    pub const VALID: VnetHdr = VnetHdr {
        flags: VnetHdr::F_DATA_VALID,
        gso_type: VnetHdr::GSO_NONE,
        hdr_len: 0,
        gso_size: 0,
        csum_start: 0,
        csum_offset: 0,
    };

    /// Reads a header from the first [`VNET_HDR_LEN`] bytes; `None` if there are fewer.
    pub fn decode(bytes: &[u8]) -> Option<VnetHdr> {
        let b: &[u8; VNET_HDR_LEN] = bytes.get(..VNET_HDR_LEN)?.try_into().ok()?;
        let u16_at = |i: usize| u16::from_ne_bytes([b[i], b[i + 1]]);
        Some(VnetHdr {
            flags: b[0],
            gso_type: b[1],
            hdr_len: u16_at(2),
            gso_size: u16_at(4),
            csum_start: u16_at(6),
            csum_offset: u16_at(8),
        })
    }

    /// Writes the header into the first [`VNET_HDR_LEN`] bytes of `out`, which must hold them.
    pub fn encode(&self, out: &mut [u8]) {
        out[0] = self.flags;
        out[1] = self.gso_type;
        out[2..4].copy_from_slice(&self.hdr_len.to_ne_bytes());
        out[4..6].copy_from_slice(&self.gso_size.to_ne_bytes());
        out[6..8].copy_from_slice(&self.csum_start.to_ne_bytes());
        out[8..10].copy_from_slice(&self.csum_offset.to_ne_bytes());
    }

    /// Whether the frame's checksum is partial (the TCP or UDP checksum field holds only the
    /// pseudo-header sum).
    pub fn needs_csum(&self) -> bool {
        self.flags & VnetHdr::F_NEEDS_CSUM != 0
    }

    /// What kind of frame this header announces.
    pub fn gso(&self) -> Gso {
        match self.gso_type & !VnetHdr::GSO_ECN {
            VnetHdr::GSO_NONE => Gso::None,
            VnetHdr::GSO_TCPV4 | VnetHdr::GSO_TCPV6 if self.gso_size > 0 => Gso::Tcp {
                size: self.gso_size,
            },
            _ => Gso::Unsupported,
        }
    }
}

/// Where a TCP/IPv4 segment sits in an IP packet, and between whom it goes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TcpSegment {
    /// The sender.
    pub src: IpEndpoint,
    /// The receiver.
    pub dst: IpEndpoint,
    /// IPv4 header length, options included.
    pub ip_header_len: usize,
    /// TCP header length, options included.
    pub tcp_header_len: usize,
    /// TCP payload length.
    pub payload_len: usize,
    /// The TCP flags byte (FIN 0x01, SYN 0x02, RST 0x04, PSH 0x08, ACK 0x10).
    pub flags: u8,
}

impl TcpSegment {
    /// TCP options length.
    pub fn options_len(&self) -> usize {
        self.tcp_header_len - TCP_HEADER_MIN
    }

    /// Whether it is a SYN or a SYN-ACK (not a RST).
    pub fn syn(&self) -> bool {
        self.flags & (TCP_SYN | TCP_RST) == TCP_SYN
    }
}

const IPV4_HEADER_MIN: usize = 20;
const TCP_HEADER_MIN: usize = 20;
const TCP_SYN: u8 = 0x02;
const TCP_RST: u8 = 0x04;
/// Offset of the checksum in the TCP header.
const TCP_CHECKSUM: usize = 16;
/// TCP option kinds.
const OPT_END: u8 = 0;
const OPT_NOP: u8 = 1;
const OPT_MSS: u8 = 2;
/// Linux's smallest MSS (`TCP_MIN_MSS`). A flow that asks for less is left to smoltcp's own
/// handling: raising it would leave too little room for a segment's payload once its options
/// are counted.
const MIN_REAL_MSS: u16 = 88;

/// Finds the TCP segment in an IPv4 packet (no link header): `None` for anything else, a
/// fragment, or a header that does not fit the packet. Reads a dozen bytes, copies nothing.
pub fn tcp_segment(packet: &[u8]) -> Option<TcpSegment> {
    if packet.len() < IPV4_HEADER_MIN || packet[0] >> 4 != 4 {
        return None;
    }
    let ip_header_len = usize::from(packet[0] & 0x0f) * 4;
    let total_len = usize::from(u16::from_be_bytes([packet[2], packet[3]]));
    // More fragments, or a fragment offset: not a whole segment.
    let fragment = u16::from_be_bytes([packet[6], packet[7]]) & 0x3fff != 0;
    if fragment
        || packet[9] != u8::from(IpProtocol::Tcp)
        || ip_header_len < IPV4_HEADER_MIN
        || total_len > packet.len()
        || total_len < ip_header_len + TCP_HEADER_MIN
    {
        return None;
    }
    let tcp = &packet[ip_header_len..total_len];
    let tcp_header_len = usize::from(tcp[12] >> 4) * 4;
    if tcp_header_len < TCP_HEADER_MIN || tcp_header_len > tcp.len() {
        return None;
    }
    let addr =
        |at: usize| Ipv4Address::new(packet[at], packet[at + 1], packet[at + 2], packet[at + 3]);
    let port = |at: usize| u16::from_be_bytes([tcp[at], tcp[at + 1]]);
    Some(TcpSegment {
        src: IpEndpoint::new(addr(12).into(), port(0)),
        dst: IpEndpoint::new(addr(16).into(), port(2)),
        ip_header_len,
        tcp_header_len,
        payload_len: tcp.len() - tcp_header_len,
        flags: tcp[13],
    })
}

/// The MSS a flow's SYN or SYN-ACK should carry for smoltcp to send super-frames on a TAP of
/// `mtu` bytes: the largest segment an IPv4 packet of that size holds.
pub fn mss_for_mtu(mtu: usize) -> u16 {
    u16::try_from(mtu.saturating_sub(IPV4_HEADER_MIN + TCP_HEADER_MIN)).unwrap_or(u16::MAX)
}

/// If `frame` (Ethernet) is a TCP/IPv4 SYN or SYN-ACK whose MSS option is below `to`, raises the
/// option to `to` and returns the MSS the sender asked for; `None` (and the frame untouched)
/// otherwise, including when the MSS is below Linux's minimum of 88.
///
/// `partial` says the frame's TCP checksum is partial ([`VnetHdr::needs_csum`]): the field then
/// holds only the pseudo-header sum, which does not cover the option, and is left as it is.
/// Otherwise the checksum is updated for the change (RFC 1624), so the frame stays valid.
pub fn raise_mss(frame: &mut [u8], to: u16, partial: bool) -> Option<u16> {
    if frame.len() < ETHERNET_HEADER || frame[12..14] != [0x08, 0x00] {
        return None;
    }
    let packet = &mut frame[ETHERNET_HEADER..];
    let seg = tcp_segment(packet)?;
    if !seg.syn() {
        return None;
    }
    let tcp = &mut packet[seg.ip_header_len..];
    let at = mss_option(&tcp[..seg.tcp_header_len])?;
    let real = u16::from_be_bytes([tcp[at], tcp[at + 1]]);
    if real >= to || real < MIN_REAL_MSS {
        return None;
    }
    // The checksum covers 16-bit words from the start of the TCP header; the option may start
    // at an odd offset, so the words the two bytes touch are summed before and after.
    let span = (at & !1)..((at + 2 + 1) & !1);
    let before = ones_sum(&tcp[span.clone()]);
    tcp[at..at + 2].copy_from_slice(&to.to_be_bytes());
    if !partial {
        let after = ones_sum(&tcp[span]);
        let check = u16::from_be_bytes([tcp[TCP_CHECKSUM], tcp[TCP_CHECKSUM + 1]]);
        // RFC 1624, eqn. 3: HC' = ~(~HC + ~m + m').
        let updated = !fold(u32::from(!check) + u32::from(!before) + u32::from(after));
        tcp[TCP_CHECKSUM..TCP_CHECKSUM + 2].copy_from_slice(&updated.to_be_bytes());
    }
    Some(real)
}

/// The offset of the MSS option's value in a TCP header, if it has one.
fn mss_option(header: &[u8]) -> Option<usize> {
    let mut i = TCP_HEADER_MIN;
    while i < header.len() {
        match header[i] {
            OPT_END => return None,
            OPT_NOP => i += 1,
            kind => {
                let len = usize::from(*header.get(i + 1)?);
                if len < 2 || i + len > header.len() {
                    return None;
                }
                if kind == OPT_MSS && len == 4 {
                    return Some(i + 2);
                }
                i += len;
            }
        }
    }
    None
}

/// The payload size the kernel should cut a segment of this flow into, if it needs cutting: the
/// flow's real MSS less the TCP options the segment carries (RFC 6691: the MSS counts options
/// out), so that every piece fits the peer's MSS and the path's MTU. `None` when the segment
/// already fits.
pub fn gso_size(seg: &TcpSegment, real_mss: u16) -> Option<u16> {
    let size = usize::from(real_mss).checked_sub(seg.options_len())?;
    (size > 0 && seg.payload_len > size).then(|| u16::try_from(size).unwrap_or(u16::MAX))
}

/// Marks a TCP/IPv4 packet from the stack (`packet`, with `link` bytes of link header before it
/// in the frame) for the kernel to cut into segments of `gso_size` payload bytes: replaces its
/// TCP checksum with the partial one the kernel completes for each segment (the pseudo-header
/// sum, over the whole segment's length, not inverted) and returns the header that says so.
pub fn mark_gso(packet: &mut [u8], seg: &TcpSegment, gso_size: u16, link: usize) -> VnetHdr {
    let tcp_len = seg.tcp_header_len + seg.payload_len;
    let mut sum = ones_sum(&packet[12..20]);
    sum = fold(u32::from(sum) + u32::from(u8::from(IpProtocol::Tcp)));
    sum = fold(u32::from(sum) + (tcp_len as u32 & 0xffff) + (tcp_len as u32 >> 16));
    let at = seg.ip_header_len + TCP_CHECKSUM;
    packet[at..at + 2].copy_from_slice(&sum.to_be_bytes());
    let csum_start = link + seg.ip_header_len;
    VnetHdr {
        flags: VnetHdr::F_NEEDS_CSUM,
        gso_type: VnetHdr::GSO_TCPV4,
        hdr_len: u16::try_from(csum_start + seg.tcp_header_len).unwrap_or(u16::MAX),
        gso_size,
        csum_start: u16::try_from(csum_start).unwrap_or(u16::MAX),
        csum_offset: TCP_CHECKSUM as u16,
    }
}

const ETHERNET_HEADER: usize = 14;

/// The ones'-complement sum of `data` as big-endian 16-bit words (an odd last byte padded with
/// zero), folded to 16 bits and not inverted.
fn ones_sum(data: &[u8]) -> u16 {
    let mut sum = 0u32;
    let mut words = data.chunks_exact(2);
    for w in &mut words {
        sum += u32::from(u16::from_be_bytes([w[0], w[1]]));
    }
    if let [last] = words.remainder() {
        sum += u32::from(*last) << 8;
    }
    fold(sum)
}

fn fold(mut sum: u32) -> u16 {
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    sum as u16
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use smoltcp::wire::{IpAddress, TcpControl, TcpRepr, TcpSeqNumber};

    pub(crate) const APP_MAC: EthernetAddress = EthernetAddress([2, 0, 0, 0, 0, 2]);
    const OUR_MAC: EthernetAddress = EthernetAddress([2, 0, 0, 0, 0, 1]);

    /// A SYN from 10.240.0.2:40000 to 93.184.216.34:443, as the kernel would write it.
    pub(crate) fn syn_frame(control: TcpControl, ack: bool) -> Vec<u8> {
        let src = Ipv4Address::new(10, 240, 0, 2);
        let dst = Ipv4Address::new(93, 184, 216, 34);
        let tcp = TcpRepr {
            src_port: 40000,
            dst_port: 443,
            control,
            seq_number: TcpSeqNumber(1000),
            ack_number: ack.then_some(TcpSeqNumber(1)),
            window_len: 64000,
            window_scale: None,
            max_seg_size: Some(1460),
            sack_permitted: false,
            sack_ranges: [None; 3],
            timestamp: None,
            payload: &[],
        };
        let ip = Ipv4Repr {
            src_addr: src,
            dst_addr: dst,
            next_header: IpProtocol::Tcp,
            payload_len: tcp.buffer_len(),
            hop_limit: 64,
        };
        let eth = EthernetRepr {
            src_addr: APP_MAC,
            dst_addr: OUR_MAC,
            ethertype: EthernetProtocol::Ipv4,
        };
        let mut out = vec![0u8; 14 + ip.buffer_len() + tcp.buffer_len()];
        let mut f = EthernetFrame::new_unchecked(&mut out[..]);
        eth.emit(&mut f);
        let caps = smoltcp::phy::ChecksumCapabilities::default();
        let mut p = Ipv4Packet::new_unchecked(f.payload_mut());
        ip.emit(&mut p, &caps);
        tcp.emit(
            &mut TcpPacket::new_unchecked(p.payload_mut()),
            &IpAddress::Ipv4(src),
            &IpAddress::Ipv4(dst),
            &caps,
        );
        out
    }

    #[test]
    fn only_bare_syns_open_flows() {
        let key = FlowKey {
            local: IpEndpoint::new(Ipv4Address::new(10, 240, 0, 2).into(), 40000),
            remote: IpEndpoint::new(Ipv4Address::new(93, 184, 216, 34).into(), 443),
        };
        assert_eq!(
            classify(&syn_frame(TcpControl::Syn, false)),
            Frame::Syn(key)
        );
        assert_eq!(classify(&syn_frame(TcpControl::Syn, true)), Frame::Tcp(key));
        assert_eq!(
            classify(&syn_frame(TcpControl::None, true)),
            Frame::Tcp(key)
        );
        assert_eq!(
            classify(&syn_frame(TcpControl::Rst, false)),
            Frame::Tcp(key)
        );
        assert_eq!(classify(&[0u8; 10]), Frame::Other);
        assert_eq!(classify(&[]), Frame::Other);
    }

    #[test]
    fn icmp_error_quotes_the_syn_and_goes_back_to_the_app() {
        let syn = syn_frame(TcpControl::Syn, false);
        let gw = Ipv4Address::new(10, 240, 0, 1);
        let out = icmp_unreachable(&syn, OUR_MAC, gw, Unreachable::Prohibited).unwrap();
        let eth = EthernetFrame::new_checked(&out[..]).unwrap();
        assert_eq!(eth.dst_addr(), APP_MAC);
        let ip = Ipv4Packet::new_checked(eth.payload()).unwrap();
        assert!(ip.verify_checksum());
        assert_eq!(ip.dst_addr(), Ipv4Address::new(10, 240, 0, 2));
        let icmp = Icmpv4Packet::new_checked(ip.payload()).unwrap();
        assert!(icmp.verify_checksum());
        assert_eq!(icmp.msg_code(), 13);
        // The quoted header and the first 8 bytes of TCP (ports and sequence number) follow.
        let quoted = icmp.data();
        assert_eq!(quoted.len(), 20 + 8);
        assert_eq!(&quoted[16..20], &[93, 184, 216, 34]);
        assert_eq!(&quoted[20..24], &[0x9c, 0x40, 0x01, 0xbb]);
    }

    #[test]
    fn arp_for_the_gateway_is_answered_and_nothing_else() {
        let gw = Ipv4Address::new(10, 240, 0, 1);
        let ask = |target: Ipv4Address| {
            let repr = ArpRepr::EthernetIpv4 {
                operation: ArpOperation::Request,
                source_hardware_addr: APP_MAC,
                source_protocol_addr: Ipv4Address::new(10, 240, 0, 2),
                target_hardware_addr: EthernetAddress([0; 6]),
                target_protocol_addr: target,
            };
            let eth = EthernetRepr {
                src_addr: APP_MAC,
                dst_addr: EthernetAddress::BROADCAST,
                ethertype: EthernetProtocol::Arp,
            };
            let mut out = vec![0u8; 14 + repr.buffer_len()];
            let mut f = EthernetFrame::new_unchecked(&mut out[..]);
            eth.emit(&mut f);
            repr.emit(&mut ArpPacket::new_unchecked(f.payload_mut()));
            out
        };
        let request = ask(gw);
        assert_eq!(classify(&request), Frame::Arp);
        let reply = arp_reply(&request, OUR_MAC, gw).unwrap();
        let eth = EthernetFrame::new_checked(&reply[..]).unwrap();
        assert_eq!(eth.dst_addr(), APP_MAC);
        let arp = ArpRepr::parse(&ArpPacket::new_checked(eth.payload()).unwrap()).unwrap();
        assert_eq!(
            arp,
            ArpRepr::EthernetIpv4 {
                operation: ArpOperation::Reply,
                source_hardware_addr: OUR_MAC,
                source_protocol_addr: gw,
                target_hardware_addr: APP_MAC,
                target_protocol_addr: Ipv4Address::new(10, 240, 0, 2),
            }
        );
        assert_eq!(
            arp_reply(&ask(Ipv4Address::new(10, 240, 0, 3)), OUR_MAC, gw),
            None
        );
        assert_eq!(
            arp_reply(&reply, OUR_MAC, gw),
            None,
            "replies are not answered"
        );
    }

    /// A kernel TSO header as `tun_put_user` writes it for a 1,448-byte-segment super-frame.
    #[test]
    fn vnet_header_layout_and_round_trip() {
        let hdr = VnetHdr {
            flags: VnetHdr::F_NEEDS_CSUM,
            gso_type: VnetHdr::GSO_TCPV4,
            hdr_len: 66,
            gso_size: 1448,
            csum_start: 34,
            csum_offset: 16,
        };
        let mut bytes = [0xffu8; VNET_HDR_LEN + 2];
        hdr.encode(&mut bytes);
        // Host byte order, which on every target enclave-net runs on is little-endian.
        #[cfg(target_endian = "little")]
        assert_eq!(
            &bytes[..VNET_HDR_LEN],
            &[1, 1, 66, 0, 0xa8, 0x05, 34, 0, 16, 0]
        );
        assert_eq!(
            &bytes[VNET_HDR_LEN..],
            &[0xff, 0xff],
            "writes 10 bytes, no more"
        );
        assert_eq!(VnetHdr::decode(&bytes), Some(hdr));
        assert_eq!(hdr.gso(), Gso::Tcp { size: 1448 });
        assert!(hdr.needs_csum());
        assert_eq!(VnetHdr::decode(&bytes[..VNET_HDR_LEN - 1]), None);

        let mut valid = [0u8; VNET_HDR_LEN];
        VnetHdr::VALID.encode(&mut valid);
        assert_eq!(valid, [2, 0, 0, 0, 0, 0, 0, 0, 0, 0]);
        assert_eq!(VnetHdr::VALID.gso(), Gso::None);
        assert!(!VnetHdr::VALID.needs_csum());
    }

    #[test]
    fn only_tcp_super_frames_are_taken() {
        let with = |gso_type, gso_size| VnetHdr {
            gso_type,
            gso_size,
            ..VnetHdr::default()
        };
        assert_eq!(with(VnetHdr::GSO_NONE, 0).gso(), Gso::None);
        assert_eq!(
            with(VnetHdr::GSO_TCPV4 | VnetHdr::GSO_ECN, 1460).gso(),
            Gso::Tcp { size: 1460 }
        );
        assert_eq!(
            with(VnetHdr::GSO_TCPV6, 1440).gso(),
            Gso::Tcp { size: 1440 }
        );
        assert_eq!(with(VnetHdr::GSO_TCPV4, 0).gso(), Gso::Unsupported);
        assert_eq!(with(VnetHdr::GSO_UDP, 1472).gso(), Gso::Unsupported);
        assert_eq!(with(VnetHdr::GSO_UDP_L4, 1472).gso(), Gso::Unsupported);
        assert_eq!(with(0x42, 1000).gso(), Gso::Unsupported);
    }

    /// The TCP segment of a frame from [`syn_frame`] or [`data_frame`], checked as a receiver
    /// would: is its checksum right?
    fn checksum_ok(frame: &[u8]) -> bool {
        let eth = EthernetFrame::new_checked(frame).unwrap();
        let ip = Ipv4Packet::new_checked(eth.payload()).unwrap();
        let tcp = TcpPacket::new_checked(ip.payload()).unwrap();
        tcp.verify_checksum(&ip.src_addr().into(), &ip.dst_addr().into())
    }

    fn mss_of(frame: &[u8]) -> Option<u16> {
        let eth = EthernetFrame::new_checked(frame).unwrap();
        let ip = Ipv4Packet::new_checked(eth.payload()).unwrap();
        let tcp = TcpPacket::new_checked(ip.payload()).unwrap();
        let repr = TcpRepr::parse(
            &tcp,
            &ip.src_addr().into(),
            &ip.dst_addr().into(),
            &smoltcp::phy::ChecksumCapabilities::ignored(),
        )
        .unwrap();
        repr.max_seg_size
    }

    #[test]
    fn syn_and_syn_ack_mss_is_raised_and_the_checksum_kept() {
        for ack in [false, true] {
            let mut frame = syn_frame(TcpControl::Syn, ack);
            assert!(checksum_ok(&frame));
            assert_eq!(raise_mss(&mut frame, 65480, false), Some(1460));
            assert_eq!(mss_of(&frame), Some(65480));
            assert!(checksum_ok(&frame), "RFC 1624 update keeps it valid");
            // Already raised: nothing more to do.
            assert_eq!(raise_mss(&mut frame, 65480, false), None);
        }
    }

    #[test]
    fn mss_at_an_odd_offset_keeps_the_checksum() {
        // NOP, then MSS: the value starts at an odd offset into the TCP header.
        let mut frame = syn_frame(TcpControl::Syn, false);
        let tcp_at = 14 + 20;
        assert_eq!(&frame[tcp_at + 20..tcp_at + 24], &[2, 4, 0x05, 0xb4]);
        // Rebuild the header with 24 bytes of options: NOP, MSS 1460, NOP, NOP, EOL padding.
        let options = [1u8, 2, 4, 0x05, 0xb4, 1, 1, 0];
        let mut rebuilt = frame[..tcp_at + 20].to_vec();
        rebuilt.extend_from_slice(&options);
        rebuilt[tcp_at + 12] = (((20 + options.len()) / 4) << 4) as u8;
        let total = (rebuilt.len() - 14) as u16;
        rebuilt[14 + 2..14 + 4].copy_from_slice(&total.to_be_bytes());
        {
            let mut eth = EthernetFrame::new_unchecked(&mut rebuilt[..]);
            let mut ip = Ipv4Packet::new_unchecked(eth.payload_mut());
            ip.fill_checksum();
            let (src, dst) = (ip.src_addr().into(), ip.dst_addr().into());
            TcpPacket::new_unchecked(ip.payload_mut()).fill_checksum(&src, &dst);
        }
        frame = rebuilt;
        assert!(checksum_ok(&frame));
        assert_eq!(mss_of(&frame), Some(1460));
        assert_eq!(raise_mss(&mut frame, 9000, false), Some(1460));
        assert_eq!(mss_of(&frame), Some(9000));
        assert!(checksum_ok(&frame));
    }

    #[test]
    fn a_partial_checksum_is_left_alone() {
        let mut frame = syn_frame(TcpControl::Syn, false);
        let check_at = 14 + 20 + 16;
        // What the kernel leaves with NEEDS_CSUM: some pseudo-header sum, not covering options.
        frame[check_at..check_at + 2].copy_from_slice(&[0x12, 0x34]);
        assert_eq!(raise_mss(&mut frame, 65480, true), Some(1460));
        assert_eq!(mss_of(&frame), Some(65480));
        assert_eq!(&frame[check_at..check_at + 2], &[0x12, 0x34]);
    }

    #[test]
    fn other_segments_are_not_touched() {
        for (control, ack) in [
            (TcpControl::None, true),
            (TcpControl::Rst, false),
            (TcpControl::Fin, true),
            (TcpControl::Psh, true),
        ] {
            let frame = syn_frame(control, ack);
            let mut copy = frame.clone();
            assert_eq!(raise_mss(&mut copy, 65480, false), None, "{control:?}");
            assert_eq!(copy, frame);
        }
        // A SYN already asking for more, or for less than Linux's minimum, or with no MSS.
        let mut frame = syn_frame(TcpControl::Syn, false);
        assert_eq!(raise_mss(&mut frame, 1460, false), None);
        assert_eq!(raise_mss(&mut frame, 1000, false), None);
        let mut tiny = syn_frame(TcpControl::Syn, false);
        let mss_at = 14 + 20 + 22;
        tiny[mss_at..mss_at + 2].copy_from_slice(&40u16.to_be_bytes());
        assert_eq!(raise_mss(&mut tiny, 65480, true), None);
        let mut none = syn_frame(TcpControl::Syn, false);
        none[14 + 20 + 20] = 0; // EOL where the MSS option was
        assert_eq!(raise_mss(&mut none, 65480, false), None);
        // Not TCP/IPv4 at all, or cut short.
        assert_eq!(raise_mss(&mut [0u8; 10], 65480, false), None);
        let mut short = syn_frame(TcpControl::Syn, false);
        short.truncate(14 + 20 + 10);
        assert_eq!(raise_mss(&mut short, 65480, false), None);
        assert_eq!(mss_for_mtu(65520), 65480);
        assert_eq!(mss_for_mtu(1500), 1460);
    }

    /// An IPv4 data segment from the stack's side (93.184.216.34:443 -> 10.240.0.2:40000), as
    /// smoltcp emits it: full checksum, and a timestamp option if `timestamps`.
    pub(crate) fn data_packet(payload: &[u8], timestamps: bool) -> Vec<u8> {
        let src = Ipv4Address::new(93, 184, 216, 34);
        let dst = Ipv4Address::new(10, 240, 0, 2);
        let tcp = TcpRepr {
            src_port: 443,
            dst_port: 40000,
            control: TcpControl::Psh,
            seq_number: TcpSeqNumber(5000),
            ack_number: Some(TcpSeqNumber(1001)),
            window_len: 64000,
            window_scale: None,
            max_seg_size: None,
            sack_permitted: false,
            sack_ranges: [None; 3],
            timestamp: timestamps.then_some(smoltcp::wire::TcpTimestampRepr::new(7, 9)),
            payload,
        };
        ipv4_tcp(src, dst, &tcp)
    }

    /// `tcp` in an IPv4 packet from `src` to `dst`, with full checksums.
    pub(crate) fn ipv4_tcp(src: Ipv4Address, dst: Ipv4Address, tcp: &TcpRepr) -> Vec<u8> {
        let ip = Ipv4Repr {
            src_addr: src,
            dst_addr: dst,
            next_header: IpProtocol::Tcp,
            payload_len: tcp.buffer_len(),
            hop_limit: 64,
        };
        let mut out = vec![0u8; ip.buffer_len() + tcp.buffer_len()];
        let caps = smoltcp::phy::ChecksumCapabilities::default();
        let mut p = Ipv4Packet::new_unchecked(&mut out[..]);
        ip.emit(&mut p, &caps);
        tcp.emit(
            &mut TcpPacket::new_unchecked(p.payload_mut()),
            &IpAddress::Ipv4(src),
            &IpAddress::Ipv4(dst),
            &caps,
        );
        out
    }

    /// Completes a partial checksum as the kernel does for each segment it cuts: sums from
    /// `csum_start` to the end, the field included, and stores the complement.
    fn complete(frame: &mut [u8], hdr: &VnetHdr) {
        let start = usize::from(hdr.csum_start);
        let at = start + usize::from(hdr.csum_offset);
        let sum = !ones_sum(&frame[start..]);
        frame[at..at + 2].copy_from_slice(&sum.to_be_bytes());
    }

    #[test]
    fn a_segment_beyond_the_real_mss_is_marked_for_the_kernel_to_cut() {
        let payload: Vec<u8> = (0..20_000u32).map(|i| (i * 7 + 3) as u8).collect();
        for timestamps in [false, true] {
            let mut packet = data_packet(&payload, timestamps);
            let seg = tcp_segment(&packet).unwrap();
            assert_eq!(seg.payload_len, payload.len());
            assert_eq!(seg.src.port, 443);
            assert_eq!(seg.options_len(), if timestamps { 12 } else { 0 });
            // Segments of the real MSS less the options each carries: 1,460 or 1,448, which with
            // their 40 bytes of IPv4 and TCP header fill a 1,500-byte MTU exactly.
            let size = gso_size(&seg, 1460).unwrap();
            assert_eq!(usize::from(size), 1460 - seg.options_len());
            let full_checksum = packet[20 + 16..20 + 18].to_vec();

            let mut frame = vec![0u8; 14];
            frame[12..14].copy_from_slice(&[0x08, 0x00]);
            let hdr = mark_gso(&mut packet, &seg, size, 14);
            frame.extend_from_slice(&packet);
            assert_eq!(hdr.flags, VnetHdr::F_NEEDS_CSUM);
            assert_eq!(hdr.gso_type, VnetHdr::GSO_TCPV4);
            assert_eq!(hdr.gso_size, size);
            assert_eq!(usize::from(hdr.csum_start), 14 + 20);
            assert_eq!(hdr.csum_offset, 16);
            assert_eq!(usize::from(hdr.hdr_len), 14 + 20 + seg.tcp_header_len);
            assert!(!checksum_ok(&frame), "the field holds a partial sum");
            // Completed over the whole segment it is the checksum smoltcp had computed.
            complete(&mut frame, &hdr);
            assert!(checksum_ok(&frame));
            assert_eq!(&frame[14 + 20 + 16..14 + 20 + 18], &full_checksum[..]);
        }
    }

    #[test]
    fn a_segment_within_the_real_mss_is_left_as_it_is() {
        let packet = data_packet(&[7u8; 1460], false);
        let seg = tcp_segment(&packet).unwrap();
        assert_eq!(gso_size(&seg, 1460), None);
        assert_eq!(gso_size(&seg, 1459), Some(1459));
        let with_ts = data_packet(&[7u8; 1448], true);
        let seg = tcp_segment(&with_ts).unwrap();
        assert_eq!(gso_size(&seg, 1460), None);
        assert_eq!(gso_size(&seg, 12), None, "no room for payload at all");
        // Not TCP, a fragment, a length beyond the buffer: not a segment.
        let mut udp = packet.clone();
        udp[9] = 17;
        assert_eq!(tcp_segment(&udp), None);
        let mut fragment = packet.clone();
        fragment[6] = 0x20; // more fragments
        assert_eq!(tcp_segment(&fragment), None);
        assert_eq!(tcp_segment(&packet[..packet.len() - 1]), None);
    }

    /// Whether a frame's TCP checksum is right, if it parses as TCP/IPv4 at all.
    fn checksum_state(frame: &[u8]) -> Option<bool> {
        let eth = EthernetFrame::new_checked(frame).ok()?;
        let ip = Ipv4Packet::new_checked(eth.payload()).ok()?;
        let tcp = TcpPacket::new_checked(ip.payload()).ok()?;
        Some(tcp.verify_checksum(&ip.src_addr().into(), &ip.dst_addr().into()))
    }

    /// Mangled SYNs (bytes flipped in the headers and options, cut anywhere) never make the
    /// parsers panic, and a raised MSS never breaks a checksum that was right.
    #[test]
    fn mangled_frames_neither_panic_nor_lose_their_checksum() {
        let mut state = 0x9e37_79b9_7f4a_7c15u64;
        let mut next = move || {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            state
        };
        let syn = syn_frame(TcpControl::Syn, false);
        let mut raised = 0;
        for _ in 0..20_000 {
            let mut frame = syn.clone();
            for _ in 0..(next() % 4) {
                // Anywhere in the IP and TCP headers, options included.
                let at = 14 + (next() as usize % (frame.len() - 14));
                frame[at] = next() as u8;
            }
            if next() % 4 == 0 {
                frame.truncate(next() as usize % (frame.len() + 1));
            }
            let was_valid = checksum_state(&frame);
            let _ = classify(&frame);
            let _ = frame.get(14..).map(tcp_segment);
            let _ = VnetHdr::decode(&frame).map(|h| h.gso());
            if raise_mss(&mut frame, 65480, false).is_some() {
                raised += 1;
                if was_valid == Some(true) {
                    assert_eq!(checksum_state(&frame), Some(true), "{frame:02x?}");
                }
            }
        }
        assert!(
            raised > 1000,
            "the mangling left enough SYNs to raise: {raised}"
        );
    }
}
