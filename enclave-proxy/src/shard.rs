//! Shards: the userspace stack as many small smoltcp interfaces rather than one big one.
//!
//! # Why
//!
//! smoltcp walks its whole socket set for every frame it receives and every time it polls for
//! transmit (its maintainers call high socket counts out of scope, smoltcp PR #934; DESIGN.md).
//! With one interface the per-frame cost grows with every open connection, idle ones included:
//! measured over loopback with 64 KiB frames, 54 Gbit/s with no other sockets fell to 0.5 with
//! 16,000. Here each shard is an interface of its own with at most `per_shard` sockets; a
//! frame goes to the one shard that owns its flow, and only shards that received a frame, had a
//! connection serviced, or have a timer due are polled. The cost of a frame is bounded by the
//! shard size, whatever the number of connections.
//!
//! # Layout
//!
//! - Shard 0, the *control* shard, owns no connection. It gets the frames that belong to no
//!   flow, and answers them as smoltcp always did (a RST for a stray segment, an echo reply).
//! - Every other shard owns up to `per_shard` connection sockets; a connection stays in its shard
//!   for life. New sockets fill the lowest-numbered shard with room; emptied shards are kept
//!   for reuse.
//! - The shards speak IP ([`Medium::Ip`]); Ethernet is done once, here: frames from the TAP lose
//!   their Ethernet header before a shard sees them, and frames from a shard gain one addressed
//!   to the enclave kernel's fixed MAC. ARP for the gateway is answered here too
//!   ([`crate::packet::arp_reply`]), so no shard keeps a neighbour cache or ever waits on ARP.
//! - Timers: each shard's next deadline (`poll_at`) is remembered, so a connection whose shard
//!   receives no frames still has its retransmissions, delayed ACKs and keep-alives on time.
//! - Bookkeeping: a turn must cost the same with 10 shards or 500, so no step walks them all.
//!   Shards that changed are listed as they change (`dirty`), and deadlines are kept in order
//!   (`timers`); a poll takes the due deadlines off the front of that order, and polls those
//!   shards and the listed ones.
//! - Within a shard, smoltcp walks every socket, idle ones included, on each call: an egress
//!   poll sends at most one segment from each socket and is repeated until it sends nothing, and
//!   asking for the deadline is one more walk. A shard busy turn after turn is polled again
//!   before its deadline matters, so a polled shard is asked for it late (it is `stale` until
//!   then): at the next poll if nothing touched it by then, or when [`Shards::poll_at`] is
//!   asked, before the loop sleeps.

use std::collections::BTreeSet;

use smoltcp::iface::{
    Config as IfaceConfig, Interface, PollIngressSingleResult, PollResult, SocketHandle, SocketSet,
};
use smoltcp::phy::{self, Checksum, ChecksumCapabilities, Device, DeviceCapabilities, Medium};
use smoltcp::socket::tcp;
use smoltcp::time::Instant;
use smoltcp::wire::{HardwareAddress, IpAddress, IpCidr, Ipv4Address};

/// Where frames leave the stack: the TAP, or an in-memory queue in tests and benches.
pub trait Wire {
    /// A buffer for an IP packet of `len` bytes; [`Wire::send`] then sends it.
    fn tx_buffer(&mut self, len: usize) -> &mut [u8];
    /// Sends the packet just written into [`Wire::tx_buffer`].
    fn send(&mut self, len: usize);
    /// The largest IP packet the wire carries.
    fn mtu(&self) -> usize;
}

/// A socket's address: its shard and its handle there.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ConnId {
    /// The shard that owns the socket.
    pub shard: u32,
    /// The socket's handle in that shard's set.
    pub handle: SocketHandle,
}

/// One smoltcp interface and its sockets.
struct Shard {
    iface: Interface,
    sockets: SocketSet<'static>,
    /// Sockets in the set, dying ones included.
    used: usize,
    /// When smoltcp next wants to be polled, as of the last poll; `(poll_at, index)` is in
    /// [`Shards::timers`] exactly when this is `Some`. `None` while `stale`.
    poll_at: Option<Instant>,
    /// Polled since smoltcp was last asked for its deadline; the shard is in [`Shards::stale`]
    /// exactly when this is set.
    stale: bool,
    /// Something changed since the last egress poll; the shard is in [`Shards::dirty`] exactly
    /// when this is set.
    dirty: bool,
    /// Sockets to remove after the next egress poll (it sends what they still owe).
    dying: Vec<SocketHandle>,
}

