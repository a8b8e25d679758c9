//! The stream header and status reply exchanged between the two daemons.
//!
//! # Primer
//!
//! Every TCP connection that crosses the vsock link is one stream of its own. The side that opens
//! the stream (enclave-proxy for egress, host-proxy for ingress) first writes a [`Header`]; the
//! accepting side answers with a [`Status`] before either side sends payload. After an `ok` status
//! the stream carries the connection's bytes in both directions as [frames](crate::frame): data,
//! FIN (end of one direction) and RST (abort), so a reset or a dead daemon is never mistaken for
//! a clean close. Version 2 introduced the framing, version 3 its window (CREDIT frames); a peer
//! of another version gets `BadVersion`.
//!
//! ```text
//! Header (20 bytes for IPv4/IPv4, 44 for IPv6/IPv6, all integers big-endian):
//!
//!  0       4   5    6        7        8          8+A      10+A       10+A+B    12+A+B
//!  +-------+---+----+--------+--------+----------+--------+----------+---------+
//!  | "ENET"| v |kind|src fam |dst fam | src addr |src port| dst addr |dst port |
//!  +-------+---+----+--------+--------+----------+--------+----------+---------+
//!    magic   1  1=TCP egress  4 or 6    A = 4 or 16 bytes   B = 4 or 16 bytes
//!               2=TCP ingress
//!               3=UDP egress (datagram frames)
//!               4=DNS over UDP (datagram frames)
//!               5=DNS over TCP (data frames)
//!               6=UDP ingress (datagram frames)
//!
//! Status (4 bytes):
//!
//!  0      1   2      3
//!  +------+---+------+----------+
//!  | 0xE5 | v | code | reserved |   code: 0 ok, 1 refused, 2 unreachable,
//!  +------+---+------+----------+         3 denied by policy, 4 timed out, 5 bad request
//! ```
//!
//! For egress, `src` is the enclave application's own endpoint (for logs) and `dst` is the
//! destination it asked for. For ingress, `src` is the real client's endpoint and `dst` is the
//! published address on the parent with the *enclave* port.
//!
//! Both messages have a fixed size once the first 8 bytes are known, so a reader never buffers
//! more than [`MAX_HEADER_LEN`] bytes from an untrusted peer. Decoding is sans-IO: [`Header::decode`]
//! takes a byte slice and says how many more bytes it needs.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};

/// The four bytes every header starts with.
pub const MAGIC: [u8; 4] = *b"ENET";
/// The protocol version this build speaks.
pub const VERSION: u8 = 3;
/// The first byte of every status reply.
pub const STATUS_MARKER: u8 = 0xE5;
/// Length of the fixed part of a header, which is enough to know its full length.
pub const FIXED_LEN: usize = 8;
/// The largest header there is (two IPv6 endpoints).
pub const MAX_HEADER_LEN: usize = FIXED_LEN + 2 * (16 + 2);
/// Length of a status reply.
pub const STATUS_LEN: usize = 4;

/// What a stream carries.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Kind {
    /// A TCP connection from inside the enclave to the outside.
    TcpEgress,
    /// A TCP connection from an outside client to a port inside the enclave.
    TcpIngress,
    /// A UDP flow from inside the enclave to the outside, as datagram frames: host-proxy sends
    /// them from one UDP socket and sends the replies back.
    UdpEgress,
    /// DNS queries over UDP to the enclave's resolver, as datagram frames: host-proxy answers
    /// them from the parent's resolvers.
    DnsUdp,
    /// A UDP flow from an outside client to a published port inside the enclave, as datagram
    /// frames.
    UdpIngress,
    /// One DNS-over-TCP connection to the enclave's resolver, as DATA frames: host-proxy carries
    /// it to one of the parent's resolvers.
    DnsTcp,
}

impl Kind {
    fn to_byte(self) -> u8 {
        match self {
            Kind::TcpEgress => 1,
            Kind::TcpIngress => 2,
            Kind::UdpEgress => 3,
            Kind::DnsUdp => 4,
            Kind::DnsTcp => 5,
            Kind::UdpIngress => 6,
        }
    }

    fn from_byte(byte: u8) -> Option<Kind> {
        Some(match byte {
            1 => Kind::TcpEgress,
            2 => Kind::TcpIngress,
            3 => Kind::UdpEgress,
            4 => Kind::DnsUdp,
            5 => Kind::DnsTcp,
            6 => Kind::UdpIngress,
            _ => return None,
        })
    }

