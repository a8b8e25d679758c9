//! The shards ([`enclave_proxy::shard`]) against a stand-in for the enclave kernel, over
//! in-memory queues: many flows each reach their own socket, a misdirected frame reaches none,
//! timers fire in shards that receive nothing, and a bulk shard starves no one.
//!
//! The stand-in kernel is a plain smoltcp interface (Medium::Ip, checking every checksum the
//! shards compute). The stack side is driven as `stack::Stack::run` drives it: a bounded burst of
//! packets in, each steered to its flow's shard by a flow table; then the connections that have
//! work are serviced; then [`Shards::poll`]; and when nothing is in flight the loop sleeps until
//! [`Shards::poll_at`]. Time is virtual. A connection is only touched (`socket_mut`, which marks
//! its shard for polling) when the test means it to be, as the real loop services only woken
//! connections, so a shard left alone is polled only for its timers.
#![allow(clippy::unwrap_used)]

use std::collections::{HashMap, VecDeque};

use enclave_proxy::packet::FlowKey;
use enclave_proxy::shard::{ConnId, Shards, Wire};
use enclave_proxy::stack::{new_socket, SHARD_SOCKETS};
use enclave_proxy::tap::RX_BUDGET;
use smoltcp::iface::{Config, Interface, SocketHandle, SocketSet};
use smoltcp::phy::{self, Device, DeviceCapabilities, Medium};
use smoltcp::socket::tcp;
use smoltcp::time::{Duration, Instant};
use smoltcp::wire::{
    HardwareAddress, IpCidr, IpEndpoint, IpListenEndpoint, IpProtocol, Ipv4Address, Ipv4Packet,
    TcpPacket,
};

const MTU: usize = 65520;
const GATEWAY: Ipv4Address = Ipv4Address::new(10, 240, 0, 1);
const KERNEL: Ipv4Address = Ipv4Address::new(10, 240, 0, 2);
const CLIENT: Ipv4Address = Ipv4Address::new(203, 0, 113, 7);
const PREFIX: u8 = 30;
/// The kernel-side port every test connection goes to.
const PORT: u16 = 9000;
/// smoltcp's smallest retransmission time-out, and its delayed-ACK time.
const RTO: Duration = Duration::from_millis(1000);
const ACK_DELAY: Duration = Duration::from_millis(10);

/// Packets in flight one way; buffers are a full MTU each and reused.
#[derive(Default)]
struct Queue {
    packets: VecDeque<(Box<[u8]>, usize)>,
    pool: Vec<Box<[u8]>>,
    writing: Option<Box<[u8]>>,
}

impl Wire for Queue {
    fn tx_buffer(&mut self, len: usize) -> &mut [u8] {
        let pool = &mut self.pool;
        let buf = self
            .writing
            .get_or_insert_with(|| pool.pop().unwrap_or_else(|| vec![0; MTU].into()));
        &mut buf[..len]
    }

    fn send(&mut self, len: usize) {
        if let Some(buf) = self.writing.take() {
            self.packets.push_back((buf, len));
        }
    }

    fn mtu(&self) -> usize {
        MTU
    }
}

/// The kernel's device: packets from one queue, to the other.
struct KernelPort<'a> {
    rx: &'a mut Queue,
    tx: &'a mut Queue,
}

struct KernelRx<'a> {
    buf: Box<[u8]>,
    len: usize,
    pool: &'a mut Vec<Box<[u8]>>,
}

impl phy::RxToken for KernelRx<'_> {
    fn consume<R, F: FnOnce(&[u8]) -> R>(self, f: F) -> R {
        let r = f(&self.buf[..self.len]);
        self.pool.push(self.buf);
        r
    }
}

struct KernelTx<'a>(&'a mut Queue);

impl phy::TxToken for KernelTx<'_> {
    fn consume<R, F: FnOnce(&mut [u8]) -> R>(self, len: usize, f: F) -> R {
        let r = f(self.0.tx_buffer(len));
        self.0.send(len);
        r
    }
}