/// Every shard, with the bookkeeping that decides which to poll.
pub struct Shards {
    shards: Vec<Shard>,
    per_shard: usize,
    gateway: Ipv4Address,
    prefix: u8,
    seed: u64,
    /// Shards (never the control shard) with room for another socket.
    roomy: BTreeSet<u32>,
    /// Shards that changed since their last poll, each once.
    dirty: Vec<u32>,
    /// Shards polled whose deadline is still to be asked, each once.
    stale: Vec<u32>,
    /// The deadline of every shard that has one and is not stale, earliest first:
    /// `(poll_at, index)`.
    timers: BTreeSet<(Instant, u32)>,
    /// The time of the last poll, to ask deadlines at outside one.
    now: Instant,
    /// Shards polled for egress, for tests that check a poll leaves quiet shards alone.
    #[cfg(test)]
    polled: usize,
}

/// The device a shard polls: at most one received packet, and the wire for what it sends.
struct Port<'a, W: Wire> {
    rx: Option<&'a [u8]>,
    wire: &'a mut W,
}

struct RxToken<'a>(&'a [u8]);

impl phy::RxToken for RxToken<'_> {
    fn consume<R, F: FnOnce(&[u8]) -> R>(self, f: F) -> R {
        f(self.0)
    }
}

struct TxToken<'a, W: Wire>(&'a mut W);

impl<W: Wire> phy::TxToken for TxToken<'_, W> {
    fn consume<R, F: FnOnce(&mut [u8]) -> R>(self, len: usize, f: F) -> R {
        let r = f(self.0.tx_buffer(len));
        self.0.send(len);
        r
    }
}

impl<'p, W: Wire> Device for Port<'p, W> {
    type RxToken<'a>
        = RxToken<'a>
    where
        Self: 'a;
    type TxToken<'a>
        = TxToken<'a, W>
    where
        Self: 'a;

    fn receive(&mut self, _now: Instant) -> Option<(RxToken<'_>, TxToken<'_, W>)> {
        let rx = self.rx.take()?;
        Some((RxToken(rx), TxToken(self.wire)))
    }

    fn transmit(&mut self, _now: Instant) -> Option<TxToken<'_, W>> {
        Some(TxToken(self.wire))
    }

    fn capabilities(&self) -> DeviceCapabilities {
        let mut caps = DeviceCapabilities::default();
        caps.medium = Medium::Ip;
        caps.max_transmission_unit = self.wire.mtu();
        // Packets from the TAP never crossed a wire, and with checksum offload the kernel leaves
        // their TCP checksums partial, so they are not verified. Packets we send carry correct
        // checksums (the TAP is told they are valid, and they must be).
        let mut checksum = ChecksumCapabilities::default();
        checksum.ipv4 = Checksum::Tx;
        checksum.tcp = Checksum::Tx;
        caps.checksum = checksum;
        caps
    }
}

impl Shard {
    fn new(gateway: Ipv4Address, prefix: u8, seed: u64, wire: &mut impl Wire) -> Shard {
        let mut config = IfaceConfig::new(HardwareAddress::Ip);
        config.random_seed = seed;
        let mut port = Port { rx: None, wire };
        let mut iface = Interface::new(config, &mut port, Instant::ZERO);
        iface.update_ip_addrs(|addrs| {
            let _ = addrs.push(IpCidr::new(IpAddress::Ipv4(gateway), prefix));
        });
        // Any-IP: accept packets for every destination routed through our own address, which
        // the default route makes every destination.
        iface.set_any_ip(true);
        let _ = iface.routes_mut().add_default_ipv4_route(gateway);
        Shard {
            iface,
            sockets: SocketSet::new(Vec::new()),
            used: 0,
            poll_at: None,
            stale: false,
            dirty: false,
            dying: Vec::new(),
        }
    }

    /// Sends what the sockets have queued, and removes the sockets that were dying.
    fn poll_egress(&mut self, now: Instant, wire: &mut impl Wire) {
        let mut port = Port { rx: None, wire };
        while self.iface.poll_egress(now, &mut port, &mut self.sockets) != PollResult::None {}
        for handle in self.dying.drain(..) {
            self.sockets.remove(handle);
            self.used -= 1;
        }
        self.dirty = false;
    }
}