    /// Whether the stream carries datagrams (DATAGRAM frames) rather than a byte stream.
    pub fn datagrams(self) -> bool {
        matches!(self, Kind::UdpEgress | Kind::DnsUdp | Kind::UdpIngress)
    }
}

/// The opening message of a stream.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Header {
    /// What the stream carries.
    pub kind: Kind,
    /// For egress, the enclave application; for ingress, the real client.
    pub src: SocketAddr,
    /// For egress, the destination; for ingress, the parent address and the enclave port.
    pub dst: SocketAddr,
}

/// Why bytes are not a valid header or status.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum DecodeError {
    /// More bytes are needed; the value is the total length needed so far.
    #[error("incomplete: need {0} bytes")]
    Incomplete(usize),
    /// The stream did not start with the magic: the peer does not speak this protocol.
    #[error("bad magic {0:02x?}: peer does not speak the enclave-net protocol")]
    BadMagic([u8; 4]),
    /// The peer speaks another version of this protocol.
    #[error("unsupported protocol version {0} (this build speaks {VERSION})")]
    BadVersion(u8),
    /// The kind byte names nothing this build carries.
    #[error("unsupported stream kind {0}")]
    BadKind(u8),
    /// An address family byte was not 4 or 6.
    #[error("bad address family {0}")]
    BadFamily(u8),
    /// A port was zero.
    #[error("port 0 is not a valid {0} port")]
    ZeroPort(&'static str),
    /// The status marker byte was wrong.
    #[error("bad status marker {0:#04x}")]
    BadStatusMarker(u8),
    /// The status code names no known status.
    #[error("unknown status code {0}")]
    BadStatusCode(u8),
    /// The reserved byte of a status was not zero.
    #[error("reserved status byte is {0:#04x}, not 0")]
    BadStatusReserved(u8),
}

fn family_len(family: u8) -> Result<usize, DecodeError> {
    match family {
        4 => Ok(4),
        6 => Ok(16),
        other => Err(DecodeError::BadFamily(other)),
    }
}

fn family_of(addr: &SocketAddr) -> u8 {
    match addr {
        SocketAddr::V4(_) => 4,
        SocketAddr::V6(_) => 6,
    }
}

fn put_endpoint(out: &mut [u8], addr: &SocketAddr) -> usize {
    let n = match addr.ip() {
        IpAddr::V4(ip) => {
            out[..4].copy_from_slice(&ip.octets());
            4
        }
        IpAddr::V6(ip) => {
            out[..16].copy_from_slice(&ip.octets());
            16
        }
    };
    out[n..n + 2].copy_from_slice(&addr.port().to_be_bytes());
    n + 2
}

fn get_endpoint(buf: &[u8], family: u8, what: &'static str) -> Result<SocketAddr, DecodeError> {
    let (ip, n) = match family {
        4 => {
            let mut o = [0u8; 4];
            o.copy_from_slice(&buf[..4]);
            (IpAddr::V4(Ipv4Addr::from(o)), 4)
        }
        _ => {
            let mut o = [0u8; 16];
            o.copy_from_slice(&buf[..16]);
            (IpAddr::V6(Ipv6Addr::from(o)), 16)
        }
    };
    let port = u16::from_be_bytes([buf[n], buf[n + 1]]);
    if port == 0 {
        return Err(DecodeError::ZeroPort(what));
    }
    Ok(SocketAddr::new(ip, port))
}

impl Header {
    /// The encoded length of this header.
    pub fn encoded_len(&self) -> usize {
        FIXED_LEN + endpoint_len(&self.src) + endpoint_len(&self.dst)
    }

    /// Encodes the header into a fixed buffer; returns the buffer and the used length.
    pub fn encode(&self) -> ([u8; MAX_HEADER_LEN], usize) {
        let mut out = [0u8; MAX_HEADER_LEN];
        out[..4].copy_from_slice(&MAGIC);
        out[4] = VERSION;
        out[5] = self.kind.to_byte();
        out[6] = family_of(&self.src);
        out[7] = family_of(&self.dst);
        let mut at = FIXED_LEN;
        at += put_endpoint(&mut out[at..], &self.src);
        at += put_endpoint(&mut out[at..], &self.dst);
        (out, at)
    }

