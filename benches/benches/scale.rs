//! Bulk transfer through enclave-proxy's sharded stack while many idle connections are open
//! through it: the per-byte cost of the stack alone, and how it grows with the connection count.
//!
//! Two sides joined by in-memory queues, with pooled buffers and no Ethernet:
//! - the *stack*: enclave-proxy's [`Shards`], driven as its stack loop drives them (a bounded
//!   burst of packets in, each steered to its flow's shard by a flow table; the connections
//!   serviced; then [`Shards::poll`]);
//! - the *kernel*: a plain smoltcp interface standing in for the enclave kernel. Linux finds a
//!   segment's socket by hash, so the kernel side keeps its peers of the idle connections in a
//!   socket set of their own, which it polls only when a packet arrives for one of them: its cost
//!   does not grow with the connection count, so what grows in the table is the stack's. It
//!   neither computes nor checks checksums (the real kernel offloads them); the shards compute
//!   theirs.
//!
//! Every connection is a real one, made with [`new_socket`] and a completed handshake; the idle
//! ones are still established at the end. One bulk connection carries 64 KiB packets (MTU 65520,
//! as the daemon's TAP) in each direction in turn, with 0, 1,000 and 10,000 idle connections:
//! - `sharded`: at most [`SHARD_SOCKETS`] sockets per shard, as the daemon runs;
//! - `one_interface`: `per_shard = usize::MAX`, every socket in one interface (the design before
//!   the shards), to show what sharding buys.
//!
//! Time is the benchmark thread's CPU time, not wall time: this runs on a shared two-core machine,
//! where other work moved wall-time figures by a factor of two from run to run; CPU time counts
//! only what the stack (and the stand-in kernel) cost.
//!
//! The bulk connection is opened when half the idle ones are, so in one interface it sits in the
//! middle of the socket set (an average place for smoltcp's linear socket lookup), and sharded it
//! shares a full shard.
#![allow(missing_docs, clippy::unwrap_used)]

use std::collections::{HashMap, VecDeque};
use std::ops::Range;
use std::time::Duration;

use criterion::measurement::{Measurement, ValueFormatter, WallTime};
use criterion::{
    criterion_group, criterion_main, BenchmarkId, Criterion, SamplingMode, Throughput,
};
use enclave_proxy::packet::FlowKey;
use enclave_proxy::shard::{ConnId, Shards, Wire};
use enclave_proxy::stack::{new_socket, SHARD_SOCKETS};
use enclave_proxy::tap::RX_BUDGET;
use smoltcp::iface::{Config, Interface, SocketHandle, SocketSet};
use smoltcp::phy::{self, Checksum, ChecksumCapabilities, Device, DeviceCapabilities, Medium};
use smoltcp::socket::tcp;
use smoltcp::time::Instant;
use smoltcp::wire::{
    HardwareAddress, IpCidr, IpEndpoint, IpListenEndpoint, IpProtocol, Ipv4Address, Ipv4Packet,
    TcpPacket,
};

/// Bytes per measured iteration.
const TOTAL: usize = 4 * 1024 * 1024;
/// The daemon's TAP MTU.
const MTU: usize = 65520;
const PAGE: usize = 4096;
/// The daemon's default socket buffer (`--tcp-buffer-kib 512`), for the bulk connection.
const BUFFER: usize = 512 * 1024;
/// The idle connections' buffer. Its size changes nothing smoltcp does per packet (an idle
/// socket's buffers are never read), but glibc zeroes heap memory it reuses for `calloc`, so
/// 10,000 sockets of 512 KiB would make the set-up touch 10 GiB.
const IDLE_BUFFER: usize = 16 * 1024;
const GATEWAY: Ipv4Address = Ipv4Address::new(10, 240, 0, 1);
const KERNEL: Ipv4Address = Ipv4Address::new(10, 240, 0, 2);
const CLIENT: Ipv4Address = Ipv4Address::new(203, 0, 113, 7);
const PREFIX: u8 = 30;
/// The kernel-side port the idle connections go to, and the bulk one's.
const IDLE_PORT: u16 = 9000;
const BULK_PORT: u16 = 5001;
/// Idle connections handshake this many at a time.
const SETUP_BATCH: usize = 512;
/// Virtual time per loop turn.
const STEP: smoltcp::time::Duration = smoltcp::time::Duration::from_micros(10);

/// Packets in flight one way. Buffers are allocated once and reused; each packet starts at a
/// pseudo-random 8-byte boundary within a page of its buffer, so no copy in or out of it keeps
/// one offset against the other side's (see [`World::chunk`]).
#[derive(Default)]
struct Queue {
    packets: VecDeque<(Box<[u8]>, Range<usize>)>,
    pool: Vec<Box<[u8]>>,
    writing: Option<(Box<[u8]>, usize)>,
    placed: u32,
}