impl Device for KernelPort<'_> {
    type RxToken<'a>
        = KernelRx<'a>
    where
        Self: 'a;
    type TxToken<'a>
        = KernelTx<'a>
    where
        Self: 'a;

    fn receive(&mut self, _now: Instant) -> Option<(KernelRx<'_>, KernelTx<'_>)> {
        let (buf, len) = self.rx.packets.pop_front()?;
        Some((
            KernelRx {
                buf,
                len,
                pool: &mut self.rx.pool,
            },
            KernelTx(self.tx),
        ))
    }

    fn transmit(&mut self, _now: Instant) -> Option<KernelTx<'_>> {
        Some(KernelTx(self.tx))
    }

    fn capabilities(&self) -> DeviceCapabilities {
        // Checksums are computed and checked (the default): the kernel verifies the shards'.
        let mut caps = DeviceCapabilities::default();
        caps.medium = Medium::Ip;
        caps.max_transmission_unit = MTU;
        caps
    }
}

/// A TCP segment, as the tests look at it.
#[derive(Debug, Clone, Copy)]
struct Seg {
    /// When it was sent or handed over.
    at: Instant,
    /// Its flow, the kernel's end as `local`.
    flow: FlowKey,
    /// Payload length.
    len: usize,
    rst: bool,
}

fn parse(packet: &[u8], from_kernel: bool, at: Instant) -> Option<Seg> {
    let ip = Ipv4Packet::new_checked(packet).ok()?;
    if ip.next_header() != IpProtocol::Tcp {
        return None;
    }
    let tcp = TcpPacket::new_checked(ip.payload()).ok()?;
    let src = IpEndpoint::new(ip.src_addr().into(), tcp.src_port());
    let dst = IpEndpoint::new(ip.dst_addr().into(), tcp.dst_port());
    let (local, remote) = if from_kernel { (src, dst) } else { (dst, src) };
    Some(Seg {
        at,
        flow: FlowKey { local, remote },
        len: tcp.payload().len(),
        rst: tcp.rst(),
    })
}

/// The stack's shards and the stand-in kernel, joined by queues.
struct Net {
    shards: Shards,
    /// The stack's flow table, as `Stack::flows` steers frames.
    flows: HashMap<FlowKey, ConnId>,
    kernel: Interface,
    kernel_sockets: SocketSet<'static>,
    to_kernel: Queue,
    to_stack: Queue,
    now: Instant,
    /// How far time moves in a busy turn.
    step: Duration,
    /// Every segment the stack sent, in order, dropped ones included.
    sent: Vec<Seg>,
    /// Every packet handed to a shard, with the shard.
    handed: Vec<(u32, Seg)>,
    /// Drops a segment the stack sent when it says so.
    drop: Box<dyn FnMut(&Seg) -> bool>,
}

impl Net {
    fn new(per_shard: usize) -> Net {
        let mut to_kernel = Queue::default();
        let mut to_stack = Queue::default();
        let shards = Shards::new(GATEWAY, PREFIX, per_shard, 7, &mut to_kernel);
        let mut config = Config::new(HardwareAddress::Ip);
        config.random_seed = 11;
        let mut port = KernelPort {
            rx: &mut to_kernel,
            tx: &mut to_stack,
        };
        let mut kernel = Interface::new(config, &mut port, Instant::ZERO);
        kernel.update_ip_addrs(|a| a.push(IpCidr::new(KERNEL.into(), PREFIX)).unwrap());
        kernel.routes_mut().add_default_ipv4_route(GATEWAY).unwrap();
        Net {
            shards,
            flows: HashMap::new(),
            kernel,
            kernel_sockets: SocketSet::new(Vec::new()),
            to_kernel,
            to_stack,
            now: Instant::ZERO,
            step: Duration::from_micros(100),
            sent: Vec::new(),
            handed: Vec::new(),
            drop: Box::new(|_| false),
        }
    }