impl Shards {
    /// The control shard alone; connection shards are made as sockets need them, each with room
    /// for `per_shard` sockets.
    pub fn new(
        gateway: Ipv4Address,
        prefix: u8,
        per_shard: usize,
        seed: u64,
        wire: &mut impl Wire,
    ) -> Shards {
        Shards {
            shards: vec![Shard::new(gateway, prefix, seed, wire)],
            per_shard: per_shard.max(1),
            gateway,
            prefix,
            seed,
            roomy: BTreeSet::new(),
            dirty: Vec::new(),
            stale: Vec::new(),
            timers: BTreeSet::new(),
            now: Instant::ZERO,
            #[cfg(test)]
            polled: 0,
        }
    }

    /// Asks a stale shard for its deadline, and files it. (smoltcp's answer depends on the
    /// sockets alone, not on `now`, so asking late changes nothing.)
    fn settle(&mut self, index: u32, now: Instant) {
        let s = &mut self.shards[index as usize];
        s.stale = false;
        s.poll_at = s.iface.poll_at(now, &s.sockets);
        if let Some(at) = s.poll_at {
            self.timers.insert((at, index));
        }
    }

    /// Marks a shard for the next egress poll.
    fn touch(&mut self, shard: u32) -> &mut Shard {
        let s = &mut self.shards[shard as usize];
        if !s.dirty {
            s.dirty = true;
            self.dirty.push(shard);
        }
        s
    }

    /// The number of shards, the control shard included.
    pub fn count(&self) -> usize {
        self.shards.len()
    }

    /// Adds a socket to the lowest-numbered connection shard with room (a new shard if none).
    pub fn add(&mut self, socket: tcp::Socket<'static>, wire: &mut impl Wire) -> ConnId {
        let shard = match self.roomy.first() {
            Some(&s) => s,
            None => {
                let index = self.shards.len() as u32;
                let seed = self
                    .seed
                    .wrapping_add(u64::from(index).wrapping_mul(0x9e37_79b9));
                self.shards
                    .push(Shard::new(self.gateway, self.prefix, seed, wire));
                self.roomy.insert(index);
                index
            }
        };
        let s = self.touch(shard);
        let handle = s.sockets.add(socket);
        s.used += 1;
        if s.used >= self.per_shard {
            self.roomy.remove(&shard);
        }
        ConnId { shard, handle }
    }

    /// Removes a socket at once (it never sent anything that must still go out).
    pub fn remove_now(&mut self, id: ConnId) {
        let s = &mut self.shards[id.shard as usize];
        s.sockets.remove(id.handle);
        s.used -= 1;
        self.roomy.insert(id.shard);
    }

    /// Removes a socket after its shard's next egress poll, which sends what it still owes (a
    /// RST after an abort, the last ACK).
    pub fn remove_later(&mut self, id: ConnId) {
        let per_shard = self.per_shard;
        let s = self.touch(id.shard);
        s.dying.push(id.handle);
        if s.used - s.dying.len() < per_shard {
            self.roomy.insert(id.shard);
        }
    }

