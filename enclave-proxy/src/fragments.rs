//! IPv4 fragmentation for the datagram paths. A UDP datagram larger than the TAP's MTU reaches
//! the stack as fragments, which [`Reassembly`] joins; one going back into the enclave larger
//! than the MTU leaves as fragments, which [`fragment`] cuts. The enclave kernel does the same on
//! its side, so a 65,000-byte datagram crosses a 1,500-byte TAP intact both ways.
//!
//! Reassembly holds at most [`MAX_PENDING`] datagrams at once, each for at most
//! [`REASSEMBLY_TIMEOUT`], in at most [`MAX_FRAGMENTS`] pieces; fragments that overlap, or
//! reach past 65,535 bytes, end their datagram (as Linux does since 4.19). What is dropped is counted by the caller, never waited for.

use std::collections::HashMap;
use std::net::Ipv4Addr;
use std::time::Duration;

use smoltcp::wire::{IpProtocol, Ipv4Packet};
use tokio::time::Instant;

/// Datagrams being reassembled at once. The enclave kernel sends a datagram's fragments back to
/// back, so a few are in progress at a time; past this the oldest is dropped.
pub const MAX_PENDING: usize = 64;
/// How long the fragments of one datagram may take to arrive. They come from the kernel on the
/// other end of the TAP, within microseconds of each other; Linux waits 30 s for a network.
pub const REASSEMBLY_TIMEOUT: Duration = Duration::from_secs(2);
/// Fragments one datagram may arrive in. The smallest MTU enclave-proxy allows (576) cuts the
/// largest datagram into 119; a bound keeps each fragment's checks short.
pub const MAX_FRAGMENTS: usize = 128;
/// The largest IPv4 datagram: what its 16-bit total length allows.
const MAX_IP_LEN: usize = 65_535;
/// An IPv4 header without options.
pub const IPV4_HEADER: usize = 20;

/// Which datagram a fragment belongs to (RFC 791: source, destination, protocol and
/// identification).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
struct Key {
    src: Ipv4Addr,
    dst: Ipv4Addr,
    protocol: u8,
    ident: u16,
}

/// A datagram in progress: the pieces that have arrived, kept as they came (joined only once
/// complete, so a lone fragment far into a datagram costs its own bytes, not the 64 KiB before
/// it).
#[derive(Debug)]
struct Partial {
    started: Instant,
    /// `(start, bytes)`, never overlapping.
    pieces: Vec<(usize, Vec<u8>)>,
    /// The payload's length, once the last fragment has come.
    len: Option<usize>,
}

impl Partial {
    fn received(&self) -> usize {
        self.pieces.iter().map(|(_, b)| b.len()).sum()
    }

    fn ranges(&self) -> impl Iterator<Item = (usize, usize)> + '_ {
        self.pieces.iter().map(|(s, b)| (*s, s + b.len()))
    }
}

/// A datagram put back together: its addresses, protocol and whole payload.
#[derive(Debug, PartialEq, Eq)]
pub struct Whole {
    /// The sender.
    pub src: Ipv4Addr,
    /// The destination.
    pub dst: Ipv4Addr,
    /// What the payload is (UDP, for the fragments the stack hands over).
    pub protocol: IpProtocol,
    /// The datagram's payload, every fragment's part in place.
    pub payload: Vec<u8>,
}

/// What became of a fragment.
#[derive(Debug, PartialEq, Eq)]
pub enum Outcome {
    /// It completed a datagram.
    Whole(Whole),
    /// Kept: the datagram is not complete yet.
    Kept,
    /// Dropped, with whatever of its datagram had arrived (overlapping, too long, or malformed),
    /// or it pushed an older datagram out.
    Dropped(&'static str),
}

/// IPv4 datagrams being put back together.
#[derive(Debug, Default)]
pub struct Reassembly {
    pending: HashMap<Key, Partial>,
}

impl Reassembly {
    /// Datagrams in progress.
    pub fn pending(&self) -> usize {
        self.pending.len()
    }