    /// Opens a connection from the stack's side (as ingress does) from `CLIENT:client_port` to
    /// the kernel, with a listening kernel socket for it; returns both ends.
    fn connect(
        &mut self,
        socket: tcp::Socket<'static>,
        client_port: u16,
    ) -> (ConnId, SocketHandle) {
        let mut peer = tcp::Socket::new(
            tcp::SocketBuffer::new(vec![0; 256 * 1024]),
            tcp::SocketBuffer::new(vec![0; 256 * 1024]),
        );
        peer.set_nagle_enabled(false);
        peer.listen(PORT).unwrap();
        let peer = self.kernel_sockets.add(peer);
        let id = self.shards.add(socket, &mut self.to_kernel);
        let remote = IpEndpoint::new(KERNEL.into(), PORT);
        let local = IpListenEndpoint {
            addr: Some(CLIENT.into()),
            port: client_port,
        };
        self.shards.connect(id, remote, local).unwrap();
        self.flows.insert(
            FlowKey {
                local: remote,
                remote: IpEndpoint::new(CLIENT.into(), client_port),
            },
            id,
        );
        (id, peer)
    }

    /// The first half of a loop turn: a bounded burst of packets into their shards.
    fn stack_in(&mut self) {
        for _ in 0..RX_BUDGET {
            let Some((buf, len)) = self.to_stack.packets.pop_front() else {
                break;
            };
            let packet = &buf[..len];
            let seg = parse(packet, true, self.now).unwrap();
            let shard = self.flows.get(&seg.flow).map(|id| id.shard);
            self.handed.push((shard.unwrap_or(0), seg));
            self.shards
                .receive(shard, packet, self.now, &mut self.to_kernel);
            self.to_stack.pool.push(buf);
        }
    }

    /// The second half: the shards' poll, then the kernel's.
    fn stack_out(&mut self) {
        self.shards.poll(self.now, &mut self.to_kernel);
        for _ in 0..self.to_kernel.packets.len() {
            let Some((buf, len)) = self.to_kernel.packets.pop_front() else {
                break;
            };
            let seg = parse(&buf[..len], false, self.now).unwrap();
            self.sent.push(seg);
            if (self.drop)(&seg) {
                self.to_kernel.pool.push(buf);
            } else {
                self.to_kernel.packets.push_back((buf, len));
            }
        }
        let mut port = KernelPort {
            rx: &mut self.to_kernel,
            tx: &mut self.to_stack,
        };
        self.kernel
            .poll(self.now, &mut port, &mut self.kernel_sockets);
    }

    /// Moves time on: a step while packets are in flight, otherwise to the next deadline of
    /// either side, as the loop sleeps until `poll_at`. Returns false if nothing is due ever.
    fn advance(&mut self) -> bool {
        if !self.to_stack.packets.is_empty() {
            self.now += self.step;
            return true;
        }
        let stack = self.shards.poll_at();
        let kernel = self.kernel.poll_at(self.now, &self.kernel_sockets);
        match [stack, kernel].into_iter().flatten().min() {
            Some(at) => {
                self.now = self.now.max(at);
                true
            }
            None => false,
        }
    }

    /// A turn with no application work, at the busy pace.
    fn turn(&mut self) {
        self.stack_in();
        self.stack_out();
        self.now += self.step;
    }

    /// Turns until every connection is established on both ends and the handshakes settled.
    fn establish(&mut self, ends: &[(ConnId, SocketHandle)]) {
        for _ in 0..1000 {
            if ends.iter().all(|&(id, peer)| {
                self.shards.socket(id).state() == tcp::State::Established
                    && self.kernel_sockets.get::<tcp::Socket>(peer).state()
                        == tcp::State::Established
            }) && self.to_stack.packets.is_empty()
            {
                return;
            }
            self.turn();
        }
        panic!("connections did not establish");
    }

    fn peer(&mut self, handle: SocketHandle) -> &mut tcp::Socket<'static> {
        self.kernel_sockets.get_mut::<tcp::Socket>(handle)
    }

    /// How many packets were handed to `shard` in `(from, to]`.
    fn frames_into(&self, shard: u32, from: Instant, to: Instant) -> usize {
        self.handed
            .iter()
            .filter(|(s, seg)| *s == shard && seg.at > from && seg.at <= to)
            .count()
    }

    fn sent_on(&self, flow: FlowKey) -> Vec<Seg> {
        self.sent
            .iter()
            .filter(|s| s.flow == flow)
            .copied()
            .collect()
    }

    fn flow_of(&self, id: ConnId) -> FlowKey {
        *self.flows.iter().find(|(_, &v)| v == id).unwrap().0
    }
}

