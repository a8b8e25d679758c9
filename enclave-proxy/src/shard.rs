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
//! - Timers: after every poll a shard's next deadline (`poll_at`) is remembered, so a connection
//!   whose shard receives no frames still has its retransmissions, delayed ACKs and keep-alives
//!   on time.

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
    /// When smoltcp next wants to be polled, as of the last poll.
    poll_at: Option<Instant>,
    /// Something changed since the last egress poll.
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
            dirty: false,
            dying: Vec::new(),
        }
    }

    /// Sends what the sockets have queued, removes the sockets that were dying, and remembers
    /// when to come back.
    fn poll_egress(&mut self, now: Instant, wire: &mut impl Wire) {
        let mut port = Port { rx: None, wire };
        while self.iface.poll_egress(now, &mut port, &mut self.sockets) != PollResult::None {}
        for handle in self.dying.drain(..) {
            self.sockets.remove(handle);
            self.used -= 1;
        }
        self.dirty = false;
        self.poll_at = self.iface.poll_at(now, &self.sockets);
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
        }
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
        let s = &mut self.shards[shard as usize];
        let handle = s.sockets.add(socket);
        s.used += 1;
        s.dirty = true;
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
        let s = &mut self.shards[id.shard as usize];
        s.dying.push(id.handle);
        s.dirty = true;
        if s.used - s.dying.len() < self.per_shard {
            self.roomy.insert(id.shard);
        }
    }

    /// A socket, to read or change. Marks its shard for an egress poll.
    pub fn socket_mut(&mut self, id: ConnId) -> &mut tcp::Socket<'static> {
        let s = &mut self.shards[id.shard as usize];
        s.dirty = true;
        s.sockets.get_mut::<tcp::Socket>(id.handle)
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
        let s = &mut self.shards[id.shard as usize];
        s.dirty = true;
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
        let index = shard.unwrap_or(0) as usize;
        let Some(s) = self.shards.get_mut(index) else {
            return false;
        };
        let mut port = Port {
            rx: Some(packet),
            wire,
        };
        let r = s.iface.poll_ingress_single(now, &mut port, &mut s.sockets);
        s.dirty = true;
        r != PollIngressSingleResult::None
    }

    /// Polls every shard that changed since its last poll or whose timer is due.
    pub fn poll(&mut self, now: Instant, wire: &mut impl Wire) {
        for s in &mut self.shards {
            if s.dirty || s.poll_at.is_some_and(|at| at <= now) {
                s.poll_egress(now, wire);
            }
        }
    }

    /// The earliest moment any shard wants to be polled.
    pub fn poll_at(&self) -> Option<Instant> {
        self.shards
            .iter()
            .filter_map(|s| {
                if s.dirty {
                    Some(Instant::ZERO)
                } else {
                    s.poll_at
                }
            })
            .min()
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

    /// Connections in many shards: each one's SYN goes out, a timer of a shard that receives
    /// nothing still fires (the SYN is retransmitted), and nothing else is polled needlessly.
    #[test]
    fn timers_fire_in_shards_that_receive_nothing() {
        let mut wire = Queue::default();
        let mut s = shards(4, &mut wire);
        let mut ids = Vec::new();
        for i in 0..12u16 {
            let id = s.add(crate::stack::new_socket(4096), &mut wire);
            s.connect(
                id,
                IpEndpoint::new(IpAddress::v4(10, 240, 0, 2), 8080),
                IpListenEndpoint {
                    addr: Some(IpAddress::v4(203, 0, 113, 7)),
                    port: 40000 + i,
                },
            )
            .unwrap();
            ids.push(id);
        }
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
}