impl Queue {
    fn recycle(&mut self, buf: Box<[u8]>) {
        self.pool.push(buf);
    }
}

/// The next of a fixed sequence of 8-byte-aligned offsets within a page.
fn place(state: &mut u32) -> usize {
    *state = state.wrapping_mul(1_103_515_245).wrapping_add(12_345);
    (*state >> 16) as usize % 512 * 8
}

impl Wire for Queue {
    fn tx_buffer(&mut self, len: usize) -> &mut [u8] {
        let at = place(&mut self.placed);
        let buf = self
            .pool
            .pop()
            .unwrap_or_else(|| vec![0; PAGE + MTU].into());
        let (buf, at) = self.writing.insert((buf, at));
        &mut buf[*at..*at + len]
    }

    fn send(&mut self, len: usize) {
        if let Some((buf, at)) = self.writing.take() {
            self.packets.push_back((buf, at..at + len));
        }
    }

    fn mtu(&self) -> usize {
        MTU
    }
}

/// The kernel side's smoltcp device: packets from one queue, to the other.
struct KernelPort<'a> {
    rx: &'a mut Queue,
    tx: &'a mut Queue,
}

struct KernelRx<'a> {
    buf: Box<[u8]>,
    range: Range<usize>,
    pool: &'a mut Vec<Box<[u8]>>,
}

impl phy::RxToken for KernelRx<'_> {
    fn consume<R, F: FnOnce(&[u8]) -> R>(self, f: F) -> R {
        let r = f(&self.buf[self.range]);
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
        let (buf, range) = self.rx.packets.pop_front()?;
        Some((
            KernelRx {
                buf,
                range,
                pool: &mut self.rx.pool,
            },
            KernelTx(self.tx),
        ))
    }

    fn transmit(&mut self, _now: Instant) -> Option<KernelTx<'_>> {
        Some(KernelTx(self.tx))
    }

    fn capabilities(&self) -> DeviceCapabilities {
        let mut caps = DeviceCapabilities::default();
        caps.medium = Medium::Ip;
        caps.max_transmission_unit = MTU;
        let mut checksum = ChecksumCapabilities::default();
        checksum.ipv4 = Checksum::None;
        checksum.tcp = Checksum::None;
        caps.checksum = checksum;
        caps
    }
}

/// The TCP flow of an IPv4 packet, as the stack's flow table keys it (the kernel's end first).
fn flow_of(packet: &[u8], from_kernel: bool) -> Option<FlowKey> {
    let ip = Ipv4Packet::new_checked(packet).ok()?;
    if ip.next_header() != IpProtocol::Tcp {
        return None;
    }
    let tcp = TcpPacket::new_checked(ip.payload()).ok()?;
    let src = IpEndpoint::new(ip.src_addr().into(), tcp.src_port());
    let dst = IpEndpoint::new(ip.dst_addr().into(), tcp.dst_port());
    Some(if from_kernel {
        FlowKey {
            local: src,
            remote: dst,
        }
    } else {
        FlowKey {
            local: dst,
            remote: src,
        }
    })
}

#[derive(Clone, Copy)]
enum Direction {
    /// The stack's socket sends; the kernel's receives ("client->enclave").
    ToEnclave,
    /// The kernel's socket sends; the stack's receives ("enclave->client").
    FromEnclave,
}

struct World {
    shards: Shards,
    flows: HashMap<FlowKey, ConnId>,
    kernel: Interface,
    /// The kernel's peer of the bulk connection.
    kernel_bulk: SocketSet<'static>,
    /// The kernel's peers of the idle connections, polled only when a packet comes for them.
    kernel_idle: SocketSet<'static>,
    to_kernel: Queue,
    to_stack: Queue,
    to_idle: Queue,
    now: Instant,
    bulk: ConnId,
    bulk_peer: SocketHandle,
    idle: Vec<ConnId>,
    /// Packets that reached the kernel for an idle connection during the measurements.
    idle_packets: usize,
    /// What the sending application writes from, at a pseudo-random offset within its first
    /// page each time. On this AMD machine glibc's `memcpy` runs twenty times slower when the
    /// destination's offset within a page is 1 to 31 bytes past the source's; with buffers at
    /// fixed offsets, whether a case hit that depended on where the allocator had put them,
    /// and moved one case's figure by a factor of two. Varied offsets give every case the same
    /// small average share of slow copies.
    chunk: Vec<u8>,
    placed: u32,
}