/// A message that names its connection and direction, then pseudo-random bytes of its own.
fn message(conn: usize, direction: u8) -> Vec<u8> {
    let len = 500 + (conn * 131) % 6000;
    let mut x = (conn as u64 + 1).wrapping_mul(0x9e37_79b9_7f4a_7c15) ^ u64::from(direction);
    let mut out = Vec::with_capacity(len);
    out.extend_from_slice(&(conn as u32).to_le_bytes());
    out.push(direction);
    while out.len() < len {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        out.push(x as u8);
    }
    out
}

/// Sends what is left of `data` from `*at`, and reads everything into `into`.
fn pump(socket: &mut tcp::Socket<'static>, data: &[u8], at: &mut usize, into: &mut Vec<u8>) {
    if *at < data.len() && socket.can_send() {
        *at += socket.send_slice(&data[*at..]).unwrap();
    }
    while socket.can_recv() {
        socket
            .recv(|b| {
                into.extend_from_slice(b);
                (b.len(), ())
            })
            .unwrap();
    }
}

/// 500 connections over 16 shards, all carrying their own bytes both ways at once: each peer
/// gets exactly its connection's bytes, every frame belongs to a known flow, and no RST is sent.
#[test]
fn many_flows_each_reach_their_own_socket() {
    const FLOWS: usize = 500;
    let mut net = Net::new(SHARD_SOCKETS);
    let ends: Vec<(ConnId, SocketHandle)> = (0..FLOWS)
        .map(|i| net.connect(new_socket(64 * 1024), 20_000 + i as u16))
        .collect();
    for (i, (id, _)) in ends.iter().enumerate() {
        assert_eq!(id.shard as usize, 1 + i / SHARD_SOCKETS);
    }
    assert_eq!(net.shards.count(), 1 + FLOWS.div_ceil(SHARD_SOCKETS));
    net.establish(&ends);

    let up: Vec<Vec<u8>> = (0..FLOWS).map(|i| message(i, 0)).collect();
    let down: Vec<Vec<u8>> = (0..FLOWS).map(|i| message(i, 1)).collect();
    let (mut up_at, mut down_at) = (vec![0; FLOWS], vec![0; FLOWS]);
    let (mut got_up, mut got_down) = (vec![Vec::new(); FLOWS], vec![Vec::new(); FLOWS]);
    let mut turns = 0;
    while (0..FLOWS).any(|i| got_up[i].len() < up[i].len() || got_down[i].len() < down[i].len()) {
        turns += 1;
        assert!(turns < 2000, "the flows did not finish");
        net.stack_in();
        for (i, &(id, peer)) in ends.iter().enumerate() {
            pump(
                net.shards.socket_mut(id),
                &up[i],
                &mut up_at[i],
                &mut got_down[i],
            );
            pump(net.peer(peer), &down[i], &mut down_at[i], &mut got_up[i]);
        }
        net.stack_out();
        net.now += net.step;
    }
    for i in 0..FLOWS {
        assert!(
            got_up[i] == up[i],
            "connection {i}: the kernel got other bytes"
        );
        assert!(
            got_down[i] == down[i],
            "connection {i}: the stack got other bytes"
        );
    }
    assert!(net
        .sent
        .iter()
        .chain(net.handed.iter().map(|(_, s)| s))
        .all(|s| !s.rst));
    // Every frame was steered to a connection's shard, and every shard had frames.
    assert!(net.handed.iter().all(|&(shard, _)| shard != 0));
    for shard in 1..net.shards.count() as u32 {
        assert!(net.handed.iter().any(|&(s, _)| s == shard), "shard {shard}");
    }
}

