//! The TAP device: frames in and out, with pooled buffers.
//!
//! Buffers are allocated once: one receive buffer and one transmit buffer, reused for every
//! packet. Each starts with the `virtio_net_hdr` the TAP exchanges ([`VnetHdr`]): on receive it
//! says whether the frame is a TCP super-frame; on transmit it marks a frame's checksums valid,
//! or asks the kernel to cut a super-frame into segments. Reads and writes are non-blocking; an
//! error is counted and logged (rate-limited), never a panic (smoltcp's own `TunTapInterface`
//! allocates per packet and panics on errors).
//!
//! The shards speak IP ([`crate::shard`]); [`TapWire`] puts each of their packets in an Ethernet
//! frame from the stack's MAC to the enclave kernel's, whose MAC enclave-proxy sets itself.
//!
//! # Offload
//!
//! With `--offload on` (the default) the TAP does TCP segmentation offload both ways, as the
//! primer on [`VnetHdr`] explains: the receive buffer holds a whole 64 KiB super-frame, every
//! SYN and SYN-ACK from the kernel has its MSS raised as it is read ([`Tap::read`]), and
//! [`TapWire::send`] marks what smoltcp sends beyond a flow's real MSS for the kernel to cut.
//! The kernel may refuse TSO (`TUNSETOFFLOAD`); the TAP then runs as with `--offload off`, and
//! says so in the log.

use std::fs::File;
use std::io::{self, Read, Write};

use smoltcp::wire::{EthernetAddress, EthernetProtocol};
use tokio::io::unix::AsyncFd;
use tracing::{info, warn};

use crate::config::Offload;
use crate::packet::{self, FlowKey, Gso, VnetHdr};
use crate::shard::Wire;
use crate::stack::FlowMap;
use crate::sys::{TUN_F_CSUM, TUN_F_TSO4, TUN_F_TSO6, VNET_HDR_LEN};

/// Ethernet header length.
pub const ETH_HEADER: usize = 14;

/// Frames read from the TAP per stack iteration before connections get serviced again.
pub const RX_BUDGET: usize = 256;

/// The largest frame the kernel hands over with TSO on: an IPv4 packet of 64 KiB, its Ethernet
/// header and room for a VLAN tag.
const SUPER_FRAME: usize = ETH_HEADER + 4 + 65535;

/// How many flows' real MSS to keep before looking for ones that ended
/// ([`Tap::forget_mss`]).
const MSS_KEEP_MIN: usize = 256;

/// What went through the TAP, for the log at shutdown and for tests that check super-frames
/// really crossed it.
#[derive(Debug, Default, Clone, Copy)]
pub struct TapStats {
    /// Frames read.
    pub rx_frames: u64,
    /// Frames read that were TCP super-frames.
    pub rx_gso: u64,
    /// The largest frame read, in bytes (Ethernet header included).
    pub rx_max: usize,
    /// Frames read with a `virtio_net_hdr` this code does not handle, dropped.
    pub rx_unsupported: u64,
    /// SYNs and SYN-ACKs whose MSS was raised.
    pub mss_raised: u64,
    /// Frames written that the kernel was asked to cut into segments.
    pub tx_gso: u64,
    /// The largest frame written, in bytes (Ethernet header included).
    pub tx_max: usize,
    /// Frames written.
    pub tx_frames: u64,
    /// Frames that could not be written.
    pub tx_dropped: u64,
}

/// The TAP device.
#[derive(Debug)]
pub struct Tap {
    fd: AsyncFd<File>,
    mtu: usize,
    rx: Box<[u8]>,
    tx: Box<[u8]>,
    /// Whether TSO is in use: frames may be super-frames both ways.
    tso: bool,
    /// The real MSS of each flow whose SYN or SYN-ACK had its MSS raised, by the flow as
    /// [`crate::packet::classify`] names it. Keyed by addresses the internet chooses, hence a
    /// [`FlowMap`].
    real_mss: FlowMap<FlowKey, u16>,
    /// The smallest value in `real_mss` (`u16::MAX` when empty): a segment no larger than this
    /// needs no look-up.
    min_mss: u16,
    /// The last read found the TAP empty: wait for readiness before reading again.
    pub rx_blocked: bool,
    /// Counts of what crossed the TAP.
    pub stats: TapStats,
}

