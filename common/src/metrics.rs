//! Connection and byte counters kept beside the logs (firecracker's vsock `METRICS` is the model).
//!
//! Monotonic counters and two gauges of live connections. Every daemon logs them all on one line
//! at exit and whenever it receives SIGUSR1 ([`log_on_sigusr1`]).

use std::sync::atomic::{AtomicU64, Ordering::Relaxed};

/// Which way a connection (or UDP flow) goes: into the enclave, from a client of a published
/// port, or out of it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Direction {
    /// Into the enclave.
    Ingress,
    /// Out of the enclave.
    Egress,
}

impl Direction {
    /// `ingress` or `egress`, as in logs and metric labels.
    pub fn label(self) -> &'static str {
        match self {
            Direction::Ingress => "ingress",
            Direction::Egress => "egress",
        }
    }
}

/// A count kept per direction.
#[derive(Debug, Default)]
pub struct PerDirection([AtomicU64; 2]);

impl PerDirection {
    /// The count for `direction`.
    pub fn at(&self, direction: Direction) -> &AtomicU64 {
        &self.0[direction as usize]
    }

    /// Both directions together.
    pub fn total(&self) -> u64 {
        self.0.iter().map(|c| c.load(Relaxed)).sum()
    }
}

/// Counters for one daemon.
#[derive(Debug, Default)]
pub struct Counters {
    /// Connections that reached the `ok` status.
    pub opened: PerDirection,
    /// Connections the destination refused.
    pub refused: PerDirection,
    /// Connections policy denied.
    pub denied: PerDirection,
    /// Connections that failed otherwise (unreachable, timed out, bad request, link down).
    pub failed: PerDirection,
    /// Connections turned away by a cap (total, per client or per destination).
    pub capped: PerDirection,
    /// Connections that ended with an error or reset rather than two clean closes.
    pub reset: PerDirection,
    /// Connections closed because they were idle too long.
    pub idle_closed: PerDirection,
    /// Payload bytes carried client->enclave (ingress) or world->enclave (egress replies).
    pub bytes_to_enclave: AtomicU64,
    /// Payload bytes carried enclave->client or enclave->world.
    pub bytes_from_enclave: AtomicU64,
    /// Ingress connections alive now (gauge), from set-up to the end.
    pub live_ingress: AtomicU64,
    /// Egress connections alive now (gauge), from set-up to the end.
    pub live_egress: AtomicU64,
    /// DNS queries from the enclave forwarded to a resolver.
    pub dns_queries: AtomicU64,
    /// DNS queries answered SERVFAIL because no resolver answered.
    pub dns_servfail: AtomicU64,
    /// DNS datagrams dropped: not a query, a flow cap or a full window.
    pub dns_dropped: AtomicU64,
    /// UDP flows opened.
    pub udp_flows: AtomicU64,
    /// UDP flows alive now (gauge).
    pub live_udp: AtomicU64,
    /// UDP datagrams dropped: a flow cap, a full queue or window, a socket that refused it.
    pub udp_dropped: AtomicU64,
    /// Datagrams from the enclave that came in IPv4 fragments and were joined (enclave-proxy).
    pub udp_reassembled: AtomicU64,
    /// Datagrams into the enclave larger than the TAP's MTU, sent as IPv4 fragments
    /// (enclave-proxy).
    pub udp_fragmented: AtomicU64,
}

impl Counters {
    /// Adds one to a counter.
    pub fn bump(counter: &AtomicU64) {
        counter.fetch_add(1, Relaxed);
    }

    /// Counts a connection going `direction` that ended with a failure `status`.
    pub fn failure(&self, status: crate::wire::Status, direction: Direction) {
        use crate::wire::Status;
        Self::bump(
            match status {
                Status::Refused => &self.refused,
                Status::Denied => &self.denied,
                _ => &self.failed,
            }
            .at(direction),
        );
    }

    /// Counts one live connection in `gauge` until the returned guard drops.
    pub fn live<'a>(&'a self, gauge: &'a AtomicU64) -> LiveGuard<'a> {
        gauge.fetch_add(1, Relaxed);
        LiveGuard(gauge)
    }

    /// Logs every counter on one line.
    pub fn log(&self, who: &str) {
        tracing::info!(
            opened = self.opened.total(),
            refused = self.refused.total(),
            denied = self.denied.total(),
            failed = self.failed.total(),
            capped = self.capped.total(),
            reset = self.reset.total(),
            idle_closed = self.idle_closed.total(),
            bytes.to_enclave = self.bytes_to_enclave.load(Relaxed),
            bytes.from_enclave = self.bytes_from_enclave.load(Relaxed),
            live.ingress = self.live_ingress.load(Relaxed),
            live.egress = self.live_egress.load(Relaxed),
            dns.queries = self.dns_queries.load(Relaxed),
            dns.servfail = self.dns_servfail.load(Relaxed),
            dns.dropped = self.dns_dropped.load(Relaxed),
            udp.flows = self.udp_flows.load(Relaxed),
            live.udp = self.live_udp.load(Relaxed),
            udp.dropped = self.udp_dropped.load(Relaxed),
            udp.reassembled = self.udp_reassembled.load(Relaxed),
            udp.fragmented = self.udp_fragmented.load(Relaxed),
            "{who} counters"
        );
    }
}

/// Decrements a live-connection gauge when dropped (see [`Counters::live`]).
#[derive(Debug)]
pub struct LiveGuard<'a>(&'a AtomicU64);

impl Drop for LiveGuard<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Relaxed);
    }
}

/// Logs `counters` each time SIGUSR1 arrives; runs until cancelled.
pub async fn log_on_sigusr1(counters: &Counters, who: &str) {
    use tokio::signal::unix::{signal, SignalKind};
    let Ok(mut usr1) = signal(SignalKind::user_defined1()) else {
        return std::future::pending().await;
    };
    while usr1.recv().await.is_some() {
        counters.log(who);
    }
}