    /// Takes one fragment (an IPv4 packet with MF set or a non-zero offset).
    pub fn push(&mut self, packet: &Ipv4Packet<&[u8]>, now: Instant) -> Outcome {
        self.pending
            .retain(|_, p| now.duration_since(p.started) < REASSEMBLY_TIMEOUT);
        let key = Key {
            src: packet.src_addr(),
            dst: packet.dst_addr(),
            protocol: packet.next_header().into(),
            ident: packet.ident(),
        };
        let data = packet.payload();
        let start = usize::from(packet.frag_offset());
        let end = start + data.len();
        let last = !packet.more_frags();
        // Every fragment but the last carries a multiple of 8 bytes (RFC 791).
        if end > MAX_IP_LEN - usize::from(packet.header_len())
            || (!last && !data.len().is_multiple_of(8))
        {
            self.pending.remove(&key);
            return Outcome::Dropped("fragment malformed or past 65,535 bytes");
        }
        let mut evicted = false;
        if !self.pending.contains_key(&key) && self.pending.len() >= MAX_PENDING {
            if let Some(oldest) = self
                .pending
                .iter()
                .min_by_key(|(_, p)| p.started)
                .map(|(k, _)| *k)
            {
                self.pending.remove(&oldest);
                evicted = true;
            }
        }
        let partial = self.pending.entry(key).or_insert_with(|| Partial {
            started: now,
            pieces: Vec::new(),
            len: None,
        });
        let overlaps = partial.ranges().any(|(s, e)| start < e && s < end);
        let beyond = partial
            .len
            .is_some_and(|len| end > len || last && end != len);
        let short = last && partial.ranges().any(|(_, e)| e > end);
        if overlaps || beyond || short || partial.pieces.len() == MAX_FRAGMENTS {
            self.pending.remove(&key);
            return Outcome::Dropped("fragments overlap, disagree on the length or are too many");
        }
        if last {
            partial.len = Some(end);
        }
        partial.pieces.push((start, data.to_vec()));
        if partial.len != Some(partial.received()) {
            return if evicted {
                Outcome::Dropped("too many datagrams in reassembly: the oldest was dropped")
            } else {
                Outcome::Kept
            };
        }
        let Some(partial) = self.pending.remove(&key) else {
            return Outcome::Kept;
        };
        // Complete: the pieces cover 0..len without overlap.
        let mut payload = vec![0u8; partial.len.unwrap_or(0)];
        for (start, bytes) in &partial.pieces {
            payload[*start..start + bytes.len()].copy_from_slice(bytes);
        }
        Outcome::Whole(Whole {
            src: key.src,
            dst: key.dst,
            protocol: key.protocol.into(),
            payload,
        })
    }
}

/// Cuts an IPv4 packet into packets of at most `mtu` bytes and hands each, after `link` (its
/// Ethernet header, or nothing), to `emit`. `packet` starts with an [`IPV4_HEADER`]-byte header
/// whose identification is set and DF clear. A packet that fits is emitted as it is.
pub fn fragment(link: &[u8], packet: &[u8], mtu: usize, mut emit: impl FnMut(&[u8])) {
    let (header, payload) = packet.split_at(IPV4_HEADER);
    // Each fragment but the last carries a multiple of 8 bytes.
    let step = (mtu - IPV4_HEADER) & !7;
    let mut buf = vec![0u8; link.len() + IPV4_HEADER + step.min(payload.len())];
    buf[..link.len()].copy_from_slice(link);
    let mut at = 0;
    loop {
        let n = (payload.len() - at).min(step);
        let more = at + n < payload.len();
        let frame = &mut buf[..link.len() + IPV4_HEADER + n];
        let ip = &mut frame[link.len()..];
        ip[..IPV4_HEADER].copy_from_slice(header);
        ip[IPV4_HEADER..].copy_from_slice(&payload[at..at + n]);
        let mut ip = Ipv4Packet::new_unchecked(ip);
        // Both within 65,535: the caller's packet had a valid length.
        ip.set_total_len((IPV4_HEADER + n) as u16);
        ip.set_more_frags(more);
        ip.set_frag_offset(at as u16);
        ip.fill_checksum();
        emit(frame);
        at += n;
        if !more {
            return;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use smoltcp::phy::ChecksumCapabilities;
    use smoltcp::wire::Ipv4Repr;

    const SRC: Ipv4Addr = Ipv4Addr::new(10, 240, 0, 2);
    const DST: Ipv4Addr = Ipv4Addr::new(10, 0, 0, 9);

    fn packet(ident: u16, payload: &[u8]) -> Vec<u8> {
        let len = payload.len();
        let mut h = vec![0u8; IPV4_HEADER + len];
        h[IPV4_HEADER..].copy_from_slice(payload);
        let repr = Ipv4Repr {
            src_addr: SRC,
            dst_addr: DST,
            next_header: IpProtocol::Udp,
            payload_len: len,
            hop_limit: 64,
        };
        let mut p = Ipv4Packet::new_unchecked(&mut h[..]);
        repr.emit(&mut p, &ChecksumCapabilities::default());
        p.set_dont_frag(false);
        p.set_ident(ident);
        h
    }

    fn cut(ident: u16, payload: &[u8], mtu: usize) -> Vec<Vec<u8>> {
        let mut out = Vec::new();
        fragment(&[], &packet(ident, payload), mtu, |p| out.push(p.to_vec()));
        out
    }

    fn push(r: &mut Reassembly, packet: &[u8], now: Instant) -> Outcome {
        r.push(&Ipv4Packet::new_checked(packet).unwrap(), now)
    }

    fn payload(len: usize) -> Vec<u8> {
        (0..len).map(|i| (i * 7 + i / 251) as u8).collect()
    }

    #[test]
    fn cut_and_joined_again_in_any_order() {
        let data = payload(65_000);
        let mut parts = cut(7, &data, 1500);
        assert_eq!(parts.len(), 65_000usize.div_ceil(1480));
        for p in &parts {
            let ip = Ipv4Packet::new_checked(&p[..]).unwrap();
            assert!(p.len() <= 1500 && ip.verify_checksum() && !ip.dont_frag());
        }
        parts.reverse();
        parts.swap(3, 17);
        let mut r = Reassembly::default();
        let now = Instant::now();
        let (last, rest) = parts.split_last().unwrap();
        for p in rest {
            assert_eq!(push(&mut r, p, now), Outcome::Kept);
        }
        let Outcome::Whole(w) = push(&mut r, last, now) else {
            panic!("not reassembled");
        };
        assert_eq!((w.src, w.dst, w.protocol), (SRC, DST, IpProtocol::Udp));
        assert!(w.payload == data);
        assert_eq!(r.pending(), 0);
    }

    #[test]
    fn a_packet_that_fits_is_left_whole() {
        let data = payload(1000);
        let parts = cut(1, &data, 1500);
        assert_eq!(parts.len(), 1);
        let ip = Ipv4Packet::new_checked(&parts[0][..]).unwrap();
        assert!(!ip.more_frags() && ip.frag_offset() == 0 && ip.payload() == &data[..]);
    }

    #[test]
    fn interleaved_datagrams_stay_apart() {
        let (a, b) = (
            payload(5000),
            payload(4000).into_iter().rev().collect::<Vec<_>>(),
        );
        let (pa, pb) = (cut(1, &a, 576), cut(2, &b, 576));
        let mut r = Reassembly::default();
        let now = Instant::now();
        let mut got = Vec::new();
        for i in 0..pa.len().max(pb.len()) {
            for p in [pa.get(i), pb.get(i)].into_iter().flatten() {
                if let Outcome::Whole(w) = push(&mut r, p, now) {
                    got.push(w.payload);
                }
            }
        }
        assert_eq!(got.len(), 2);
        assert!(got.contains(&a) && got.contains(&b));
    }

    #[test]
    fn overlaps_duplicates_and_bad_lengths_drop_the_datagram() {
        let data = payload(4000);
        let parts = cut(3, &data, 1500);
        let now = Instant::now();
        // A duplicate fragment overlaps itself.
        let mut r = Reassembly::default();
        assert_eq!(push(&mut r, &parts[0], now), Outcome::Kept);
        assert!(matches!(push(&mut r, &parts[0], now), Outcome::Dropped(_)));
        assert_eq!(r.pending(), 0);
        // A middle fragment whose length is not a multiple of 8.
        let mut odd = parts[1].clone();
        odd.truncate(odd.len() - 3);
        let mut ip = Ipv4Packet::new_unchecked(&mut odd[..]);
        ip.set_total_len(ip.total_len() - 3);
        ip.fill_checksum();
        assert!(matches!(push(&mut r, &odd, now), Outcome::Dropped(_)));
        // A last fragment that ends before data already received.
        let mut r = Reassembly::default();
        assert_eq!(push(&mut r, &parts[1], now), Outcome::Kept);
        let mut early_end = parts[0].clone();
        Ipv4Packet::new_unchecked(&mut early_end[..]).set_more_frags(false);
        assert!(matches!(push(&mut r, &early_end, now), Outcome::Dropped(_)));
        // A fragment past 65,535 bytes.
        let mut far = parts[0].clone();
        Ipv4Packet::new_unchecked(&mut far[..]).set_frag_offset(65_528);
        assert!(matches!(push(&mut r, &far, now), Outcome::Dropped(_)));
        assert_eq!(r.pending(), 0);
    }

    #[test]
    fn state_is_bounded_in_number_and_in_time() {
        let now = Instant::now();
        let mut r = Reassembly::default();
        for ident in 0..MAX_PENDING as u16 {
            assert_eq!(
                push(&mut r, &cut(ident, &payload(3000), 1500)[0], now),
                Outcome::Kept
            );
        }
        // One more pushes the oldest out.
        let later = now + Duration::from_millis(1);
        let extra = cut(999, &payload(3000), 1500);
        assert!(matches!(
            push(&mut r, &extra[0], later),
            Outcome::Dropped(_)
        ));
        assert_eq!(r.pending(), MAX_PENDING);
        // Past the timeout, everything incomplete is gone.
        let parts = cut(1000, &payload(3000), 1500);
        assert_eq!(
            push(&mut r, &parts[0], later + REASSEMBLY_TIMEOUT),
            Outcome::Kept
        );
        assert_eq!(r.pending(), 1);
        // And a datagram that finishes in time is whole.
        for p in &parts[1..parts.len() - 1] {
            assert_eq!(push(&mut r, p, later + REASSEMBLY_TIMEOUT), Outcome::Kept);
        }
        let last = push(&mut r, parts.last().unwrap(), later + REASSEMBLY_TIMEOUT);
        assert!(matches!(last, Outcome::Whole(w) if w.payload == payload(3000)));
    }

    proptest::proptest! {
        /// Whatever fragments arrive, in any order and overlap: no panic, state stays within its
        /// bounds, and a datagram is only ever whole with every byte from its fragments.
        #[test]
        fn any_fragments_are_handled_within_bounds(
            pieces in proptest::collection::vec(
                (0u16..3, 0u16..8192, 0usize..3000, proptest::bool::ANY, proptest::num::u8::ANY),
                1..300,
            )
        ) {
            let mut r = Reassembly::default();
            let now = Instant::now();
            for (ident, offset8, len, more, fill) in pieces {
                let mut p = packet(ident, &vec![fill; len]);
                let mut ip = Ipv4Packet::new_unchecked(&mut p[..]);
                ip.set_more_frags(more);
                ip.set_frag_offset(offset8 * 8);
                ip.fill_checksum();
                match r.push(&Ipv4Packet::new_checked(&p[..]).unwrap(), now) {
                    Outcome::Whole(w) => {
                        proptest::prop_assert!(w.payload.len() <= MAX_IP_LEN - IPV4_HEADER);
                    }
                    Outcome::Kept | Outcome::Dropped(_) => {}
                }
                proptest::prop_assert!(r.pending() <= MAX_PENDING);
                for p in r.pending.values() {
                    proptest::prop_assert!(p.pieces.len() <= MAX_FRAGMENTS);
                }
            }
        }
    }
}
