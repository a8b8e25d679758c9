//! The fuzz targets' input formats, and their seed corpus.
//!
//! `header` and `status` take raw bytes as the other daemon would send them. `frame` takes a short
//! prefix that says how to cut the rest into pieces, then the bytes themselves ([`FrameInput`]).
//! The seeds are made here, by the real encoders, so they stay current when the wire changes:
//! `corpus-gen check` fails when a committed seed differs from what this file makes.

use common::frame::{self, Chunk, FIN, MAX_DATA, RST};
use common::wire::{Header, Kind, Status, MAGIC, VERSION};

/// What the `frame` target does with one input.
///
/// ```text
///  byte 0      bits 0-1  how the round-tripped payload ends: 1 FIN, 2 RST, 0 or 3 no end
///              bit 2     pad the round-tripped payload to the length in bytes 1-2
///              bit 3     unused
///              bits 4-7  k, the number of piece sizes that follow (0: one piece)
///  bytes 1-2   pad length, big-endian
///  2k bytes    piece sizes, big-endian u16 each (0 counts as 1), used in turn and cycled
///  the rest    the body
/// ```
///
/// The body is fed to a `Deframer` in those pieces as if it came from the link, and it is also
/// the payload of the round trip (encode, then decode in the same pieces). Padding repeats the
/// body, so a short input can still round-trip a payload of several DATA frames. Bytes missing
/// from the prefix read as zero.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FrameInput<'a> {
    /// How the round-tripped payload ends.
    pub end: Option<Chunk>,
    /// The length the round-tripped payload is padded to, if it is.
    pub pad_to: Option<u16>,
    /// Piece sizes, each at least 1, used in turn and cycled; empty means one piece.
    pub splits: Vec<usize>,
    /// The bytes to decode, and the payload to round-trip.
    pub body: &'a [u8],
}

const END_MASK: u8 = 0b11;
const PAD_BIT: u8 = 0b100;