impl World {
    fn new(per_shard: usize, idle: usize) -> World {
        let mut to_kernel = Queue::default();
        let shards = Shards::new(GATEWAY, PREFIX, per_shard, 7, &mut to_kernel);
        let mut config = Config::new(HardwareAddress::Ip);
        config.random_seed = 11;
        let mut to_stack = Queue::default();
        let mut port = KernelPort {
            rx: &mut to_kernel,
            tx: &mut to_stack,
        };
        let mut kernel = Interface::new(config, &mut port, Instant::ZERO);
        kernel.update_ip_addrs(|a| a.push(IpCidr::new(KERNEL.into(), PREFIX)).unwrap());
        kernel.routes_mut().add_default_ipv4_route(GATEWAY).unwrap();
        let mut w = World {
            shards,
            flows: HashMap::new(),
            kernel,
            kernel_bulk: SocketSet::new(Vec::new()),
            kernel_idle: SocketSet::new(Vec::new()),
            to_kernel,
            to_stack,
            to_idle: Queue::default(),
            now: Instant::ZERO,
            bulk: ConnId {
                shard: 0,
                handle: SocketHandle::default(),
            },
            bulk_peer: SocketHandle::default(),
            idle: Vec::with_capacity(idle),
            idle_packets: 0,
            chunk: vec![0x5a; PAGE + BUFFER],
            placed: 0,
        };
        w.open_idle(idle / 2);
        w.open_bulk();
        w.open_idle(idle - idle / 2);
        w.idle_packets = 0;
        w
    }

    /// Opens a connection from the stack's side (as ingress does) to the kernel at `port`.
    fn connect(&mut self, client_port: u16, port: u16, buffer: usize) -> ConnId {
        let id = self.shards.add(new_socket(buffer), &mut self.to_kernel);
        let remote = IpEndpoint::new(KERNEL.into(), port);
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
        id
    }

    fn open_bulk(&mut self) {
        let mut peer = new_socket(BUFFER);
        peer.listen(BULK_PORT).unwrap();
        self.bulk_peer = self.kernel_bulk.add(peer);
        self.bulk = self.connect(5555, BULK_PORT, BUFFER);
        while self.shards.socket(self.bulk).state() != tcp::State::Established
            || self.kernel_bulk.get::<tcp::Socket>(self.bulk_peer).state()
                != tcp::State::Established
        {
            self.turn();
        }
    }

    fn open_idle(&mut self, count: usize) {
        let mut left = count;
        while left > 0 {
            let batch = left.min(SETUP_BATCH);
            left -= batch;
            let first = self.idle.len();
            for _ in 0..batch {
                // The kernel's side of an idle connection is small: it never carries a byte.
                let mut peer = tcp::Socket::new(
                    tcp::SocketBuffer::new(vec![0; 1024]),
                    tcp::SocketBuffer::new(vec![0; 1024]),
                );
                peer.listen(IDLE_PORT).unwrap();
                self.kernel_idle.add(peer);
                let client_port = 10_000 + self.idle.len() as u16;
                let id = self.connect(client_port, IDLE_PORT, IDLE_BUFFER);
                self.idle.push(id);
            }
            let mut turns = 0;
            while self.idle[first..]
                .iter()
                .any(|&id| self.shards.socket(id).state() != tcp::State::Established)
            {
                self.turn();
                turns += 1;
                assert!(turns < 1000, "idle connections did not establish");
            }
            // Settle the last ACKs on the kernel side.
            for _ in 0..3 {
                self.turn();
            }
        }
    }

    /// One turn of the stack loop, then the kernel's.
    fn turn(&mut self) {
        for _ in 0..RX_BUDGET {
            let Some((buf, range)) = self.to_stack.packets.pop_front() else {
                break;
            };
            let packet = &buf[range];
            let shard = flow_of(packet, true)
                .and_then(|key| self.flows.get(&key))
                .map(|id| id.shard);
            self.shards
                .receive(shard, packet, self.now, &mut self.to_kernel);
            self.to_stack.recycle(buf);
        }
        self.shards.poll(self.now, &mut self.to_kernel);
        self.kernel_poll();
        self.now += STEP;
    }

