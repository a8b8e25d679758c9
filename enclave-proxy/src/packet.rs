//! Sans-IO packet work on raw Ethernet frames from the TAP: spotting the SYNs that open new
//! egress connections, and writing the ICMP errors that make a failed egress `connect()` fail.
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
}
