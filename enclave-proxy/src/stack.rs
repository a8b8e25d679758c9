//! The stack loop: one task owns the smoltcp interface, its sockets, the TAP device and every
//! connection's link stream (embassy-net's runner is the model; nothing here is behind a lock).
//!
//! The stack is sharded ([`crate::shard`]): many small smoltcp interfaces, so that the cost of a
//! frame does not grow with the number of connections. Each turn of the loop:
//! 1. takes events from the other tasks: host-proxy's answers for held SYNs, and accepted
//!    ingress streams;
//! 2. reads a bounded burst of frames from the TAP and dispatches each: a new SYN is held (the
//!    SYN filter), a segment of a known flow goes to its connection's shard, ARP for the gateway
//!    is answered, anything else goes to the control shard;
//! 3. opens a stream to host-proxy for each new SYN;
//! 4. services only the connections whose waker fired;
//! 5. polls, for transmit, only the shards that changed or have a timer due;
//! 6. sleeps until the TAP is readable, a waker fires, an event arrives or the next shard timer.
//!
//! # How ingress injects a connection
//!
//! For an ingress stream naming client `C:p` and enclave port `P`, a smoltcp socket *connects*
//! from `C:p` to the enclave's own TAP address at `P`. smoltcp runs in any-IP mode with a default
//! route through its own address, so it sends that SYN from a foreign address and accepts the
//! kernel's replies to it. To the enclave kernel it is an ordinary connection arriving on tap0:
//! Docker's DNAT applies and the server sees `C` as its peer. `C` is only the host's assertion,
//! so it is used only if the enclave kernel routes it back out of the TAP, which the ingress task
//! asks before the stream gets here ([`crate::netlink::Routes::check`]); any other client
//! (loopback, an address of an enclave interface, a subnet routed elsewhere such as a Docker
//! bridge, the TAP subnet itself, IPv6 while the TAP is IPv4-only) is sourced from the gateway
//! address with a port of the stack's own choosing. Either way the client IP a server sees comes
//! from the untrusted host and must not be used for authorisation.

use std::collections::HashMap;
use std::net::{IpAddr, Ipv4Addr, SocketAddr, SocketAddrV4};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::task::{Wake, Waker};
use std::time::Duration;

use common::metrics::Counters;
use common::transport::{LinkAddr, Stream};
use common::wire::{Header, Kind, Status};
use futures::FutureExt;
use smoltcp::socket::tcp::{self, CongestionControl};
use smoltcp::wire::{EthernetAddress, IpAddress, IpEndpoint};
use tokio::sync::{mpsc, Notify};
use tokio::time::Instant;
use tracing::{debug, info, info_span, warn, Instrument, Span};

use crate::conn::{Conn, ConnState, Outcome};
use crate::fragments::{self, Reassembly};
use crate::packet::{
    arp_reply, classify, icmp_unreachable, tcp_segment, FlowKey, Frame, Gso, Unreachable,
};
use crate::shard::{ConnId, Shards};
use crate::tap::{Tap, ETH_HEADER, RX_BUDGET};
use crate::udp::{Captured, FlowSettings, Flows, UdpFlow, DNS_PORT};

/// The stack's MAC on the TAP: locally administered, fixed, so ARP caches survive restarts.
pub const STACK_MAC: EthernetAddress = EthernetAddress([0x02, 0x65, 0x6e, 0x65, 0x74, 0x01]);
/// The enclave kernel's MAC on the TAP, which enclave-proxy sets when it configures the TAP: the
/// stack sends to it without ever asking ARP.
pub const KERNEL_MAC: EthernetAddress = EthernetAddress([0x02, 0x65, 0x6e, 0x65, 0x74, 0x02]);

/// Sockets per shard. Each frame costs a walk of one shard's sockets; a shard costs one smoltcp
/// interface (a few hundred bytes) and nothing per loop turn unless it changed or its timer is
/// due ([`Shards`]). With 32, 16,384 connections make 512 shards; a smaller number shortens the
/// walk further (8 cut the remaining cost of 10,000 idle neighbours about fourfold in
/// instructions, not yet measured end to end).
pub const SHARD_SOCKETS: usize = 32;

/// Where a flow is in its life, as the SYN filter needs to know.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Flow {
    /// Waiting on host-proxy: the first SYN is held and retransmissions are dropped.
    Pending,
    /// Has a smoltcp socket: every frame goes to its shard.
    Active(ConnId),
}

/// A SYN held while host-proxy is asked for the connection.
#[derive(Debug)]
pub struct HeldSyn {
    /// The flow it opens.
    pub key: FlowKey,
    /// The Ethernet frame, to replay into smoltcp or to quote in an ICMP error.
    pub frame: Vec<u8>,
}

/// Ports the stack picks from when it must source an ingress connection from the gateway.
const GATEWAY_PORTS: std::ops::RangeInclusive<u16> = 32768..=60999;

