//! What bounds each party: connection caps and TCP keep-alive.
//!
//! - Ingress and egress have caps of their own, so a flood of clients cannot shut out the
//!   enclave's outgoing connections, nor the reverse.
//! - Each ingress client address has a cap, so one internet host cannot take every ingress slot.
//!   IPv6 clients are counted per /64: one host usually holds a whole /64, and counting per
//!   address would let it pick a fresh address for every connection.
//! - A cap is held as an RAII permit for the whole life of the connection's task, so it is given
//!   back however the connection ends: a clean close, a reset, an error, or the task being
//!   dropped at shutdown. The per-client table drops an address when its count reaches zero, so
//!   it never holds more entries than there are live ingress connections.
//!
//! Sans-IO apart from [`keepalive`], which only sets socket options.

use std::collections::HashMap;
use std::net::{IpAddr, Ipv6Addr};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Mutex, PoisonError};
use std::time::Duration;

use socket2::{SockRef, TcpKeepalive};
use tokio::net::TcpStream;

use crate::policy::canonical;

/// Idle time before the first keep-alive probe. Below the 350 s idle timeout of AWS's NAT gateway
/// and Network Load Balancer, so the probes also keep those middleboxes' flow entries alive.
pub const KEEPALIVE_IDLE: Duration = Duration::from_secs(60);
/// Time between unanswered probes.
pub const KEEPALIVE_INTERVAL: Duration = Duration::from_secs(10);
/// Unanswered probes before the kernel resets the connection: a vanished peer is detected about
/// two minutes (60 s + 6 × 10 s) after it went silent. One probe a minute per idle connection is
/// about 270 small packets a second at 16,384 connections.
pub const KEEPALIVE_PROBES: u32 = 6;

/// Turns on TCP keep-alive (the constants above) and `TCP_NODELAY` on a socket toward a client or
/// a destination. Failing only loses the early detection, so errors are ignored.
pub fn keepalive(tcp: &TcpStream) {
    let _ = tcp.set_nodelay(true);
    let params = TcpKeepalive::new()
        .with_time(KEEPALIVE_IDLE)
        .with_interval(KEEPALIVE_INTERVAL)
        .with_retries(KEEPALIVE_PROBES);
    let _ = SockRef::from(tcp).set_tcp_keepalive(&params);
}

/// Which cap turned a connection away.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum Capped {
    /// `--max-ingress` connections are already carried.
    #[error("ingress cap of {0} connections reached")]
    Ingress(usize),
    /// `--max-egress` connections are already carried.
    #[error("egress cap of {0} connections reached")]
    Egress(usize),
    /// This client already has `--max-per-client` connections.
    #[error("per-client cap of {0} connections reached")]
    Client(usize),
}

/// A count that may not pass `max`.
#[derive(Debug)]
struct Gate {
    max: usize,
    used: AtomicUsize,
}

impl Gate {
    fn new(max: usize) -> Gate {
        Gate {
            max,
            used: AtomicUsize::new(0),
        }
    }

    fn try_enter(&self) -> bool {
        self.used
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| {
                (n < self.max).then_some(n + 1)
            })
            .is_ok()
    }

    fn leave(&self) {
        self.used.fetch_sub(1, Ordering::AcqRel);
    }
}

/// The connection caps of one host-proxy.
#[derive(Debug)]
pub struct Caps {
    ingress: Gate,
    egress: Gate,
    per_client: usize,
    /// Live ingress connections per client key; an entry exists only while its count is non-zero.
    clients: Mutex<HashMap<IpAddr, usize>>,
}

impl Caps {
    /// Caps of `max_ingress` and `max_egress` connections, and `per_client` ingress connections
    /// from one client.
    pub fn new(max_ingress: usize, max_egress: usize, per_client: usize) -> Caps {
        Caps {
            ingress: Gate::new(max_ingress),
            egress: Gate::new(max_egress),
            per_client,
            clients: Mutex::new(HashMap::new()),
        }
    }