    fn kernel_poll(&mut self) {
        // Steer packets for idle connections to their own set: the kernel finds sockets by hash.
        for _ in 0..self.to_kernel.packets.len() {
            let Some((buf, range)) = self.to_kernel.packets.pop_front() else {
                break;
            };
            let idle =
                flow_of(&buf[range.clone()], false).is_some_and(|k| k.local.port == IDLE_PORT);
            if idle {
                self.idle_packets += 1;
                self.to_idle.packets.push_back((buf, range));
            } else {
                self.to_kernel.packets.push_back((buf, range));
            }
        }
        let mut port = KernelPort {
            rx: &mut self.to_kernel,
            tx: &mut self.to_stack,
        };
        self.kernel.poll(self.now, &mut port, &mut self.kernel_bulk);
        if !self.to_idle.packets.is_empty() {
            let mut port = KernelPort {
                rx: &mut self.to_idle,
                tx: &mut self.to_stack,
            };
            self.kernel.poll(self.now, &mut port, &mut self.kernel_idle);
            // Buffers recycled into the side queue's pool go back where they came from.
            let pool = std::mem::take(&mut self.to_idle.pool);
            self.to_kernel.pool.extend(pool);
        }
    }

    /// Moves `TOTAL` bytes over the bulk connection.
    fn transfer(&mut self, direction: Direction) -> usize {
        let (mut sent, mut received) = (0, 0);
        while received < TOTAL {
            // The connection is serviced between the burst in and the poll out, as in the loop;
            // the kernel's application runs beside it.
            let peer = self.kernel_bulk.get_mut::<tcp::Socket>(self.bulk_peer);
            let ours = self.shards.socket_mut(self.bulk);
            let (tx, rx) = match direction {
                Direction::ToEnclave => (ours, peer),
                Direction::FromEnclave => (peer, ours),
            };
            if sent < TOTAL && tx.can_send() {
                let at = place(&mut self.placed);
                let len = BUFFER.min(TOTAL - sent);
                sent += tx.send_slice(&self.chunk[at..at + len]).unwrap();
            }
            while rx.can_recv() {
                received += rx.recv(|b| (b.len(), b.len())).unwrap();
            }
            self.turn();
        }
        received
    }

    /// Checks that the idle connections are still idle and established.
    fn check(&self) {
        for &id in &self.idle {
            assert_eq!(self.shards.socket(id).state(), tcp::State::Established);
        }
        assert_eq!(self.idle_packets, 0, "idle connections sent packets");
    }
}

/// The calling thread's CPU time, as criterion's measurement.
struct ThreadCpu;

fn thread_cpu() -> Duration {
    // A yield makes the kernel account the slice running now, so the figure is exact rather
    // than as of the last scheduler tick (4 ms here).
    std::thread::yield_now();
    let stat = std::fs::read_to_string("/proc/thread-self/schedstat").unwrap();
    Duration::from_nanos(stat.split_whitespace().next().unwrap().parse().unwrap())
}

impl Measurement for ThreadCpu {
    type Intermediate = Duration;
    type Value = Duration;

    fn start(&self) -> Duration {
        thread_cpu()
    }

    fn end(&self, start: Duration) -> Duration {
        thread_cpu() - start
    }

    fn add(&self, a: &Duration, b: &Duration) -> Duration {
        *a + *b
    }

    fn zero(&self) -> Duration {
        Duration::ZERO
    }

    fn to_f64(&self, value: &Duration) -> f64 {
        value.as_nanos() as f64
    }

    fn formatter(&self) -> &dyn ValueFormatter {
        // Values are nanoseconds, as wall time's.
        static WALL: WallTime = WallTime;
        WALL.formatter()
    }
}

fn scale(c: &mut Criterion<ThreadCpu>) {
    let mut group = c.benchmark_group("stack_scale");
    group.throughput(Throughput::Bytes(TOTAL as u64));
    group.sampling_mode(SamplingMode::Flat);
    group.sample_size(10);
    group.warm_up_time(Duration::from_millis(500));
    group.measurement_time(Duration::from_secs(2));
    for (design, per_shard) in [("sharded", SHARD_SOCKETS), ("one_interface", usize::MAX)] {
        for idle in [0usize, 1_000, 10_000] {
            // Built on first use, so a filtered run skips the set-up of the cases it leaves out.
            let mut world = None;
            for (name, direction) in [
                ("to_enclave", Direction::ToEnclave),
                ("from_enclave", Direction::FromEnclave),
            ] {
                group.bench_function(BenchmarkId::new(format!("{design}/{name}"), idle), |b| {
                    let world = world.get_or_insert_with(|| World::new(per_shard, idle));
                    b.iter(|| world.transfer(direction))
                });
            }
            if let Some(world) = world {
                world.check();
            }
        }
    }
    group.finish();
}

criterion_group! {
    name = benches;
    config = Criterion::default().with_measurement(ThreadCpu);
    targets = scale
}
criterion_main!(benches);