/// Work handed to the stack task by the other tasks.
#[derive(Debug)]
pub enum Event {
    /// host-proxy's answer for a held SYN.
    Egress {
        /// The SYN.
        held: HeldSyn,
        /// The stream, ready for payload, or why not.
        result: Result<Stream, Status>,
        /// The connection's span.
        span: Span,
    },
    /// An ingress stream whose header was accepted.
    Ingress {
        /// The header.
        header: Header,
        /// The stream; it is owed a status.
        link: Stream,
        /// The connection's span.
        span: Span,
        /// Whether the enclave kernel routes the header's client address back out of the TAP,
        /// so that it can be the connection's source; if not, the gateway is.
        routed: bool,
    },
    /// A UDP ingress stream whose header was accepted.
    UdpIngress {
        /// The header.
        header: Header,
        /// The stream; it is owed a status.
        link: Stream,
        /// Whether the client address is routed back out of the TAP (else the gateway is the
        /// flow's source).
        routed: bool,
    },
    /// A scrape asks what the stack holds now.
    Snapshot(tokio::sync::oneshot::Sender<crate::metrics::Snapshot>),
    /// A datagram for the app from a flow's stream.
    Datagram {
        /// The flow.
        flow: UdpFlow,
        /// Its payload.
        payload: Vec<u8>,
    },
    /// A flow's task has ended.
    FlowEnded {
        /// The flow.
        flow: UdpFlow,
        /// Which task it was.
        id: u64,
    },
}

/// What ended the stack's sleep.
enum Woke {
    Tap(std::io::Result<()>),
    Ready,
    Event(Event),
    Timer,
    Tick,
}

/// Settings the stack needs.
#[derive(Debug, Clone)]
pub struct Settings {
    /// The enclave kernel's TAP address and prefix.
    pub address: (Ipv4Addr, u8),
    /// The stack's own address.
    pub gateway: Ipv4Addr,
    /// Where egress streams go.
    pub host: LinkAddr,
    /// Bound on each connection's set-up.
    pub connect_timeout: Duration,
    /// Per-socket buffer, each direction, in bytes.
    pub buffer: usize,
    /// The most ingress connections at once.
    pub max_ingress: usize,
    /// The most egress connections at once, those still waiting on host-proxy included.
    pub max_egress: usize,
    /// The most egress connections waiting on host-proxy for one destination: a slow or
    /// black-holed destination delays only its own connections.
    pub max_pending_per_destination: usize,
    /// Whether the stack answers DNS at the gateway (UDP and TCP port 53).
    pub dns: bool,
    /// A UDP flow's idle timeout.
    pub udp_idle: Duration,
    /// The most UDP flows (DNS included) at once.
    pub max_udp_flows: usize,
    /// The TAP's MTU.
    pub mtu: usize,
}

/// A map keyed by flows and connections, looked up for every frame.
///
/// SipHash, std's default, cost measurable CPU per frame. FxHash would be cheaper still, but it
/// is unkeyed, and these keys are chosen by untrusted parties (the client's address and port
/// come from the internet through the parent, egress destinations from the enclave's
/// applications): with a fixed hash they could be picked to collide, turning every look-up into
/// a walk. aHash is randomly keyed at start (from the OS) and built to resist that.
pub type FlowMap<K, V> = HashMap<K, V, ahash::RandomState>;

/// Connections that want servicing, and the wake-up for the stack task.
///
/// # Never a lost wake-up, and no needless one
///
/// A [`ConnWaker`] fires from the stack task itself far more often than from outside: smoltcp
/// wakes a socket's wakers while the stack feeds it a frame, and the connection is then
/// serviced in the same turn. If every wake notified the `Notify`, each of those would leave a
/// permit behind, and the loop would later wake for it only to find nothing to do (under
/// memcaslap: half of all notifications, about one empty turn in five transactions). So a waker
/// notifies only while the stack is `asleep`:
/// - The stack sets `asleep` only under the `list` lock, and only after seeing the list empty
///   ([`ReadyQueue::sleep`]); a waker pushes its id and reads `asleep` under the same lock. The
///   lock orders the two: either the push came first, and the stack sees it and does not sleep,
///   or the waker comes after, sees `asleep`, and notifies (a permit is kept if the stack is not
///   waiting yet, so it cannot miss it).
/// - The stack clears `asleep` as soon as it wakes ([`ReadyQueue::awake`]), without the lock:
///   clearing it only spares wakers a notify, which is safe while the stack is awake, since it
///   looks at the list again, under the lock, before it next sleeps. (The stack is the only
///   writer; coherence and the lock keep a waker from reading a stale `false` after the stack
///   has committed to sleep.)
#[derive(Debug, Default)]
struct ReadyQueue {
    list: Mutex<Vec<ConnId>>,
    /// The stack is waiting, or about to wait, on `notify`.
    asleep: AtomicBool,
    notify: Notify,
}

impl ReadyQueue {
    /// Takes the connections queued so far.
    fn take(&self) -> Vec<ConnId> {
        std::mem::take(&mut *self.lock())
    }

    /// Commits the stack to sleeping, if no connection is queued: from then on a wake notifies.
    /// Returns false (and the stack stays awake) if one is.
    fn sleep(&self) -> bool {
        let list = self.lock();
        if !list.is_empty() {
            return false;
        }
        self.asleep.store(true, Ordering::Relaxed);
        true
    }