    /// The total header length implied by its first [`FIXED_LEN`] bytes, after checking magic,
    /// version, kind and families.
    pub fn total_len(fixed: &[u8]) -> Result<usize, DecodeError> {
        if fixed.len() < FIXED_LEN {
            return Err(DecodeError::Incomplete(FIXED_LEN));
        }
        let magic = [fixed[0], fixed[1], fixed[2], fixed[3]];
        if magic != MAGIC {
            return Err(DecodeError::BadMagic(magic));
        }
        if fixed[4] != VERSION {
            return Err(DecodeError::BadVersion(fixed[4]));
        }
        if Kind::from_byte(fixed[5]).is_none() {
            return Err(DecodeError::BadKind(fixed[5]));
        }
        Ok(FIXED_LEN + family_len(fixed[6])? + 2 + family_len(fixed[7])? + 2)
    }

    /// Decodes a header from the start of `buf`; returns it and the bytes it used.
    pub fn decode(buf: &[u8]) -> Result<(Header, usize), DecodeError> {
        let total = Self::total_len(buf)?;
        if buf.len() < total {
            return Err(DecodeError::Incomplete(total));
        }
        let kind = Kind::from_byte(buf[5]).ok_or(DecodeError::BadKind(buf[5]))?;
        let src_at = FIXED_LEN;
        let dst_at = src_at + family_len(buf[6])? + 2;
        let src = get_endpoint(&buf[src_at..], buf[6], "source")?;
        let dst = get_endpoint(&buf[dst_at..], buf[7], "destination")?;
        Ok((Header { kind, src, dst }, total))
    }
}

fn endpoint_len(addr: &SocketAddr) -> usize {
    match addr {
        SocketAddr::V4(_) => 4 + 2,
        SocketAddr::V6(_) => 16 + 2,
    }
}

/// The accepting side's answer to a header.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Status {
    /// The connection is up; payload follows.
    Ok,
    /// The destination actively refused the connection (a TCP RST).
    Refused,
    /// The destination could not be reached (no route, host down).
    Unreachable,
    /// Policy forbids this connection (egress policy on the parent, `--expose` in the enclave).
    Denied,
    /// The destination did not answer in time.
    TimedOut,
    /// The header was malformed or named something the receiver does not serve.
    BadRequest,
}

impl Status {
    /// All statuses, in code order.
    pub const ALL: [Status; 6] = [
        Status::Ok,
        Status::Refused,
        Status::Unreachable,
        Status::Denied,
        Status::TimedOut,
        Status::BadRequest,
    ];

    fn code(self) -> u8 {
        match self {
            Status::Ok => 0,
            Status::Refused => 1,
            Status::Unreachable => 2,
            Status::Denied => 3,
            Status::TimedOut => 4,
            Status::BadRequest => 5,
        }
    }

    /// Encodes the status reply.
    pub fn encode(self) -> [u8; STATUS_LEN] {
        [STATUS_MARKER, VERSION, self.code(), 0]
    }

    /// Decodes a status reply.
    pub fn decode(buf: &[u8]) -> Result<Status, DecodeError> {
        if buf.len() < STATUS_LEN {
            return Err(DecodeError::Incomplete(STATUS_LEN));
        }
        if buf[0] != STATUS_MARKER {
            return Err(DecodeError::BadStatusMarker(buf[0]));
        }
        if buf[1] != VERSION {
            return Err(DecodeError::BadVersion(buf[1]));
        }
        if buf[3] != 0 {
            return Err(DecodeError::BadStatusReserved(buf[3]));
        }
        Status::ALL
            .into_iter()
            .find(|s| s.code() == buf[2])
            .ok_or(DecodeError::BadStatusCode(buf[2]))
    }

    /// A short name for logs.
    pub fn as_str(self) -> &'static str {
        match self {
            Status::Ok => "ok",
            Status::Refused => "refused",
            Status::Unreachable => "unreachable",
            Status::Denied => "denied",
            Status::TimedOut => "timed out",
            Status::BadRequest => "bad request",
        }
    }
}

impl std::fmt::Display for Status {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn v4() -> Header {
        Header {
            kind: Kind::TcpEgress,
            src: "10.240.0.2:40000".parse().unwrap(),
            dst: "93.184.216.34:443".parse().unwrap(),
        }
    }

    #[test]
    fn ipv4_layout_is_stable() {
        let (buf, len) = v4().encode();
        assert_eq!(len, 20);
        assert_eq!(
            &buf[..len],
            &[
                b'E', b'N', b'E', b'T', 3, 1, 4, 4, 10, 240, 0, 2, 0x9c, 0x40, 93, 184, 216, 34, 1,
                0xbb
            ]
        );
        assert_eq!(v4().encoded_len(), 20);
    }