/// A frame handed to the wrong shard, or to the control shard, reaches no socket there: the
/// shard answers RST, as smoltcp does for a segment of no connection, and the socket it was
/// meant for gets it only from its own shard.
#[test]
fn a_misdirected_frame_reaches_no_other_socket() {
    let mut net = Net::new(1);
    let a = net.connect(new_socket(64 * 1024), 30_001);
    let b = net.connect(new_socket(64 * 1024), 30_002);
    assert_ne!(a.0.shard, b.0.shard);
    net.establish(&[a, b]);
    net.peer(a.1).send_slice(b"for a").unwrap();
    net.stack_out();
    let (packet, len) = net.to_stack.packets.pop_front().unwrap();
    let packet = &packet[..len];
    let flow_a = net.flow_of(a.0);
    assert_eq!(parse(packet, true, net.now).unwrap().flow, flow_a);

    for wrong in [Some(b.0.shard), None] {
        net.shards
            .receive(wrong, packet, net.now, &mut net.to_kernel);
        net.shards.poll(net.now, &mut net.to_kernel);
        let (answer, len) = net.to_kernel.packets.pop_front().unwrap();
        let answer = parse(&answer[..len], false, net.now).unwrap();
        assert!(answer.rst && answer.flow == flow_a, "{answer:?}");
        assert!(net.to_kernel.packets.is_empty());
        for (id, _) in [a, b] {
            let socket = net.shards.socket(id);
            assert_eq!(socket.state(), tcp::State::Established);
            assert_eq!(socket.recv_queue(), 0);
        }
    }
    net.shards
        .receive(Some(a.0.shard), packet, net.now, &mut net.to_kernel);
    assert_eq!(net.shards.socket(a.0).recv_queue(), 5);
    assert_eq!(net.shards.socket(b.0).recv_queue(), 0);
}

/// Connections for the timer tests, four sockets a shard: `busy` ones fill shards 1 and 2;
/// `lost` (shard 3) will lose a segment, `kept` (shard 4) has a 2 s keep-alive, `acked` (shard
/// 5) will owe a delayed ACK. Each of these shares its shard only with idle connections.
struct Timed {
    busy: Vec<(ConnId, SocketHandle)>,
    lost: (ConnId, SocketHandle),
    kept: (ConnId, SocketHandle),
    acked: (ConnId, SocketHandle),
}

const KEEP_ALIVE: Duration = Duration::from_secs(2);

fn timed(net: &mut Net) -> Timed {
    let mut all = Vec::new();
    let mut open = |net: &mut Net, socket: tcp::Socket<'static>| {
        let end = net.connect(socket, 31_000 + all.len() as u16);
        all.push(end);
        end
    };
    let busy: Vec<_> = (0..8).map(|_| open(net, new_socket(256 * 1024))).collect();
    let mut alone = |net: &mut Net, socket| {
        let end = open(net, socket);
        for _ in 1..4 {
            open(net, new_socket(4096));
        }
        end
    };
    let lost = alone(net, new_socket(64 * 1024));
    let mut keeper = new_socket(64 * 1024);
    keeper.set_keep_alive(Some(KEEP_ALIVE));
    let kept = alone(net, keeper);
    let acked = alone(net, new_socket(64 * 1024));
    assert_eq!(
        [busy[7].0.shard, lost.0.shard, kept.0.shard, acked.0.shard],
        [2, 3, 4, 5]
    );
    net.establish(&all);
    Timed {
        busy,
        lost,
        kept,
        acked,
    }
}

/// Starts the timers at `net.now`: `lost` sends 100 bytes whose first segment is dropped, and
/// `acked`'s peer sends it 100 bytes, which the stack's application leaves unread.
fn start_timers(net: &mut Net, t: &Timed) {
    let lost = net.flow_of(t.lost.0);
    let mut dropped = false;
    net.drop = Box::new(move |seg| {
        let drop = !dropped && seg.flow == lost && seg.len > 0;
        dropped |= drop;
        drop
    });
    net.shards
        .socket_mut(t.lost.0)
        .send_slice(&[1; 100])
        .unwrap();
    net.peer(t.acked.1).send_slice(&[2; 100]).unwrap();
}