    /// The list; a panic elsewhere while it was held leaves it whole (a push or a take).
    fn lock(&self) -> std::sync::MutexGuard<'_, Vec<ConnId>> {
        self.list.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// The stack is awake: wakers need not notify until it next commits to sleep.
    fn awake(&self) {
        self.asleep.store(false, Ordering::Relaxed);
    }
}

/// A connection's waker: queues its id once until the stack services it.
struct ConnWaker {
    handle: ConnId,
    queue: Arc<ReadyQueue>,
    queued: AtomicBool,
}

impl Wake for ConnWaker {
    fn wake(self: Arc<Self>) {
        self.wake_by_ref();
    }

    fn wake_by_ref(self: &Arc<Self>) {
        if !self.queued.swap(true, Ordering::AcqRel) {
            // See `ReadyQueue` for why `asleep` is read under the lock, and why that suffices.
            let asleep = {
                let mut list = self.queue.lock();
                list.push(self.handle);
                self.queue.asleep.load(Ordering::Relaxed)
            };
            if asleep {
                self.queue.notify.notify_one();
            }
        }
    }
}

struct Entry {
    conn: Conn,
    waker: Arc<ConnWaker>,
}

/// The stack task's state.
pub struct Stack {
    shards: Shards,
    tap: Tap,
    conns: FlowMap<ConnId, Entry>,
    /// Every flow with a pending stream or a socket.
    flows: FlowMap<FlowKey, Flow>,
    /// New SYNs seen since the stack last looked (at most one read budget's worth): the stack
    /// applies its caps to each and fails the ones past them at once, never silently.
    held: Vec<HeldSyn>,
    queue: Arc<ReadyQueue>,
    events: mpsc::Receiver<Event>,
    events_tx: mpsc::Sender<Event>,
    settings: Settings,
    epoch: Instant,
    next_port: u16,
    counters: Arc<Counters>,
    /// Egress connections waiting on host-proxy, per destination; entries go at zero.
    pending: HashMap<IpEndpoint, usize>,
    pending_total: usize,
    /// Live connections by direction (mirrored in the counters' gauges).
    ingress_live: usize,
    egress_live: usize,
    /// Lent to each connection while it is pumped (see [`crate::conn`]).
    scratch: Box<[u8]>,
    /// DNS and UDP flows (see [`crate::udp`]).
    datagrams: Flows,
    /// UDP datagrams from the enclave that arrive in fragments.
    fragments: Reassembly,
    /// The metrics endpoint, which connections to the gateway's metrics port reach.
    metrics: Option<Arc<crate::metrics::Metrics>>,
}