/// What the TAP sends shard packets with: the transmit half of a [`Tap`].
pub struct TapWire<'a> {
    file: &'a File,
    mtu: usize,
    tx: &'a mut [u8],
    stats: &'a mut TapStats,
    /// With TSO on: each flow's real MSS, and the smallest of them.
    real_mss: Option<(&'a FlowMap<FlowKey, u16>, u16)>,
    src: EthernetAddress,
    dst: EthernetAddress,
}

impl Tap {
    /// Wraps an open TAP file descriptor (see [`crate::sys::open_tap`]) and sets its offloads:
    /// TSO if `offload` is [`Offload::On`] and the kernel accepts it, checksum offload only
    /// otherwise. Logs which is in use.
    pub fn new(file: File, mtu: usize, offload: Offload) -> io::Result<Tap> {
        let tso = match offload {
            Offload::Off => {
                info!(
                    tap.offload = "off",
                    "TAP offload off (--offload off): checksum offload only; TCP crosses the TAP \
                     in segments no larger than each flow's MSS"
                );
                false
            }
            Offload::On => match enable_tso(&file) {
                Ok(flags) => {
                    info!(
                        tap.offload = "on",
                        tap.tso = flags,
                        "TAP offload on: TCP crosses the TAP in super-frames of up to 64 KiB both \
                         ways (--offload off to disable)"
                    );
                    true
                }
                Err(e) => {
                    warn!(
                        tap.offload = "off",
                        "TAP offload off: the kernel refused TSO (TUNSETOFFLOAD: {e}); checksum \
                         offload only, TCP in segments no larger than each flow's MSS"
                    );
                    false
                }
            },
        };
        let frame = VNET_HDR_LEN + ETH_HEADER + mtu;
        let rx_frame = if tso {
            frame.max(VNET_HDR_LEN + SUPER_FRAME)
        } else {
            frame
        };
        Ok(Tap {
            fd: crate::sys::register_tap(file)?,
            mtu,
            rx: vec![0u8; rx_frame].into_boxed_slice(),
            tx: vec![0u8; frame].into_boxed_slice(),
            tso,
            real_mss: FlowMap::default(),
            min_mss: u16::MAX,
            rx_blocked: false,
            stats: TapStats::default(),
        })
    }

    /// Whether TSO is in use.
    pub fn tso(&self) -> bool {
        self.tso
    }

    /// Waits until the TAP may have frames to read.
    pub async fn readable(&self) -> io::Result<()> {
        let mut guard = self.fd.readable().await?;
        // Readiness is cleared before reading: frames that arrive after this point raise a new
        // edge, and the stack reads until `WouldBlock` before waiting again.
        guard.clear_ready();
        Ok(())
    }

    /// Reads one frame; returns the Ethernet frame's range in [`Tap::split`]'s buffer and its
    /// `virtio_net_hdr`, or `None` (and sets `rx_blocked`) when the TAP is empty or failed.
    /// Frames with offloads this code does not handle are dropped here. With TSO on, a SYN or
    /// SYN-ACK has its MSS raised here, before smoltcp sees it (see [`VnetHdr`]).
    pub fn read(&mut self) -> Option<(std::ops::Range<usize>, VnetHdr)> {
        loop {
            let mut file = self.fd.get_ref();
            let n = match file.read(&mut self.rx) {
                Ok(n) if n > VNET_HDR_LEN + ETH_HEADER => n,
                Ok(_) => continue,
                Err(e) => {
                    if e.kind() != io::ErrorKind::WouldBlock {
                        common::warn_limited!("TAP read failed: {e}");
                    }
                    self.rx_blocked = true;
                    return None;
                }
            };
            let vnet = VnetHdr::decode(&self.rx).unwrap_or_default();
            let range = VNET_HDR_LEN..n;
            self.stats.rx_frames += 1;
            self.stats.rx_max = self.stats.rx_max.max(range.len());
            match vnet.gso() {
                Gso::None => {}
                Gso::Tcp { .. } => self.stats.rx_gso += 1,
                Gso::Unsupported => {
                    self.stats.rx_unsupported += 1;
                    common::warn_limited!(
                        vnet.gso_type,
                        "dropped a TAP frame with an offload that was not asked for"
                    );
                    continue;
                }
            }
            if self.tso {
                self.raise_mss(range.clone(), vnet);
            }
            return Some((range, vnet));
        }
    }