impl<'a> FrameInput<'a> {
    /// Reads an input; every byte string is a valid one.
    pub fn parse(data: &'a [u8]) -> FrameInput<'a> {
        let at = |i: usize| data.get(i).copied().unwrap_or(0);
        let control = at(0);
        let end = match control & END_MASK {
            1 => Some(Chunk::Fin),
            2 => Some(Chunk::Rst),
            _ => None,
        };
        let pad = u16::from_be_bytes([at(1), at(2)]);
        let k = usize::from(control >> 4);
        let splits = (0..k)
            .map(|i| usize::from(u16::from_be_bytes([at(3 + 2 * i), at(4 + 2 * i)])).max(1))
            .collect();
        let prefix = 3 + 2 * k;
        FrameInput {
            end,
            pad_to: (control & PAD_BIT != 0).then_some(pad),
            splits,
            body: data.get(prefix..).unwrap_or(&[]),
        }
    }

    /// Writes an input that [`FrameInput::parse`] reads back (at most 15 piece sizes, each
    /// 1 to 65535).
    pub fn encode(&self) -> Vec<u8> {
        assert!(self.splits.len() < 16, "at most 15 piece sizes");
        let end = match self.end {
            Some(Chunk::Fin) => 1,
            Some(Chunk::Rst) => 2,
            _ => 0,
        };
        let pad = if self.pad_to.is_some() { PAD_BIT } else { 0 };
        let mut out = vec![(self.splits.len() as u8) << 4 | pad | end];
        out.extend_from_slice(&self.pad_to.unwrap_or(0).to_be_bytes());
        for &s in &self.splits {
            let s = u16::try_from(s).expect("piece size fits in 16 bits");
            assert!(s > 0, "piece size 0");
            out.extend_from_slice(&s.to_be_bytes());
        }
        out.extend_from_slice(self.body);
        out
    }

    /// The payload the round trip encodes: the body, repeated up to the pad length if padded.
    pub fn round_trip_payload(&self) -> Vec<u8> {
        let len = match self.pad_to {
            Some(p) => self.body.len().max(usize::from(p)),
            None => self.body.len(),
        };
        if self.body.is_empty() {
            return vec![0; len];
        }
        // Doubling copies, not a byte loop: the fuzz build instruments every comparison.
        let mut out = Vec::with_capacity(len);
        out.extend_from_slice(&self.body[..len.min(self.body.len())]);
        while out.len() < len {
            let n = out.len().min(len - out.len());
            out.extend_from_within(..n);
        }
        out
    }
}

/// One seed file.
#[derive(Debug, Clone)]
pub struct Seed {
    /// The fuzz target, which is also the corpus directory.
    pub target: &'static str,
    /// The file name.
    pub name: &'static str,
    /// Its contents.
    pub bytes: Vec<u8>,
}

fn header(kind: Kind, src: &str, dst: &str) -> Vec<u8> {
    let h = Header {
        kind,
        src: src.parse().expect("source address"),
        dst: dst.parse().expect("destination address"),
    };
    let (buf, len) = h.encode();
    buf[..len].to_vec()
}

fn frames(splits: &[usize], end: Option<Chunk>, body: &[u8]) -> Vec<u8> {
    FrameInput {
        end,
        pad_to: None,
        splits: splits.to_vec(),
        body,
    }
    .encode()
}

/// Every seed of every target.
pub fn seeds() -> Vec<Seed> {
    let mut out = Vec::new();
    let mut add = |target, name, bytes| {
        out.push(Seed {
            target,
            name,
            bytes,
        })
    };

    // header: what an opening side really writes, then each way a header is refused.
    let v4_egress = header(Kind::TcpEgress, "10.240.0.2:40000", "93.184.216.34:443");
    add("header", "ipv4-egress", v4_egress.clone());
    add(
        "header",
        "ipv4-ingress",
        header(Kind::TcpIngress, "198.51.100.7:51000", "10.0.0.1:8080"),
    );
    add(
        "header",
        "ipv6-egress",
        header(Kind::TcpEgress, "[fd00::2]:40000", "[2001:db8::1]:443"),
    );
    add(
        "header",
        "ipv6-ipv4-ingress",
        header(
            Kind::TcpIngress,
            "[102:304:506:708:90a:b0c:d0e:f10]:5000",
            "0.0.0.0:8080",
        ),
    );
    add(
        "header",
        "ipv4-mapped-egress",
        header(
            Kind::TcpEgress,
            "10.240.0.2:40001",
            "[::ffff:203.0.113.7]:80",
        ),
    );
    add("header", "truncated", v4_egress[..11].to_vec());
    let mut with_payload = v4_egress.clone();
    with_payload.extend_from_slice(&frame::encode_all(b"GET / HTTP/1.1\r\n\r\n", None));
    add("header", "followed-by-frames", with_payload);
    // A version-1 peer: the same header as it was sent before framing. Must be BadVersion(1).
    let mut v1 = v4_egress.clone();
    v1[4] = 1;
    add("header", "v1-ipv4-egress", v1);
    let mut future = v4_egress.clone();
    future[4] = VERSION + 1;
    add("header", "next-version", future);
    add(
        "header",
        "http-request",
        b"GET / HTTP/1.1\r\nHost: x\r\n\r\n".to_vec(),
    );
    let mut reserved = v4_egress.clone();
    reserved[5] = 7;
    add("header", "kind-reserved", reserved);
    add(
        "header",
        "udp-egress",
        header(Kind::UdpEgress, "10.240.0.2:40000", "169.254.169.123:123"),
    );
    let mut family = v4_egress.clone();
    family[7] = 5;
    add("header", "bad-family", family);
    let mut port0 = v4_egress.clone();
    let n = port0.len();
    port0[n - 2..].fill(0);
    add("header", "zero-port", port0);
    let mut fixed_only = MAGIC.to_vec();
    fixed_only.extend_from_slice(&[VERSION, 2, 6, 6]);
    add("header", "fixed-part-only", fixed_only);

    // status: every reply there is, and each way one is refused.
    for (s, name) in Status::ALL.into_iter().zip([
        "ok",
        "refused",
        "unreachable",
        "denied",
        "timed-out",
        "bad-request",
    ]) {
        add("status", name, s.encode().to_vec());
    }
    let mut v1 = Status::Refused.encode();
    v1[1] = 1;
    add("status", "v1-refused", v1.to_vec());
    let mut code = Status::Ok.encode();
    code[2] = 77;
    add("status", "unknown-code", code.to_vec());
    add("status", "bad-marker", b"HTTP".to_vec());
    add("status", "truncated", Status::Ok.encode()[..2].to_vec());
    let mut reserved = Status::Denied.encode();
    reserved[3] = 0xff;
    add("status", "reserved-set", reserved.to_vec());

    // frame: streams as the splice writes them, in several cuts, then each malformed frame.
    let request = b"GET / HTTP/1.1\r\nHost: example.com\r\n\r\n";
    let fin = Some(Chunk::Fin);
    let rst = Some(Chunk::Rst);
    add(
        "frame",
        "data-fin",
        frames(&[], fin, &frame::encode_all(request, fin)),
    );
    add(
        "frame",
        "data-fin-bytewise",
        frames(&[1], fin, &frame::encode_all(request, fin)),
    );
    let kib: Vec<u8> = (0..1024u32).map(|i| (i * 7) as u8).collect();
    add(
        "frame",
        "data-rst-uneven",
        frames(&[1, 3, 7, 500], rst, &frame::encode_all(&kib, rst)),
    );
    add("frame", "fin-only", frames(&[], fin, &FIN));
    add("frame", "rst-only", frames(&[2], rst, &RST));
    let mut small = Vec::new();
    for word in [&b"abc"[..], b"de", b"f", b"ghij"] {
        small.extend_from_slice(&frame::data_header(word.len()));
        small.extend_from_slice(word);
    }
    let mut small_fin = small.clone();
    small_fin.extend_from_slice(&FIN);
    add(
        "frame",
        "small-frames-fin",
        frames(&[2, 5], fin, &small_fin),
    );
    add("frame", "open-no-end", frames(&[4], None, &small));
    // CREDITs for the other direction, between DATA frames and after the FIN.
    let mut credited = frame::credit(frame::CREDIT_EVERY).to_vec();
    credited.extend_from_slice(&small);
    credited.extend_from_slice(&frame::credit(1));
    credited.extend_from_slice(&FIN);
    credited.extend_from_slice(&frame::credit(frame::WINDOW));
    add("frame", "credits-around-fin", frames(&[3], fin, &credited));
    // More small frames than the window holds: fine for a reader that returns credit.
    let mut many = Vec::new();
    for i in 0..=frame::WINDOW_FRAMES {
        many.extend_from_slice(&frame::encode_all(&[i as u8], None));
    }
    add("frame", "past-the-window-frames", frames(&[7], None, &many));
    add("frame", "credit-of-none", frames(&[], None, &[5, 0, 0, 0]));
    add(
        "frame",
        "credit-too-large",
        frames(&[], None, &[5, 0x10, 0, 1]),
    );
    // datagram: DNS streams as the daemons write them.
    let mut datagrams = Vec::new();
    for d in [&b"\x12\x34query"[..], b"", &[7u8; 600][..]] {
        frame::encode_datagram(&mut datagrams, d);
    }
    datagrams.extend_from_slice(&frame::credit(frame::CREDIT_EVERY));
    add(
        "datagram",
        "three-then-credit",
        frames(&[5], None, &datagrams),
    );
    let mut big = Vec::new();
    frame::encode_datagram(&mut big, &vec![0x5a; MAX_DATA + 10]);
    big.extend_from_slice(&FIN);
    add("datagram", "two-pieces-fin", frames(&[1000, 3], fin, &big));
    add(
        "datagram",
        "more-then-empty",
        frames(&[], None, &[4, 1, 0, 0]),
    );
    add(
        "datagram",
        "data-frame",
        frames(&[], None, &[1, 0, 0, 1, 0]),
    );
    // dns: a query as a stub resolver sends it, one with EDNS, a response, a cut question.
    let mut q = vec![0xab, 0xcd, 0x01, 0x00, 0, 1, 0, 0, 0, 0, 0, 0];
    q.extend_from_slice(b"\x03web\x07enclave\x04test\x00\x00\x01\x00\x01");
    add("dns", "query-a", q.clone());
    let mut edns = q.clone();
    edns[11] = 1;
    edns.extend_from_slice(&[0, 0, 41, 0x10, 0, 0, 0, 0, 0, 0, 0]);
    add("dns", "query-edns", edns);
    let mut response = q.clone();
    response[2] |= 0x80;
    add("dns", "response", response);
    add("dns", "cut-question", q[..20].to_vec());
    let mut cut_header = small.clone();
    cut_header.extend_from_slice(&frame::data_header(9)[..2]);
    add("frame", "cut-in-header", frames(&[3], None, &cut_header));
    let mut cut_max = frame::data_header(MAX_DATA).to_vec();
    cut_max.extend_from_slice(&kib[..100]);
    add("frame", "cut-in-max-data", frames(&[], None, &cut_max));
    add(
        "frame",
        "data-too-long",
        frames(&[], None, &[1, 0, 0x7f, 0xfd, 0]),
    );
    add("frame", "data-empty", frames(&[], None, &[1, 0, 0, 0]));
    let mut after_fin = frame::encode_all(b"x", fin);
    after_fin.extend_from_slice(&frame::encode_all(b"y", None));
    add("frame", "data-after-fin", frames(&[1], fin, &after_fin));
    let mut after_rst = RST.to_vec();
    after_rst.extend_from_slice(&FIN);
    add("frame", "fin-after-rst", frames(&[], rst, &after_rst));
    add(
        "frame",
        "datagram-type-reserved",
        frames(&[], None, &[4, 1, 0, 3, b'a', b'b', b'c']),
    );
    add("frame", "flags-on-rst", frames(&[], rst, &[3, 8, 0, 0]));
    add(
        "frame",
        "fin-with-length",
        frames(&[], fin, &[2, 0, 0, 1, 0]),
    );
    let mut error_then_fin = vec![9, 0, 0, 0];
    error_then_fin.extend_from_slice(&FIN);
    add(
        "frame",
        "error-then-fin",
        frames(&[4], fin, &error_then_fin),
    );
    // Round trips of more than one DATA frame, from short inputs.
    add(
        "frame",
        "pad-one-past-max",
        FrameInput {
            end: fin,
            pad_to: Some((MAX_DATA + 1) as u16),
            splits: vec![4096, 1],
            body: request,
        }
        .encode(),
    );
    add(
        "frame",
        "pad-two-full-frames",
        FrameInput {
            end: rst,
            pad_to: Some((2 * MAX_DATA) as u16),
            splits: vec![],
            body: &kib,
        }
        .encode(),
    );
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn frame_input_round_trips() {
        let input = FrameInput {
            end: Some(Chunk::Rst),
            pad_to: Some(40_000),
            splits: vec![1, 65_535, 7],
            body: b"abc",
        };
        assert_eq!(FrameInput::parse(&input.encode()), input);
        let payload = input.round_trip_payload();
        assert_eq!(payload.len(), 40_000);
        assert!(payload.chunks(3).all(|c| c == &b"abc"[..c.len()]));
    }

    #[test]
    fn short_inputs_read_as_zero() {
        let input = FrameInput::parse(&[0x20, 0]);
        assert_eq!(input.splits, vec![1, 1]);
        assert!(input.body.is_empty());
        assert_eq!(input.end, None);
    }
}