    /// A socket, to read or change. Marks its shard for an egress poll.
    pub fn socket_mut(&mut self, id: ConnId) -> &mut tcp::Socket<'static> {
        self.touch(id.shard)
            .sockets
            .get_mut::<tcp::Socket>(id.handle)
    }

    /// A socket, to look at.
    pub fn socket(&self, id: ConnId) -> &tcp::Socket<'static> {
        self.shards[id.shard as usize]
            .sockets
            .get::<tcp::Socket>(id.handle)
    }

    /// Connects a socket (`tcp::Socket::connect` needs its shard's interface).
    pub fn connect(
        &mut self,
        id: ConnId,
        remote: impl Into<smoltcp::wire::IpEndpoint>,
        local: impl Into<smoltcp::wire::IpListenEndpoint>,
    ) -> Result<(), tcp::ConnectError> {
        let s = self.touch(id.shard);
        let socket = s.sockets.get_mut::<tcp::Socket>(id.handle);
        socket.connect(s.iface.context(), remote, local)
    }

    /// Hands one IP packet to a shard (the control shard for `None`). Returns whether smoltcp
    /// took it in (it may have answered at once, a RST for instance).
    pub fn receive(
        &mut self,
        shard: Option<u32>,
        packet: &[u8],
        now: Instant,
        wire: &mut impl Wire,
    ) -> bool {
        let index = shard.unwrap_or(0);
        if index as usize >= self.shards.len() {
            return false;
        }
        let s = self.touch(index);
        let mut port = Port {
            rx: Some(packet),
            wire,
        };
        let r = s.iface.poll_ingress_single(now, &mut port, &mut s.sockets);
        r != PollIngressSingleResult::None
    }

    /// Polls every shard that changed since its last poll or whose timer is due, and no other.
    pub fn poll(&mut self, now: Instant, wire: &mut impl Wire) {
        self.now = now;
        // The deadlines of the shards polled last time and not touched since. A touched one is
        // polled again now, and asked afterwards.
        let mut stale = std::mem::take(&mut self.stale);
        stale.retain(|&index| {
            let again = self.shards[index as usize].dirty;
            if !again {
                self.settle(index, now);
            }
            again
        });
        self.stale = stale;
        while let Some(&(at, index)) = self.timers.first() {
            if at > now {
                break;
            }
            self.timers.pop_first();
            self.shards[index as usize].poll_at = None;
            self.touch(index);
        }
        // Taken out for the walk, and put back to keep its allocation.
        let mut dirty = std::mem::take(&mut self.dirty);
        for &index in &dirty {
            let s = &mut self.shards[index as usize];
            if let Some(at) = s.poll_at.take() {
                self.timers.remove(&(at, index));
            }
            s.poll_egress(now, wire);
            if !s.stale {
                s.stale = true;
                self.stale.push(index);
            }
        }
        #[cfg(test)]
        {
            self.polled += dirty.len();
        }
        dirty.clear();
        self.dirty = dirty;
    }

    /// The earliest moment any shard wants to be polled. Asks the shards polled since the
    /// last poll for their deadlines first.
    pub fn poll_at(&mut self) -> Option<Instant> {
        if !self.dirty.is_empty() {
            return Some(Instant::ZERO);
        }
        let mut stale = std::mem::take(&mut self.stale);
        for &index in &stale {
            self.settle(index, self.now);
        }
        stale.clear();
        self.stale = stale;
        self.timers.first().map(|&(at, _)| at)
    }
}