    /// Raises the MSS of a SYN or SYN-ACK from the kernel to what the TAP carries, and remembers
    /// the flow's real one for [`TapWire::send`]; a SYN that needs no raising clears what an
    /// earlier flow of the same addresses left.
    fn raise_mss(&mut self, range: std::ops::Range<usize>, vnet: VnetHdr) {
        let to = packet::mss_for_mtu(self.mtu);
        let frame = &mut self.rx[range];
        if frame.get(12..ETH_HEADER) != Some(&u16::from(EthernetProtocol::Ipv4).to_be_bytes()) {
            return;
        }
        let Some(seg) = packet::tcp_segment(&frame[ETH_HEADER..]) else {
            return;
        };
        if !seg.syn() {
            return;
        }
        // Named as `classify` names it: the enclave-kernel side is the sender here.
        let key = FlowKey {
            local: seg.src,
            remote: seg.dst,
        };
        match packet::raise_mss(frame, to, vnet.needs_csum()) {
            Some(real) => {
                self.stats.mss_raised += 1;
                self.real_mss.insert(key, real);
                self.min_mss = self.min_mss.min(real);
            }
            None => {
                self.real_mss.remove(&key);
            }
        }
    }

    /// Forgets the real MSS of flows for which `ended` is true, once there are more than twice
    /// `live` (and a margin) of them; the stack calls this with its flow table, so that the
    /// map stays in step with it at a cost that is constant per flow.
    pub fn forget_mss(&mut self, live: usize, ended: impl Fn(&FlowKey) -> bool) {
        if self.real_mss.len() <= 2 * live + MSS_KEEP_MIN {
            return;
        }
        self.real_mss.retain(|key, _| !ended(key));
        self.min_mss = self.real_mss.values().copied().min().unwrap_or(u16::MAX);
    }

    /// The receive buffer, and the transmit half for packets from `src` to `dst`.
    pub fn split(&mut self, src: EthernetAddress, dst: EthernetAddress) -> (&[u8], TapWire<'_>) {
        (
            &self.rx,
            TapWire {
                file: self.fd.get_ref(),
                mtu: self.mtu,
                tx: &mut self.tx,
                stats: &mut self.stats,
                real_mss: self.tso.then_some((&self.real_mss, self.min_mss)),
                src,
                dst,
            },
        )
    }

    /// Writes one Ethernet frame straight to the TAP (ICMP errors, ARP replies).
    pub fn send_raw(&mut self, frame: &[u8]) {
        let Some(buf) = self.tx.get_mut(..VNET_HDR_LEN + frame.len()) else {
            self.stats.tx_dropped += 1;
            return;
        };
        VnetHdr::VALID.encode(buf);
        buf[VNET_HDR_LEN..].copy_from_slice(frame);
        write_frame(self.fd.get_ref(), buf, &mut self.stats);
    }
}

impl Drop for Tap {
    fn drop(&mut self) {
        let s = self.stats;
        info!(
            tap.rx_frames = s.rx_frames,
            tap.rx_gso = s.rx_gso,
            tap.rx_max = s.rx_max,
            tap.rx_unsupported = s.rx_unsupported,
            tap.mss_raised = s.mss_raised,
            tap.tx_gso = s.tx_gso,
            tap.tx_max = s.tx_max,
            tap.tx_frames = s.tx_frames,
            tap.tx_dropped = s.tx_dropped,
            "TAP closed"
        );
    }
}