    #[test]
    fn mixed_families_round_trip() {
        let h = Header {
            kind: Kind::TcpIngress,
            src: "[2001:db8::1]:5555".parse().unwrap(),
            dst: "0.0.0.0:8080".parse().unwrap(),
        };
        let (buf, len) = h.encode();
        assert_eq!(len, 8 + 18 + 6);
        assert_eq!(Header::decode(&buf[..len]), Ok((h, len)));
    }

    #[test]
    fn truncated_header_asks_for_more() {
        let (buf, len) = v4().encode();
        for cut in 0..len {
            assert!(
                matches!(Header::decode(&buf[..cut]), Err(DecodeError::Incomplete(_))),
                "cut at {cut}"
            );
        }
    }

    #[test]
    fn wrong_magic_version_kind_family_and_port_are_named() {
        let (mut buf, len) = v4().encode();
        buf[4] = 9;
        assert_eq!(Header::decode(&buf[..len]), Err(DecodeError::BadVersion(9)));
        let (mut buf, _) = v4().encode();
        buf[0] = b'G';
        assert!(matches!(
            Header::decode(&buf[..len]),
            Err(DecodeError::BadMagic(_))
        ));
        let (mut buf, _) = v4().encode();
        buf[5] = 7;
        assert_eq!(Header::decode(&buf[..len]), Err(DecodeError::BadKind(7)));
        let (mut buf, _) = v4().encode();
        buf[7] = 5;
        assert_eq!(Header::decode(&buf[..len]), Err(DecodeError::BadFamily(5)));
        let (mut buf, _) = v4().encode();
        buf[18] = 0;
        buf[19] = 0;
        assert_eq!(
            Header::decode(&buf[..len]),
            Err(DecodeError::ZeroPort("destination"))
        );
    }

    #[test]
    fn every_status_round_trips_and_garbage_is_rejected() {
        for s in Status::ALL {
            assert_eq!(Status::decode(&s.encode()), Ok(s));
        }
        assert_eq!(
            Status::decode(&[STATUS_MARKER, VERSION, 77, 0]),
            Err(DecodeError::BadStatusCode(77))
        );
        assert_eq!(
            Status::decode(b"HTTP"),
            Err(DecodeError::BadStatusMarker(b'H'))
        );
        assert_eq!(Status::decode(&[0xE5]), Err(DecodeError::Incomplete(4)));
        assert_eq!(
            Status::decode(&[STATUS_MARKER, VERSION, 0, 1]),
            Err(DecodeError::BadStatusReserved(1))
        );
    }

    fn arb_addr() -> impl Strategy<Value = SocketAddr> {
        prop_oneof![
            (any::<[u8; 4]>(), 1..=u16::MAX)
                .prop_map(|(o, p)| SocketAddr::new(IpAddr::V4(Ipv4Addr::from(o)), p)),
            (any::<[u8; 16]>(), 1..=u16::MAX)
                .prop_map(|(o, p)| SocketAddr::new(IpAddr::V6(Ipv6Addr::from(o)), p)),
        ]
    }

    proptest! {
        #[test]
        fn arbitrary_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..64)) {
            if let Ok((h, used)) = Header::decode(&bytes) {
                prop_assert!(used <= MAX_HEADER_LEN);
                prop_assert_eq!(used, h.encoded_len());
            }
            let _ = Status::decode(&bytes);
        }

        #[test]
        fn headers_with_valid_prefix_never_panic(
            fams in (prop_oneof![Just(4u8), Just(6u8), any::<u8>()], prop_oneof![Just(4u8), Just(6u8), any::<u8>()]),
            kind in 0u8..8,
            rest in proptest::collection::vec(any::<u8>(), 0..48),
        ) {
            let mut bytes = vec![b'E', b'N', b'E', b'T', VERSION, kind, fams.0, fams.1];
            bytes.extend_from_slice(&rest);
            if let Ok((_, used)) = Header::decode(&bytes) {
                prop_assert!(used <= bytes.len());
            }
        }

        #[test]
        fn encode_then_decode_round_trips(src in arb_addr(), dst in arb_addr(), kind in 0usize..6) {
            let kind = [Kind::TcpEgress, Kind::TcpIngress, Kind::UdpEgress, Kind::DnsUdp, Kind::DnsTcp, Kind::UdpIngress][kind];
            let h = Header { kind, src, dst };
            let (buf, len) = h.encode();
            prop_assert_eq!(len, h.encoded_len());
            prop_assert_eq!(Header::decode(&buf[..len]), Ok((h, len)));
        }
    }
}