    /// Admits one ingress connection from `client`, or says which cap is full.
    pub fn ingress(&self, client: IpAddr) -> Result<IngressPermit<'_>, Capped> {
        let key = client_key(client);
        // The table lock is held across the gate so that a refusal by the total cap leaves no
        // entry behind.
        let mut clients = self.clients.lock().unwrap_or_else(PoisonError::into_inner);
        let count = clients.get(&key).copied().unwrap_or(0);
        if count >= self.per_client {
            return Err(Capped::Client(self.per_client));
        }
        if !self.ingress.try_enter() {
            return Err(Capped::Ingress(self.ingress.max));
        }
        clients.insert(key, count + 1);
        Ok(IngressPermit { caps: self, key })
    }

    /// Admits one egress connection, or says the cap is full.
    pub fn egress(&self) -> Result<EgressPermit<'_>, Capped> {
        if self.egress.try_enter() {
            Ok(EgressPermit(self))
        } else {
            Err(Capped::Egress(self.egress.max))
        }
    }

    /// How many client keys have live ingress connections.
    pub fn clients(&self) -> usize {
        self.clients
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .len()
    }

    fn release_client(&self, key: IpAddr) {
        let mut clients = self.clients.lock().unwrap_or_else(PoisonError::into_inner);
        if let Some(count) = clients.get_mut(&key) {
            *count -= 1;
            if *count == 0 {
                clients.remove(&key);
            }
        }
        self.ingress.leave();
    }
}

/// The key a client is counted under: its IPv4 address (mapped or not), or its IPv6 /64.
pub fn client_key(ip: IpAddr) -> IpAddr {
    match canonical(ip) {
        IpAddr::V6(v6) => {
            let net = u128::from(v6) & !(u128::from(u64::MAX));
            IpAddr::V6(Ipv6Addr::from(net))
        }
        v4 => v4,
    }
}

/// One admitted ingress connection; gives back its slots when dropped.
#[derive(Debug)]
pub struct IngressPermit<'a> {
    caps: &'a Caps,
    key: IpAddr,
}

impl Drop for IngressPermit<'_> {
    fn drop(&mut self) {
        self.caps.release_client(self.key);
    }
}

/// One admitted egress connection; gives back its slot when dropped.
#[derive(Debug)]
pub struct EgressPermit<'a>(&'a Caps);

impl Drop for EgressPermit<'_> {
    fn drop(&mut self) {
        self.0.egress.leave();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    #[test]
    fn per_client_cap_leaves_room_for_others() {
        let caps = Caps::new(100, 100, 2);
        let a1 = caps.ingress(ip("198.51.100.1")).unwrap();
        let _a2 = caps.ingress(ip("198.51.100.1")).unwrap();
        assert_eq!(
            caps.ingress(ip("198.51.100.1")).unwrap_err(),
            Capped::Client(2)
        );
        // The same client, spelled as a mapped address by a dual-stack listener.
        assert_eq!(
            caps.ingress(ip("::ffff:198.51.100.1")).unwrap_err(),
            Capped::Client(2)
        );
        let _b = caps.ingress(ip("198.51.100.2")).unwrap();
        drop(a1);
        let _a3 = caps.ingress(ip("198.51.100.1")).unwrap();
    }

    #[test]
    fn total_caps_are_separate() {
        let caps = Caps::new(2, 1, 10);
        let _i1 = caps.ingress(ip("198.51.100.1")).unwrap();
        let _i2 = caps.ingress(ip("198.51.100.2")).unwrap();
        assert_eq!(
            caps.ingress(ip("198.51.100.3")).unwrap_err(),
            Capped::Ingress(2)
        );
        // A full ingress side leaves egress alone, and the refused client left no entry.
        assert_eq!(caps.clients(), 2);
        let e = caps.egress().unwrap();
        assert_eq!(caps.egress().unwrap_err(), Capped::Egress(1));
        drop(e);
        let _e = caps.egress().unwrap();
    }

    #[test]
    fn client_table_empties_when_connections_end() {
        let caps = Caps::new(10_000, 1, 10_000);
        let permits: Vec<_> = (0..1000u32)
            .map(|n| {
                let a = std::net::Ipv4Addr::from(0xC633_6400 + n);
                caps.ingress(IpAddr::V4(a)).unwrap()
            })
            .collect();
        assert_eq!(caps.clients(), 1000);
        drop(permits);
        assert_eq!(caps.clients(), 0);
        assert_eq!(caps.ingress.used.load(Ordering::Relaxed), 0);
    }

    #[test]
    fn ipv6_clients_count_per_64() {
        let caps = Caps::new(100, 100, 1);
        let _a = caps.ingress(ip("2001:db8:1:2::1")).unwrap();
        assert_eq!(
            caps.ingress(ip("2001:db8:1:2:ffff::9")).unwrap_err(),
            Capped::Client(1)
        );
        let _b = caps.ingress(ip("2001:db8:1:3::1")).unwrap();
        assert_eq!(client_key(ip("2001:db8:1:2:3:4:5:6")), ip("2001:db8:1:2::"));
        assert_eq!(client_key(ip("::ffff:10.0.0.1")), ip("10.0.0.1"));
    }
}