/// Asks for TSO: IPv4 and IPv6, or IPv4 alone on a kernel that refuses the pair (the TAP is
/// IPv4-only). Returns the flags set.
fn enable_tso(file: &File) -> io::Result<&'static str> {
    crate::sys::set_offload(file, TUN_F_CSUM | TUN_F_TSO4 | TUN_F_TSO6)
        .map(|()| "tso4,tso6")
        .or_else(|_| crate::sys::set_offload(file, TUN_F_CSUM | TUN_F_TSO4).map(|()| "tso4"))
}

impl TapWire<'_> {
    /// The `virtio_net_hdr` for the IP packet in `tx[at..end]`: GSO if it is a TCP segment with
    /// more payload than its flow's real MSS allows (its checksum is then made partial), plain
    /// otherwise.
    fn header_for(&mut self, at: usize, end: usize) -> VnetHdr {
        let Some((real_mss, min_mss)) = self.real_mss else {
            return VnetHdr::VALID;
        };
        let packet = &mut self.tx[at..end];
        let Some(seg) = packet::tcp_segment(packet) else {
            return VnetHdr::VALID;
        };
        // Every remembered MSS is at least `min_mss`, so a segment this small fits any flow.
        if seg.payload_len + seg.options_len() <= usize::from(min_mss) {
            return VnetHdr::VALID;
        }
        // The stack sends towards the enclave kernel, which `classify` names `local`.
        let key = FlowKey {
            local: seg.dst,
            remote: seg.src,
        };
        let Some(size) = real_mss
            .get(&key)
            .and_then(|&mss| packet::gso_size(&seg, mss))
        else {
            return VnetHdr::VALID;
        };
        self.stats.tx_gso += 1;
        packet::mark_gso(packet, &seg, size, ETH_HEADER)
    }
}

impl Wire for TapWire<'_> {
    fn tx_buffer(&mut self, len: usize) -> &mut [u8] {
        let at = VNET_HDR_LEN + ETH_HEADER;
        let end = (at + len).min(self.tx.len());
        &mut self.tx[at..end]
    }

    fn send(&mut self, len: usize) {
        let at = VNET_HDR_LEN + ETH_HEADER;
        let end = (at + len).min(self.tx.len());
        let ethertype = match self.tx.get(at).map(|b| b >> 4) {
            Some(6) => EthernetProtocol::Ipv6,
            _ => EthernetProtocol::Ipv4,
        };
        let vnet = self.header_for(at, end);
        vnet.encode(&mut self.tx[..VNET_HDR_LEN]);
        let eth = &mut self.tx[VNET_HDR_LEN..at];
        eth[..6].copy_from_slice(self.dst.as_bytes());
        eth[6..12].copy_from_slice(self.src.as_bytes());
        eth[12..].copy_from_slice(&u16::from(ethertype).to_be_bytes());
        self.stats.tx_max = self.stats.tx_max.max(end - VNET_HDR_LEN);
        write_frame(self.file, &self.tx[..end], self.stats);
    }

    fn mtu(&self) -> usize {
        self.mtu
    }
}