/// Checks that each timer fired on time (within one busy step of its deadline) in a shard that
/// received no frame meanwhile.
fn check_timers(net: &Net, t: &Timed, t0: Instant) {
    let slack = net.step;

    // The retransmission, one RTO after the lost segment.
    let (shard, flow) = (t.lost.0.shard, net.flow_of(t.lost.0));
    let data: Vec<Seg> = net
        .sent_on(flow)
        .into_iter()
        .filter(|s| s.len > 0 && s.at >= t0)
        .collect();
    assert!(data.len() >= 2, "no retransmission: {data:?}");
    assert_eq!(data[0].at, t0);
    let late = data[1].at - t0;
    assert!(
        late >= RTO && late <= RTO + slack,
        "retransmitted after {late}"
    );
    assert_eq!(net.frames_into(shard, t0, data[1].at), 0);
    let peer = net.kernel_sockets.get::<tcp::Socket>(t.lost.1);
    assert_eq!(peer.recv_queue(), 100, "the retransmission did not arrive");

    // The delayed ACK, after the data its shard received and nothing since.
    let (shard, flow) = (t.acked.0.shard, net.flow_of(t.acked.0));
    let (_, arrived) = *net
        .handed
        .iter()
        .find(|(s, seg)| *s == shard && seg.len > 0 && seg.at >= t0)
        .unwrap();
    let ack = net
        .sent_on(flow)
        .into_iter()
        .find(|s| s.at >= arrived.at)
        .expect("no ACK");
    let late = ack.at - arrived.at;
    assert!(
        late >= ACK_DELAY && late <= ACK_DELAY + slack,
        "acknowledged after {late}"
    );
    assert_eq!(net.frames_into(shard, arrived.at, ack.at), 0);
    assert!(
        net.kernel_sockets
            .get::<tcp::Socket>(t.acked.1)
            .send_queue()
            == 0
    );

    // The keep-alives, each one interval after the connection's last segment either way.
    let (shard, flow) = (t.kept.0.shard, net.flow_of(t.kept.0));
    let sent = net.sent_on(flow);
    let probes: Vec<Seg> = sent.iter().filter(|s| s.len == 1).copied().collect();
    assert!(!probes.is_empty(), "no keep-alive");
    for probe in probes {
        let last_sent = sent.iter().filter(|s| s.at < probe.at).map(|s| s.at).max();
        let last_heard = net
            .handed
            .iter()
            .filter(|(s, seg)| *s == shard && seg.at < probe.at)
            .map(|(_, seg)| seg.at)
            .max();
        let since = probe.at - last_sent.max(last_heard).unwrap();
        assert!(
            since >= KEEP_ALIVE && since <= KEEP_ALIVE + slack,
            "keep-alive after {since}"
        );
    }
    let keeper = net.shards.socket(t.kept.0);
    assert_eq!(keeper.state(), tcp::State::Established);
}

/// Keeps at least `chunk` queued to send (all the buffer takes if `fill`), and drains what
/// arrived.
fn keep_busy(socket: &mut tcp::Socket<'static>, chunk: &[u8], fill: bool) -> usize {
    while socket.send_queue() < chunk.len() || (fill && socket.can_send()) {
        if socket.send_slice(chunk).unwrap() == 0 {
            break;
        }
    }
    let mut got = 0;
    while socket.can_recv() {
        got += socket.recv(|b| (b.len(), b.len())).unwrap();
    }
    got
}

/// A retransmission, a keep-alive and a delayed ACK each fire on time, in shards that receive
/// no frames, while two other shards carry traffic on every turn (so the loop never sleeps and
/// only the shards' remembered deadlines can bring the quiet ones up).
#[test]
fn timers_fire_in_quiet_shards_while_others_are_busy() {
    let mut net = Net::new(4);
    net.step = Duration::from_millis(1);
    let t = timed(&mut net);
    let t0 = net.now;
    let chunk = vec![0x5a; 4096];
    start_timers(&mut net, &t);
    let mut moved = 0;
    while net.now < t0 + Duration::from_millis(2500) {
        net.stack_in();
        for &(id, peer) in &t.busy {
            moved += keep_busy(net.shards.socket_mut(id), &chunk, false);
            moved += keep_busy(net.peer(peer), &chunk, false);
        }
        net.stack_out();
        net.now += net.step;
    }
    // The busy shards had frames on (nearly) every turn.
    for shard in [1, 2] {
        let turns = 2500;
        assert!(
            net.frames_into(shard, t0, net.now) >= turns,
            "shard {shard}"
        );
    }
    eprintln!("moved {moved}");
    check_timers(&net, &t, t0);
}