impl Stack {
    /// Builds the stack over an open TAP. Returns it with the sender other tasks use to reach it.
    pub fn new(
        mut tap: Tap,
        settings: Settings,
        counters: Arc<Counters>,
    ) -> (Stack, mpsc::Sender<Event>) {
        let epoch = Instant::now();
        let seed = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0x656e6574, |d| d.as_nanos() as u64);
        let (_, prefix) = settings.address;
        let (_, mut wire) = tap.split(STACK_MAC, KERNEL_MAC);
        let shards = Shards::new(settings.gateway, prefix, SHARD_SOCKETS, seed, &mut wire);
        let (events_tx, events) = mpsc::channel(1024);
        let datagrams = Flows::new(
            FlowSettings {
                host: settings.host.clone(),
                connect_timeout: settings.connect_timeout,
                dns: settings
                    .dns
                    .then(|| SocketAddrV4::new(settings.gateway, DNS_PORT)),
                udp_idle: settings.udp_idle,
                max_flows: settings.max_udp_flows,
            },
            counters.clone(),
        );
        let stack = Stack {
            shards,
            tap,
            conns: FlowMap::default(),
            flows: FlowMap::default(),
            held: Vec::new(),
            queue: Arc::new(ReadyQueue::default()),
            events,
            events_tx: events_tx.clone(),
            settings,
            epoch,
            next_port: *GATEWAY_PORTS.start(),
            counters,
            pending: HashMap::new(),
            pending_total: 0,
            ingress_live: 0,
            egress_live: 0,
            scratch: vec![0u8; crate::conn::SCRATCH_LEN].into_boxed_slice(),
            datagrams,
            metrics: None,
            fragments: Reassembly::default(),
        };
        (stack, events_tx)
    }

    /// `now` on smoltcp's clock, which counts from `epoch`.
    fn smol(&self, now: Instant) -> smoltcp::time::Instant {
        smoltcp::time::Instant::from_micros(now.duration_since(self.epoch).as_micros() as i64)
    }

    /// A smoltcp deadline on tokio's clock.
    fn tokio_at(&self, at: smoltcp::time::Instant) -> Instant {
        self.epoch + Duration::from_micros(at.total_micros().max(0) as u64)
    }

    /// Reads a bounded burst of frames from the TAP and hands each to where it belongs.
    ///
    /// With TSO on, a frame may be a TCP super-frame carrying several of the sender's segments
    /// ([`crate::packet::VnetHdr`]). Linux acknowledges at least every second full segment; so
    /// does smoltcp, but it counts in the MSS the kernel advertised, which the TAP raised to
    /// 64 KiB ([`Tap::read`]), and would hold the ACK of a smaller super-frame for its delayed-ACK
    /// time, stalling a sender still in slow start. A super-frame is therefore acknowledged at
    /// once, as Linux would, by lifting the socket's ACK delay while it takes the frame. (If a
    /// smaller segment already started smoltcp's delayed-ACK timer, that timer still runs: smoltcp
    /// has no call to cut it short.)
    fn receive(&mut self, now: Instant) {
        let wall = now;
        let now = self.smol(now);
        let flows = &self.flows;
        self.tap
            .forget_mss(flows.len(), |key| !flows.contains_key(key));
        for _ in 0..RX_BUDGET {
            if self.tap.rx_blocked {
                return;
            }
            let Some((range, vnet)) = self.tap.read() else {
                return;
            };
            let (rx, mut wire) = self.tap.split(STACK_MAC, KERNEL_MAC);
            let frame = &rx[range];
            let packet = &frame[ETH_HEADER..];
            let shard = match classify(frame) {
                Frame::Syn(key) => match self.flows.get(&key) {
                    Some(Flow::Active(id)) => Some(id.shard),
                    // A retransmission while host-proxy is asked: the first one is held.
                    Some(Flow::Pending) => continue,
                    None => {
                        self.flows.insert(key, Flow::Pending);
                        self.held.push(HeldSyn {
                            key,
                            frame: frame.to_vec(),
                        });
                        continue;
                    }
                },
                Frame::Tcp(key) => match self.flows.get(&key) {
                    Some(&Flow::Active(id)) => {
                        let several = match vnet.gso() {
                            Gso::Tcp { size } => tcp_segment(packet)
                                .is_some_and(|seg| seg.payload_len > usize::from(size)),
                            _ => false,
                        };
                        if several {
                            let socket = self.shards.socket_mut(id);
                            let delay = socket.ack_delay();
                            socket.set_ack_delay(None);
                            self.shards.receive(Some(id.shard), packet, now, &mut wire);
                            self.shards.socket_mut(id).set_ack_delay(delay);
                            continue;
                        }
                        Some(id.shard)
                    }
                    _ => None,
                },
                Frame::Ip => {
                    let gateway = self.settings.gateway;
                    match crate::udp::capture(frame) {
                        Captured::Other => None,
                        Captured::Datagram(flow, payload) => {
                            self.datagrams
                                .datagram(flow, payload, gateway, &self.events_tx);
                            continue;
                        }
                        Captured::Fragment(ip) => {
                            match self.fragments.push(&ip, wall) {
                                fragments::Outcome::Whole(w) => {
                                    Counters::bump(&self.counters.udp_reassembled);
                                    if let Some((flow, payload)) =
                                        crate::udp::datagram(w.src, w.dst, &w.payload)
                                    {
                                        self.datagrams.datagram(
                                            flow,
                                            payload,
                                            gateway,
                                            &self.events_tx,
                                        );
                                    }
                                }
                                fragments::Outcome::Kept => continue,
                                fragments::Outcome::Dropped(why) => {
                                    debug!(why, "IPv4 fragments dropped");
                                    Counters::bump(&self.counters.udp_dropped);
                                }
                            }
                            continue;
                        }
                    }
                }
                Frame::Arp => {
                    if let Some(reply) = arp_reply(frame, STACK_MAC, self.settings.gateway) {
                        self.tap.send_raw(&reply);
                    }
                    continue;
                }
                Frame::Other => continue,
            };
            self.shards.receive(shard, packet, now, &mut wire);
        }
    }

    /// Sends what the shards that changed have queued, and fires due timers.
    fn transmit(&mut self, now: Instant) {
        let now = self.smol(now);
        let (_, mut wire) = self.tap.split(STACK_MAC, KERNEL_MAC);
        self.shards.poll(now, &mut wire);
    }

    /// Hands one held frame to a shard (the control shard for `None`) at once.
    fn replay(&mut self, shard: Option<u32>, frame: &[u8], now: Instant) {
        let now = self.smol(now);
        let (_, mut wire) = self.tap.split(STACK_MAC, KERNEL_MAC);
        if let Some(packet) = frame.get(ETH_HEADER..) {
            self.shards.receive(shard, packet, now, &mut wire);
        }
    }

    /// Runs until `shutdown` resolves.
    ///
    /// The clock is read once per turn, and every step of the turn takes that `now`; one timer
    /// is reset each turn rather than a new one made.
    pub async fn run(mut self, shutdown: impl std::future::Future<Output = ()>) {
        tokio::pin!(shutdown);
        let mut tick = tokio::time::interval(Duration::from_millis(250));
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let sleep = tokio::time::sleep(Duration::ZERO);
        tokio::pin!(sleep);
        loop {
            let now = Instant::now();
            while let Ok(event) = self.events.try_recv() {
                self.handle_event(event, now);
            }
            self.receive(now);
            for held in std::mem::take(&mut self.held) {
                self.start_egress(held, now);
            }
            for id in self.queue.take() {
                self.service(id, now);
            }
            self.transmit(now);
            let busy = !self.tap.rx_blocked || !self.queue.sleep();
            if busy {
                // Let the accept and connect tasks run, then go round again without sleeping;
                // under steady load the loop may never sleep, so look at the signal and the
                // deadline tick here too.
                tokio::task::yield_now().await;
                if (&mut shutdown).now_or_never().is_some() {
                    break;
                }
                if tick.tick().now_or_never().is_some() {
                    self.check_deadlines();
                }
                continue;
            }
            // An absolute deadline: no clock read. One already past fires at once.
            let at = self.shards.poll_at();
            let deadline = at.map_or(now + Duration::from_secs(3600), |at| self.tokio_at(at));
            sleep.as_mut().reset(deadline);
            let woke = tokio::select! {
                biased;
                _ = &mut shutdown => break,
                r = self.tap.readable() => Woke::Tap(r),
                _ = self.queue.notify.notified() => Woke::Ready,
                Some(event) = self.events.recv() => Woke::Event(event),
                _ = &mut sleep => Woke::Timer,
                _ = tick.tick() => Woke::Tick,
            };
            // Before anything that could fire a waker.
            self.queue.awake();
            match woke {
                Woke::Tap(Ok(())) => self.tap.rx_blocked = false,
                Woke::Tap(Err(e)) => {
                    warn!("TAP readiness failed: {e}");
                    tokio::time::sleep(Duration::from_millis(10)).await;
                }
                Woke::Event(event) => self.handle_event(event, Instant::now()),
                Woke::Tick => self.check_deadlines(),
                Woke::Ready | Woke::Timer => {}
            }
        }
        info!(
            connections = self.conns.len(),
            shards = self.shards.count(),
            tap.tx_dropped = self.tap.stats.tx_dropped,
            "stack stopped"
        );
    }

    fn handle_event(&mut self, event: Event, now: Instant) {
        match event {
            Event::Egress { held, result, span } => self.finish_egress(held, result, span, now),
            Event::Ingress {
                header,
                link,
                span,
                routed,
            } => self.start_ingress(header, link, span, routed, now),
            Event::Datagram { flow, payload } => {
                let tap = &mut self.tap;
                let frames = crate::udp::reply_frames(
                    &flow,
                    &payload,
                    self.settings.mtu,
                    STACK_MAC,
                    KERNEL_MAC,
                    |frame| tap.send_raw(frame),
                );
                match frames {
                    None => {
                        debug!(
                            ?flow,
                            len = payload.len(),
                            "datagram larger than IPv4 allows dropped"
                        );
                        Counters::bump(self.datagrams.dropped_counter(&flow));
                    }
                    Some(n) if n > 1 => Counters::bump(&self.counters.udp_fragmented),
                    Some(_) => {}
                }
            }
            Event::FlowEnded { flow, id } => self.datagrams.ended(flow, id),
            Event::Snapshot(reply) => {
                let _ = reply.send(self.snapshot());
            }
            Event::UdpIngress {
                header,
                link,
                routed,
            } => {
                let (enclave, gateway) = (self.settings.address.0, self.settings.gateway);
                self.datagrams
                    .ingress(header, link, routed, (enclave, gateway), &self.events_tx);
            }
        }
    }

    /// Asks host-proxy for the connection a new SYN wants.
    fn start_egress(&mut self, held: HeldSyn, now: Instant) {
        let span = info_span!(
            "egress",
            tcp.src = %SocketAddr::from(held.key.local),
            tcp.dst = %SocketAddr::from(held.key.remote),
        );
        let dst = held.key.remote;
        let waiting = self.pending.get(&dst).copied().unwrap_or(0);
        let why = if self.egress_live + self.pending_total >= self.settings.max_egress {
            Some("egress connection cap reached")
        } else if waiting >= self.settings.max_pending_per_destination {
            Some("too many connections waiting on this destination")
        } else {
            None
        };
        if let Some(why) = why {
            // Fail the application's connect() at once rather than drop its SYN.
            debug!(parent: &span, "{why}; failing the connect");
            Counters::bump(self.counters.capped.at(common::metrics::Direction::Egress));
            self.flows.remove(&held.key);
            self.fail_syn(held.frame, Status::Unreachable, now);
            return;
        }
        *self.pending.entry(dst).or_insert(0) += 1;
        self.pending_total += 1;
        // TCP to the gateway's port 53 is DNS over TCP, for host-proxy to carry to a resolver.
        let dns = self.settings.dns
            && held.key.remote
                == IpEndpoint::new(self.settings.gateway.into(), crate::udp::DNS_PORT);
        let header = Header {
            kind: if dns { Kind::DnsTcp } else { Kind::TcpEgress },
            src: held.key.local.into(),
            dst: held.key.remote.into(),
        };
        let gateway = IpAddress::Ipv4(self.settings.gateway);
        if let Some(metrics) = self
            .metrics
            .as_ref()
            .filter(|m| held.key.remote == IpEndpoint::new(gateway, m.port))
        {
            // Served here, not by host-proxy.
            let result = crate::metrics::local_stream(metrics);
            self.finish_egress(held, result, span, now);
            return;
        }
        let host = self.settings.host.clone();
        let limit = self.settings.connect_timeout;
        let events = self.events_tx.clone();
        tokio::spawn(
            async move {
                let result = crate::egress::open(&host, &header, limit).await;
                let span = Span::current();
                let _ = events.send(Event::Egress { held, result, span }).await;
            }
            .instrument(span),
        );
    }

    /// Completes the handshake with the app if host-proxy connected, or makes its connect fail.
    fn finish_egress(
        &mut self,
        held: HeldSyn,
        result: Result<Stream, Status>,
        span: Span,
        now: Instant,
    ) {
        let key = held.key;
        if let Some(waiting) = self.pending.get_mut(&key.remote) {
            *waiting -= 1;
            if *waiting == 0 {
                self.pending.remove(&key.remote);
            }
        }
        self.pending_total = self.pending_total.saturating_sub(1);
        let link = match result {
            Ok(link) => link,
            Err(status) => {
                debug!(parent: &span, "egress failed: {status}");
                self.counters
                    .failure(status, common::metrics::Direction::Egress);
                self.flows.remove(&key);
                self.fail_syn(held.frame, status, now);
                return;
            }
        };
        let (_, mut wire) = self.tap.split(STACK_MAC, KERNEL_MAC);
        let id = self.shards.add(new_socket(self.settings.buffer), &mut wire);
        if let Err(e) = self.shards.socket_mut(id).listen(key.remote) {
            common::warn_limited!("cannot listen on {}: {e}", key.remote);
            self.shards.remove_now(id);
            self.flows.remove(&key);
            self.fail_syn(held.frame, Status::Unreachable, now);
            return;
        }
        self.flows.insert(key, Flow::Active(id));
        // Process the replayed SYN now, in the socket's own shard, where it is the only socket
        // listening on this destination.
        self.replay(Some(id.shard), &held.frame, now);
        let socket = self.shards.socket(id);
        if socket.remote_endpoint() != Some(key.local) {
            common::warn_limited!(state = %socket.state(), "replayed SYN was not taken");
            self.shards.socket_mut(id).abort();
            self.shards.remove_later(id);
            self.flows.remove(&key);
            return;
        }
        Counters::bump(self.counters.opened.at(common::metrics::Direction::Egress));
        debug!(parent: &span, "destination connected; completing the enclave handshake");
        self.add_conn(id, link, key, Kind::TcpEgress, span, now);
    }

    /// Makes the application's connect fail: RST for `refused`, ICMP otherwise.
    fn fail_syn(&mut self, frame: Vec<u8>, status: Status, now: Instant) {
        match status {
            // With no socket listening, the control shard answers the replayed SYN with a RST.
            Status::Refused => self.replay(None, &frame, now),
            other => {
                let why = if other == Status::Denied {
                    Unreachable::Prohibited
                } else {
                    Unreachable::Host
                };
                if let Some(icmp) = icmp_unreachable(&frame, STACK_MAC, self.settings.gateway, why)
                {
                    self.tap.send_raw(&icmp);
                }
            }
        }
    }

    fn start_ingress(
        &mut self,
        header: Header,
        link: Stream,
        span: Span,
        routed: bool,
        now: Instant,
    ) {
        let (tap_addr, _) = self.settings.address;
        let remote = IpEndpoint::new(IpAddress::Ipv4(tap_addr), header.dst.port());
        let refuse = |link: Stream, status: Status, counters: &Counters| {
            counters.failure(status, common::metrics::Direction::Ingress);
            crate::ingress::refuse(link, status, span.clone());
        };
        if self.ingress_live >= self.settings.max_ingress {
            debug!(parent: &span, "ingress connection cap reached, refusing");
            Counters::bump(self.counters.capped.at(common::metrics::Direction::Ingress));
            return refuse(link, Status::Unreachable, &self.counters);
        }
        let Some(source) = self.ingress_source(header.src, routed, remote) else {
            common::warn_limited!("no free source port for a gateway-sourced connection");
            return refuse(link, Status::Unreachable, &self.counters);
        };
        let key = FlowKey {
            local: remote,
            remote: source,
        };
        if self.flows.contains_key(&key) {
            debug!(parent: &span, "duplicate ingress flow from {}", header.src);
            return refuse(link, Status::BadRequest, &self.counters);
        }
        let (_, mut wire) = self.tap.split(STACK_MAC, KERNEL_MAC);
        let id = self.shards.add(new_socket(self.settings.buffer), &mut wire);
        if let Err(e) = self.shards.connect(id, remote, source) {
            common::warn_limited!("cannot connect {source} -> {remote}: {e}");
            self.shards.remove_now(id);
            return refuse(link, Status::BadRequest, &self.counters);
        }
        if source.addr == IpAddress::Ipv4(self.settings.gateway) {
            debug!(parent: &span, %source, "client cannot be a source on the TAP; using the gateway");
        }
        self.flows.insert(key, Flow::Active(id));
        self.add_conn(id, link, key, Kind::TcpIngress, span, now);
    }

    /// The source for an ingress connection: the real client if the enclave kernel routes it
    /// back out of the TAP (`routed`, decided off this task by [`crate::netlink::Routes::check`]),
    /// otherwise the gateway with a free port.
    fn ingress_source(
        &mut self,
        client: SocketAddr,
        routed: bool,
        remote: IpEndpoint,
    ) -> Option<IpEndpoint> {
        if let Some(ip) = ipv4_of(client.ip()).filter(|_| routed) {
            return Some(IpEndpoint::new(IpAddress::Ipv4(ip), client.port()));
        }
        let gateway = IpAddress::Ipv4(self.settings.gateway);
        let span = u32::from(GATEWAY_PORTS.end() - GATEWAY_PORTS.start()) + 1;
        for _ in 0..span {
            let port = self.next_port;
            self.next_port = if port >= *GATEWAY_PORTS.end() {
                *GATEWAY_PORTS.start()
            } else {
                port + 1
            };
            let candidate = IpEndpoint::new(gateway, port);
            if !self.flows.contains_key(&FlowKey {
                local: remote,
                remote: candidate,
            }) {
                return Some(candidate);
            }
        }
        None
    }

    fn add_conn(
        &mut self,
        handle: ConnId,
        link: Stream,
        key: FlowKey,
        kind: Kind,
        span: Span,
        now: Instant,
    ) {
        let waker = Arc::new(ConnWaker {
            handle,
            queue: self.queue.clone(),
            queued: AtomicBool::new(false),
        });
        let deadline = now + self.settings.connect_timeout;
        let conn = Conn::new(link, key, kind, deadline, Waker::from(waker.clone()), span);
        self.conns.insert(handle, Entry { conn, waker });
        self.count_live(kind, true);
        self.service(handle, now);
    }

    fn service(&mut self, handle: ConnId, now: Instant) {
        let Some(entry) = self.conns.get_mut(&handle) else {
            return;
        };
        entry.waker.queued.store(false, Ordering::Release);
        let socket = self.shards.socket_mut(handle);
        let was_connecting = matches!(entry.conn.state, ConnState::Connecting { .. });
        let outcome = entry.conn.pump(socket, now, &mut self.scratch);
        if was_connecting
            && entry.conn.kind == Kind::TcpIngress
            && !matches!(entry.conn.state, ConnState::Connecting { .. })
        {
            Counters::bump(self.counters.opened.at(common::metrics::Direction::Ingress));
        }
        if outcome == Outcome::Keep {
            socket.register_recv_waker(&entry.conn.waker);
            socket.register_send_waker(&entry.conn.waker);
            return;
        }
        let Some(Entry { conn, .. }) = self.conns.remove(&handle) else {
            return;
        };
        self.count_live(conn.kind, false);
        let span = conn.span.clone();
        match outcome {
            Outcome::Done => {
                debug!(parent: &span, bytes.to_enclave = conn.to_app, bytes.from_enclave = conn.from_app, "connection closed")
            }
            Outcome::Reset => {
                Counters::bump(self.counters.reset.at(direction_of(conn.kind)));
                debug!(parent: &span, bytes.to_enclave = conn.to_app, bytes.from_enclave = conn.from_app, "connection reset")
            }
            Outcome::Refuse(status) => {
                debug!(parent: &span, "enclave answered {status}");
                self.counters
                    .failure(status, common::metrics::Direction::Ingress);
                crate::ingress::refuse(conn.link, status, span);
                self.shards.remove_later(handle);
                self.flows.remove(&conn.key);
                return;
            }
            Outcome::Keep => {}
        }
        self.counters
            .bytes_to_enclave
            .fetch_add(conn.to_app, Ordering::Relaxed);
        self.counters
            .bytes_from_enclave
            .fetch_add(conn.from_app, Ordering::Relaxed);
        self.flows.remove(&conn.key);
        // The socket stays until its shard's next poll has sent whatever it still owes (a RST
        // after abort, the last ACK).
        self.shards.remove_later(handle);
    }

    /// Serves connections to the gateway's `metrics.port` from `metrics`.
    pub fn set_metrics(&mut self, metrics: Option<Arc<crate::metrics::Metrics>>) {
        self.metrics = metrics;
    }

    /// What the stack holds now, for metrics.
    fn snapshot(&self) -> crate::metrics::Snapshot {
        let mut s = crate::metrics::Snapshot {
            tap: self.tap.stats,
            sockets: self.conns.len(),
            pending: self.pending_total,
            capacity: self.conns.len() * 2 * self.settings.buffer,
            ..Default::default()
        };
        for (id, entry) in &self.conns {
            let socket = self.shards.socket(*id);
            s.received += socket.recv_queue();
            s.sending += socket.send_queue();
            s.backlog += entry.conn.backlog_len();
        }
        s
    }

    /// Services connections whose set-up or drain deadline has passed, so that it is enforced
    /// even if nothing else wakes them.
    fn check_deadlines(&mut self) {
        let now = Instant::now();
        let due: Vec<ConnId> = self
            .conns
            .iter()
            .filter(|(_, e)| e.conn.deadline().is_some_and(|d| d <= now))
            .map(|(h, _)| *h)
            .collect();
        for handle in due {
            self.service(handle, now);
        }
    }

    /// Keeps the live-connection counts and their gauges.
    fn count_live(&mut self, kind: Kind, up: bool) {
        let (count, gauge) = match kind {
            Kind::TcpIngress => (&mut self.ingress_live, &self.counters.live_ingress),
            // DNS over TCP is an egress connection of the app's.
            _ => (&mut self.egress_live, &self.counters.live_egress),
        };
        if up {
            *count += 1;
            gauge.fetch_add(1, Ordering::Relaxed);
        } else {
            *count -= 1;
            gauge.fetch_sub(1, Ordering::Relaxed);
        }
    }
}