fn write_frame(file: &File, frame: &[u8], stats: &mut TapStats) {
    let mut f = file;
    match f.write(frame) {
        Ok(n) if n == frame.len() => stats.tx_frames += 1,
        Ok(n) => {
            stats.tx_dropped += 1;
            common::warn_limited!("short TAP write: {n} of {} bytes", frame.len());
        }
        Err(e) => {
            stats.tx_dropped += 1;
            if e.kind() != io::ErrorKind::WouldBlock {
                common::warn_limited!("TAP write failed: {e}");
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::packet::tests::{data_packet, syn_frame};
    use crate::shard::Shards;
    use smoltcp::time::Instant;
    use smoltcp::wire::{
        IpAddress, IpEndpoint, IpListenEndpoint, Ipv4Address, Ipv4Packet, TcpControl, TcpPacket,
        TcpRepr, TcpSeqNumber,
    };

    const STACK: EthernetAddress = EthernetAddress([2, 0, 0, 0, 0, 1]);
    const KERNEL: EthernetAddress = EthernetAddress([2, 0, 0, 0, 0, 2]);

    /// The flow of [`data_packet`], as `classify` names it.
    fn flow() -> FlowKey {
        FlowKey {
            local: IpEndpoint::new(Ipv4Address::new(10, 240, 0, 2).into(), 40000),
            remote: IpEndpoint::new(Ipv4Address::new(93, 184, 216, 34).into(), 443),
        }
    }

    /// Sends `packets` through a [`TapWire`] into a plain file and returns each frame written,
    /// with its header.
    fn send_through(
        mtu: usize,
        real_mss: Option<&FlowMap<FlowKey, u16>>,
        packets: &[Vec<u8>],
    ) -> (Vec<(VnetHdr, Vec<u8>)>, TapStats) {
        let path = std::env::temp_dir().join(format!(
            "enclave-proxy-tapwire-{}-{mtu}-{}",
            std::process::id(),
            real_mss.is_some()
        ));
        let file = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(true)
            .open(&path)
            .unwrap();
        let mut tx = vec![0u8; VNET_HDR_LEN + ETH_HEADER + mtu];
        let mut stats = TapStats::default();
        let mut wire = TapWire {
            file: &file,
            mtu,
            tx: &mut tx,
            stats: &mut stats,
            real_mss: real_mss.map(|m| (m, m.values().copied().min().unwrap_or(u16::MAX))),
            src: STACK,
            dst: KERNEL,
        };
        for p in packets {
            wire.tx_buffer(p.len()).copy_from_slice(p);
            wire.send(p.len());
        }
        assert_eq!(stats.tx_dropped, 0);
        let written = std::fs::read(&path).unwrap();
        let _ = std::fs::remove_file(&path);
        let mut frames = Vec::new();
        let mut rest = &written[..];
        for p in packets {
            let (frame, tail) = rest.split_at(VNET_HDR_LEN + ETH_HEADER + p.len());
            frames.push((
                VnetHdr::decode(frame).unwrap(),
                frame[VNET_HDR_LEN..].to_vec(),
            ));
            rest = tail;
        }
        assert!(rest.is_empty());
        (frames, stats)
    }

    #[test]
    fn only_segments_beyond_their_flows_real_mss_go_out_as_gso() {
        let big = data_packet(&[1u8; 8000], false);
        let small = data_packet(&[2u8; 1400], false);
        let mut other_flow = data_packet(&[3u8; 8000], false);
        other_flow[20 + 2..20 + 4].copy_from_slice(&40001u16.to_be_bytes());
        let mut real_mss = FlowMap::default();
        real_mss.insert(flow(), 1460);

        let packets = [big.clone(), small.clone(), other_flow.clone()];
        let (frames, stats) = send_through(9000, Some(&real_mss), &packets);
        let (hdr, frame) = &frames[0];
        assert_eq!(hdr.gso(), Gso::Tcp { size: 1460 });
        assert!(hdr.needs_csum());
        assert_eq!(&frame[..6], KERNEL.as_bytes());
        assert_eq!(&frame[6..12], STACK.as_bytes());
        assert_eq!(&frame[12..14], &[0x08, 0x00]);
        assert_eq!(
            &frame[ETH_HEADER + 20 + 20..],
            &big[40..],
            "payload as sent"
        );
        // The small segment and the flow with no raised MSS are sent as they are, checksums
        // valid, and so is everything with TSO off.
        for (hdr, frame) in &frames[1..] {
            assert_eq!(*hdr, VnetHdr::VALID);
            assert!(frame.len() <= ETH_HEADER + 9000);
        }
        assert_eq!(&frames[1].1[ETH_HEADER..], &small[..]);
        assert_eq!(&frames[2].1[ETH_HEADER..], &other_flow[..]);
        assert_eq!(stats.tx_gso, 1);
        assert_eq!(stats.tx_max, ETH_HEADER + big.len());

        let (frames, stats) = send_through(9000, None, &packets);
        for ((hdr, frame), p) in frames.iter().zip(&packets) {
            assert_eq!(*hdr, VnetHdr::VALID);
            assert_eq!(&frame[ETH_HEADER..], &p[..]);
        }
        assert_eq!(stats.tx_gso, 0);
    }

    /// A wire that keeps what it is sent.
    #[derive(Default)]
    struct Queue {
        buf: Vec<u8>,
        sent: Vec<Vec<u8>>,
    }

    impl Wire for Queue {
        fn tx_buffer(&mut self, len: usize) -> &mut [u8] {
            self.buf.resize(len, 0);
            &mut self.buf
        }
        fn send(&mut self, len: usize) {
            self.sent.push(self.buf[..len].to_vec());
        }
        fn mtu(&self) -> usize {
            1500
        }
    }

    fn segment_from_kernel(seq: u32, ack: u32, payload: &[u8]) -> Vec<u8> {
        let src = Ipv4Address::new(10, 240, 0, 2);
        let dst = Ipv4Address::new(93, 184, 216, 34);
        let tcp = TcpRepr {
            src_port: 40000,
            dst_port: 443,
            control: TcpControl::None,
            seq_number: TcpSeqNumber(seq as i32),
            ack_number: Some(TcpSeqNumber(ack as i32)),
            window_len: 64000,
            window_scale: None,
            max_seg_size: None,
            sack_permitted: false,
            sack_ranges: [None; 3],
            timestamp: None,
            payload,
        };
        crate::packet::tests::ipv4_tcp(src, dst, &tcp)
    }

    fn tcp_of(packet: &[u8]) -> (u32, Option<u32>) {
        let ip = Ipv4Packet::new_checked(packet).unwrap();
        let tcp = TcpPacket::new_checked(ip.payload()).unwrap();
        let ack = tcp.ack().then(|| tcp.ack_number().0 as u32);
        (tcp.seq_number().0 as u32, ack)
    }

    /// What the TSO receive path relies on: smoltcp takes, whole, a TCP segment far larger than
    /// its MTU (1,500 here) and than the MSS it advertised, and a super-frame that carries
    /// several of the sender's segments is acknowledged at once when the ACK delay is lifted
    /// for it, as `Stack::receive` does.
    #[test]
    fn smoltcp_takes_a_super_frame_whole() {
        let mut wire = Queue::default();
        let mut shards = Shards::new(Ipv4Address::new(10, 240, 0, 1), 30, 4, 1, &mut wire);
        let id = shards.add(crate::stack::new_socket(256 * 1024), &mut wire);
        shards
            .socket_mut(id)
            .listen(IpListenEndpoint {
                addr: Some(IpAddress::v4(93, 184, 216, 34)),
                port: 443,
            })
            .unwrap();
        let now = Instant::from_millis(1);
        let syn = syn_frame(TcpControl::Syn, false);
        assert!(shards.receive(Some(id.shard), &syn[ETH_HEADER..], now, &mut wire));
        shards.poll(now, &mut wire);
        let (synack_seq, _) = tcp_of(&wire.sent.pop().expect("a SYN-ACK"));
        let handshake = segment_from_kernel(1001, synack_seq.wrapping_add(1), &[]);
        shards.receive(Some(id.shard), &handshake, now, &mut wire);
        assert_eq!(
            shards.socket(id).state(),
            smoltcp::socket::tcp::State::Established
        );

        let payload: Vec<u8> = (0..60_000u32).map(|i| (i % 251) as u8).collect();
        let big = segment_from_kernel(1001, synack_seq.wrapping_add(1), &payload);
        assert!(big.len() > 1500);
        wire.sent.clear();
        let socket = shards.socket_mut(id);
        let delay = socket.ack_delay();
        socket.set_ack_delay(None);
        assert!(shards.receive(Some(id.shard), &big, now, &mut wire));
        shards.socket_mut(id).set_ack_delay(delay);
        shards.poll(now, &mut wire);
        let socket = shards.socket_mut(id);
        assert_eq!(socket.recv_queue(), payload.len());
        let mut got = vec![0u8; payload.len()];
        assert_eq!(socket.recv_slice(&mut got).unwrap(), payload.len());
        assert_eq!(got, payload);
        let (_, ack) = tcp_of(wire.sent.last().expect("an ACK at once"));
        assert_eq!(ack, Some(1001 + payload.len() as u32));
    }
}