/// The same timers fire on time when nothing else happens and the loop sleeps until
/// [`Shards::poll_at`] between turns: it names each deadline, neither late nor so early that the
/// loop spins.
#[test]
fn timers_fire_when_the_loop_sleeps_until_poll_at() {
    let mut net = Net::new(4);
    net.step = Duration::from_millis(1);
    let t = timed(&mut net);
    let t0 = net.now;
    start_timers(&mut net, &t);
    let mut turns = 0;
    while net.now < t0 + Duration::from_millis(4500) {
        turns += 1;
        // Ten turns do it: the timers, and the packets each one sets off.
        assert!(
            turns <= 20,
            "{turns} turns for a few timers: the loop spins"
        );
        net.stack_in();
        net.stack_out();
        assert!(net.advance(), "nothing due: the loop would sleep for ever");
    }
    check_timers(&net, &t, t0);
    // Both keep-alive intervals were met.
    let probes = net
        .sent_on(net.flow_of(t.kept.0))
        .iter()
        .filter(|s| s.len == 1)
        .count();
    assert!(probes >= 2, "{probes} keep-alives");
}

/// One connection moves bulk both ways without pause, in a full shard beside 31 others and two
/// more shards of small ones. Every small connection does a request and response per round, and
/// each round completes within a few turns: none waits behind the bulk, in its shard or another.
#[test]
fn no_connection_starves_beside_a_bulk_connection() {
    const ROUNDS: usize = 20;
    const BOUND: usize = 4;
    let mut net = Net::new(SHARD_SOCKETS);
    let bulk = net.connect(new_socket(512 * 1024), 32_000);
    let small: Vec<_> = (1..3 * SHARD_SOCKETS as u16)
        .map(|i| net.connect(new_socket(16 * 1024), 32_000 + i))
        .collect();
    assert_eq!(small[SHARD_SOCKETS - 2].0.shard, bulk.0.shard);
    assert_eq!(small.last().unwrap().0.shard, 3);
    let mut all = small.clone();
    all.push(bulk);
    net.establish(&all);

    // Bring the bulk connection up to speed first.
    let chunk = vec![0x5a; 64 * 1024];
    for _ in 0..200 {
        net.stack_in();
        keep_busy(net.shards.socket_mut(bulk.0), &chunk, true);
        keep_busy(net.peer(bulk.1), &chunk, true);
        net.stack_out();
        net.now += net.step;
    }
    let (mut up, mut down, mut all_turns) = (0, 0, 0);
    for round in 0..ROUNDS {
        let request = [round as u8; 200];
        let mut asked = vec![0; small.len()];
        let mut answered = vec![0; small.len()];
        for &(id, _) in &small {
            net.shards.socket_mut(id).send_slice(&request).unwrap();
        }
        let mut turns = 0;
        let (mut round_up, mut round_down) = (0, 0);
        while answered.iter().any(|&n| n < request.len()) {
            turns += 1;
            assert!(
                turns <= BOUND,
                "round {round}: not done in {BOUND} turns: {answered:?}"
            );
            net.stack_in();
            round_down += keep_busy(net.shards.socket_mut(bulk.0), &chunk, true);
            round_up += keep_busy(net.peer(bulk.1), &chunk, true);
            for (i, &(id, peer)) in small.iter().enumerate() {
                // Serviced only when it has something, as the loop services woken connections.
                if net.shards.socket(id).can_recv() {
                    let socket = net.shards.socket_mut(id);
                    answered[i] += socket.recv(|b| (b.len(), b.len())).unwrap();
                }
                let peer = net.peer(peer);
                if peer.can_recv() {
                    asked[i] += peer.recv(|b| (b.len(), b.len())).unwrap();
                    if asked[i] == request.len() {
                        peer.send_slice(&request).unwrap();
                    }
                }
            }
            net.stack_out();
            net.now += net.step;
        }
        // Nor did the small ones hold the bulk back.
        assert!(
            round_up > 0 && round_down > 0,
            "round {round}: the bulk stood still"
        );
        up += round_up;
        down += round_down;
        all_turns += turns;
    }
    // At least a full-sized segment a turn each way, on average.
    let least = all_turns * chunk.len();
    assert!(
        up >= least && down >= least,
        "bulk moved {up} up, {down} down in {all_turns} turns"
    );
}