/// A TCP socket configured as every carried connection's is: `buffer` bytes each way, CUBIC
/// congestion control (without it smoltcp has been measured 20% slower, DESIGN.md), no Nagle
/// (the far side's application chose its own batching), keep-alive to find dead peers.
pub fn new_socket(buffer: usize) -> tcp::Socket<'static> {
    // `vec![0; n]` comes from calloc, so an idle connection's pages are never touched and cost
    // no resident memory until data flows.
    let rx = tcp::SocketBuffer::new(vec![0u8; buffer]);
    let tx = tcp::SocketBuffer::new(vec![0u8; buffer]);
    let mut socket = tcp::Socket::new(rx, tx);
    socket.set_congestion_control(CongestionControl::Cubic);
    socket.set_nagle_enabled(false);
    socket.set_keep_alive(Some(smoltcp::time::Duration::from_secs(60)));
    socket.set_timeout(Some(smoltcp::time::Duration::from_secs(180)));
    socket
}

fn ipv4_of(ip: IpAddr) -> Option<Ipv4Addr> {
    match ip {
        IpAddr::V4(v4) => Some(v4),
        IpAddr::V6(v6) => v6.to_ipv4_mapped(),
    }
}

/// Which way a connection of `kind` goes, for the counters.
fn direction_of(kind: Kind) -> common::metrics::Direction {
    if kind == Kind::TcpIngress {
        common::metrics::Direction::Ingress
    } else {
        common::metrics::Direction::Egress
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A connection's waker on `queue`, kept as its `ConnWaker` so the test can clear `queued`
    /// as [`Stack::service`] does.
    fn conn_waker(queue: &Arc<ReadyQueue>) -> (ConnId, Arc<ConnWaker>) {
        let mut set = smoltcp::iface::SocketSet::new(vec![]);
        let id = ConnId {
            shard: 1,
            handle: set.add(new_socket(64)),
        };
        let waker = Arc::new(ConnWaker {
            handle: id,
            queue: queue.clone(),
            queued: AtomicBool::new(false),
        });
        (id, waker)
    }

    fn permit(queue: &ReadyQueue) -> bool {
        queue.notify.notified().now_or_never().is_some()
    }

    /// A wake while the stack runs only queues the connection (a permit would cost an empty
    /// turn later); one after the stack committed to sleep notifies too; and the stack never
    /// commits to sleep past a queued connection.
    #[test]
    fn wakes_notify_only_a_sleeping_stack() {
        let queue = Arc::new(ReadyQueue::default());
        let (id, waker) = conn_waker(&queue);
        waker.wake_by_ref();
        assert!(!permit(&queue), "the running stack was notified");
        assert!(!queue.sleep(), "slept with a connection queued");
        assert_eq!(queue.take(), [id]);
        waker.queued.store(false, Ordering::Release);

        assert!(queue.sleep());
        let from_elsewhere = waker.clone();
        std::thread::spawn(move || Waker::from(from_elsewhere).wake())
            .join()
            .unwrap();
        assert!(permit(&queue), "the sleeping stack was not notified");
        queue.awake();
        assert_eq!(queue.take(), [id]);
        waker.queued.store(false, Ordering::Release);
        waker.wake_by_ref();
        assert!(!permit(&queue));
    }

    /// Another thread wakes a connection again as soon as the stack has taken it, at every
    /// point of the stack's turn: the stack, run as `Stack::run` runs it, sees every wake and
    /// never sleeps through one.
    #[tokio::test]
    async fn no_wake_is_lost_between_threads() {
        const WAKES: usize = 20_000;
        let queue = Arc::new(ReadyQueue::default());
        let (_, waker) = conn_waker(&queue);
        let other = waker.clone();
        let thread = std::thread::spawn(move || {
            for i in 0..WAKES {
                while other.queued.load(Ordering::Acquire) {
                    std::hint::spin_loop();
                }
                if i % 7 == 0 {
                    std::thread::yield_now();
                }
                other.wake_by_ref();
            }
        });
        let mut seen = 0;
        loop {
            for _ in queue.take() {
                waker.queued.store(false, Ordering::Release);
                seen += 1;
            }
            if seen == WAKES {
                break;
            }
            if queue.sleep() {
                let woke = tokio::time::timeout(Duration::from_secs(5), queue.notify.notified());
                woke.await
                    .unwrap_or_else(|_| panic!("wake {seen} was lost: the stack slept through it"));
            }
            queue.awake();
        }
        thread.join().unwrap();
    }
}