#[cfg(test)]
impl Shards {
    /// Checks that the dirty and stale lists and the timers agree with the shards.
    fn check_books(&self) {
        let mut listed = self.dirty.clone();
        listed.sort_unstable();
        listed.dedup();
        assert_eq!(listed.len(), self.dirty.len(), "a shard listed twice");
        let mut stale = self.stale.clone();
        stale.sort_unstable();
        stale.dedup();
        assert_eq!(stale.len(), self.stale.len(), "a stale shard listed twice");
        for (s, i) in self.shards.iter().zip(0u32..) {
            assert_eq!(s.dirty, listed.binary_search(&i).is_ok(), "shard {i}");
            assert_eq!(s.stale, stale.binary_search(&i).is_ok(), "shard {i}");
            assert!(!(s.stale && s.poll_at.is_some()), "shard {i}");
        }
        let timers: BTreeSet<(Instant, u32)> = self
            .shards
            .iter()
            .zip(0u32..)
            .filter_map(|(s, i)| Some((s.poll_at?, i)))
            .collect();
        assert_eq!(timers, self.timers);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use smoltcp::wire::{IpEndpoint, IpListenEndpoint};
    use std::collections::VecDeque;

    /// A wire that queues what it is sent.
    #[derive(Default)]
    struct Queue {
        buf: Vec<u8>,
        sent: VecDeque<Vec<u8>>,
    }

    impl Wire for Queue {
        fn tx_buffer(&mut self, len: usize) -> &mut [u8] {
            self.buf.resize(len, 0);
            &mut self.buf
        }
        fn send(&mut self, len: usize) {
            self.sent.push_back(self.buf[..len].to_vec());
        }
        fn mtu(&self) -> usize {
            1500
        }
    }

    fn shards(per_shard: usize, wire: &mut Queue) -> Shards {
        Shards::new(Ipv4Address::new(10, 240, 0, 1), 30, per_shard, 7, wire)
    }

    #[test]
    fn sockets_fill_shards_in_order_and_room_comes_back() {
        let mut wire = Queue::default();
        let mut s = shards(2, &mut wire);
        let ids: Vec<ConnId> = (0..5)
            .map(|_| s.add(crate::stack::new_socket(4096), &mut wire))
            .collect();
        let in_shard: Vec<u32> = ids.iter().map(|id| id.shard).collect();
        assert_eq!(in_shard, [1, 1, 2, 2, 3]);
        assert_eq!(s.count(), 4);
        s.remove_now(ids[1]);
        assert_eq!(s.add(crate::stack::new_socket(4096), &mut wire).shard, 1);
        s.remove_later(ids[2]);
        s.poll(Instant::from_millis(1), &mut wire);
        assert_eq!(s.add(crate::stack::new_socket(4096), &mut wire).shard, 2);
    }

    /// `n` new sockets connecting (each sends a SYN at the next poll).
    fn connecting(s: &mut Shards, n: u16, wire: &mut Queue) -> Vec<ConnId> {
        (0..n)
            .map(|i| {
                let id = s.add(crate::stack::new_socket(4096), wire);
                s.connect(
                    id,
                    IpEndpoint::new(IpAddress::v4(10, 240, 0, 2), 8080),
                    IpListenEndpoint {
                        addr: Some(IpAddress::v4(203, 0, 113, 7)),
                        port: 40000 + i,
                    },
                )
                .unwrap();
                id
            })
            .collect()
    }

    /// Connections in many shards: each one's SYN goes out, a timer of a shard that receives
    /// nothing still fires (the SYN is retransmitted), and nothing else is polled needlessly.
    #[test]
    fn timers_fire_in_shards_that_receive_nothing() {
        let mut wire = Queue::default();
        let mut s = shards(4, &mut wire);
        let ids = connecting(&mut s, 12, &mut wire);
        s.poll(Instant::from_millis(0), &mut wire);
        assert_eq!(wire.sent.len(), 12, "one SYN per connection");
        wire.sent.clear();
        // Nothing is due before the retransmission timer.
        let at = s.poll_at().expect("a timer is pending");
        assert!(at > Instant::from_millis(0));
        s.poll(Instant::from_millis(1), &mut wire);
        assert!(wire.sent.is_empty());
        // At the timer, every shard retransmits its SYNs without having received a thing.
        s.poll(at, &mut wire);
        assert!(wire.sent.len() >= 12, "{} retransmissions", wire.sent.len());
        for id in ids {
            assert_eq!(s.socket(id).state(), tcp::State::SynSent);
        }
    }

    /// The same when the loop never sleeps, so never asks for [`Shards::poll_at`]: the polls
    /// find the deadlines themselves.
    #[test]
    fn timers_fire_when_the_loop_never_sleeps() {
        let mut wire = Queue::default();
        let mut s = shards(4, &mut wire);
        connecting(&mut s, 12, &mut wire);
        let mut now = Instant::from_millis(0);
        s.poll(now, &mut wire);
        assert_eq!(wire.sent.len(), 12, "one SYN per connection");
        while now < Instant::from_millis(5000) {
            now += smoltcp::time::Duration::from_millis(10);
            s.poll(now, &mut wire);
            s.check_books();
        }
        assert!(wire.sent.len() >= 24, "{} SYNs", wire.sent.len());
    }

    /// The TCP destination port of an IPv4 packet without options.
    fn dst_port(packet: &[u8]) -> u16 {
        u16::from_be_bytes([packet[22], packet[23]])
    }

    /// A poll sends all that is ready, several segments from one socket too: after it, no shard
    /// is due.
    #[test]
    fn a_poll_sends_every_segment_that_is_ready() {
        let mut wire = Queue::default();
        let mut s = shards(1, &mut wire);
        // Two shards of the stack talk to each other, over the wire and back.
        let server = s.add(crate::stack::new_socket(64 * 1024), &mut wire);
        s.socket_mut(server).listen(8080).unwrap();
        let client = s.add(crate::stack::new_socket(64 * 1024), &mut wire);
        s.connect(
            client,
            IpEndpoint::new(IpAddress::v4(10, 240, 0, 2), 8080),
            IpListenEndpoint {
                addr: Some(IpAddress::v4(203, 0, 113, 7)),
                port: 40000,
            },
        )
        .unwrap();
        let mut now = Instant::from_millis(0);
        // A turn: what is on the wire goes to its shard, then a poll. Returns what it sent.
        let turn = |s: &mut Shards, wire: &mut Queue, now: Instant| {
            for packet in std::mem::take(&mut wire.sent) {
                let to = if dst_port(&packet) == 8080 {
                    server
                } else {
                    client
                };
                s.receive(Some(to.shard), &packet, now, wire);
            }
            s.poll(now, wire);
            s.check_books();
            assert!(
                s.poll_at().is_some_and(|at| at > now),
                "a shard is still due after a poll"
            );
            wire.sent.len()
        };
        for _ in 0..4 {
            turn(&mut s, &mut wire, now);
            now += smoltcp::time::Duration::from_millis(1);
        }
        assert_eq!(s.socket(client).state(), tcp::State::Established);
        assert_eq!(s.socket(server).state(), tcp::State::Established);
        // More than a segment's worth: the first poll sends what the congestion window allows,
        // several segments, one from each walk of the shard's sockets.
        let data = [7u8; 8000];
        assert_eq!(s.socket_mut(client).send_slice(&data), Ok(data.len()));
        let mut segments = Vec::new();
        for _ in 0..20 {
            segments.push(turn(&mut s, &mut wire, now));
            now += smoltcp::time::Duration::from_millis(1);
        }
        assert!(segments[0] >= 2, "segments per turn: {segments:?}");
        let mut got = 0;
        while s.socket(server).can_recv() {
            got += s.socket_mut(server).recv(|b| (b.len(), b.len())).unwrap();
        }
        assert_eq!(got, data.len());
    }

    /// A poll touches the shards that changed and those whose timer is due, each once, and no
    /// other, however many there are.
    #[test]
    fn a_poll_touches_only_changed_and_due_shards() {
        let mut wire = Queue::default();
        let mut s = shards(4, &mut wire);
        // 250 shards of listening sockets, which have no timers.
        let listening: Vec<ConnId> = (0..1000u16)
            .map(|i| {
                let id = s.add(crate::stack::new_socket(256), &mut wire);
                s.socket_mut(id).listen(20_000 + i).unwrap();
                id
            })
            .collect();
        // One connection, whose SYN is retransmitted on a timer, in shard 251.
        let syn = s.add(crate::stack::new_socket(256), &mut wire);
        s.connect(
            syn,
            IpEndpoint::new(IpAddress::v4(10, 240, 0, 2), 8080),
            IpListenEndpoint {
                addr: Some(IpAddress::v4(203, 0, 113, 7)),
                port: 40000,
            },
        )
        .unwrap();
        assert_eq!(s.count(), 252);
        s.check_books();
        assert_eq!(
            s.poll_at(),
            Some(Instant::ZERO),
            "changed shards are due now"
        );
        s.poll(Instant::from_millis(0), &mut wire);
        assert_eq!(s.polled, 251, "each connection shard once");
        assert_eq!(wire.sent.len(), 1, "the SYN");
        s.check_books();
        let at = s.poll_at().expect("the SYN's retransmission timer");
        assert!(at > Instant::from_millis(0));

        // Quiet: nothing is polled.
        s.poll(Instant::from_millis(1), &mut wire);
        assert_eq!(s.polled, 251);
        // Two sockets touched in one shard, one in another, a frame to the control shard.
        s.socket_mut(listening[0]);
        s.socket_mut(listening[1]);
        s.socket_mut(listening[999]);
        s.receive(None, &[0x45], Instant::from_millis(2), &mut wire);
        s.check_books();
        s.poll(Instant::from_millis(2), &mut wire);
        assert_eq!(s.polled, 254);
        s.check_books();
        // Their deadlines are asked at the next poll, or when the loop asks before sleeping.
        assert_eq!(s.stale, [1, 250, 0]);
        assert_eq!(s.poll_at(), Some(at));
        assert!(s.stale.is_empty());
        // The timer: its shard alone, though it received nothing.
        s.poll(at, &mut wire);
        assert_eq!(s.polled, 255);
        assert_eq!(wire.sent.len(), 2, "the SYN again");
        s.check_books();
        assert!(s.poll_at().is_some_and(|next| next > at));
        // A socket dying: its shard is polled, removes it, and has room again.
        s.remove_later(listening[4]);
        s.check_books();
        s.poll(at, &mut wire);
        assert_eq!(s.polled, 256);
        assert_eq!(s.add(crate::stack::new_socket(256), &mut wire).shard, 2);
        s.check_books();
    }
}
