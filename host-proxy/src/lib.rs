//! host-proxy: the parent-instance half of enclave-net.
//!
//! - [`ingress`]: accepts TCP on published ports and opens one stream per connection to
//!   enclave-proxy, naming the real client and the enclave port.
//! - [`egress`]: accepts streams from enclave-proxy, applies the [`policy`], connects to the
//!   destination and answers with a status.
//! - [`limits`]: the caps (ingress, egress, per client) and TCP keep-alive both use.
//! - [`splice`]: the byte pump both use once a connection is up.
#![forbid(unsafe_code)]

pub mod config;
pub mod dns;
pub mod egress;
pub mod ingress;
pub mod limits;
pub mod metrics;
pub mod policy;
pub mod publish;
pub mod reload;
pub mod splice;
pub mod transparent;
pub mod udp;

use std::net::IpAddr;
use std::sync::Arc;
use std::time::Duration;

use common::metrics::Counters;
use common::transport::LinkAddr;
use tracing::{info, warn};

pub use config::Config;

/// How often the parent's own addresses are read again for the egress policy (DHCP can change
/// them while host-proxy runs).
pub const LOCAL_ADDRS_REFRESH: Duration = Duration::from_secs(10);

/// Descriptors beyond the connections' own: listeners, the runtime, logs, getifaddrs' socket.
const FD_MARGIN: u64 = 64;

/// State shared by every connection task of one enclave.
#[derive(Debug)]
pub struct Shared {
    /// The configuration (this enclave's: its own address, publishes and policy).
    pub config: Config,
    /// The enclave's name in logs and metrics ([`Config::label`]).
    pub label: String,
    /// The egress policy.
    pub policy: policy::Policy,
    /// Counters.
    pub counters: Counters,
    /// Connection caps.
    pub caps: limits::Caps,
    /// Where the enclave's DNS queries go.
    pub resolvers: dns::Resolvers,
    /// Metrics observed as they happen (`--metrics`).
    pub observed: metrics::Observed,
}

impl Shared {
    /// The state of a freshly configured enclave.
    pub fn new(config: Config) -> Shared {
        Shared {
            label: config.label(),
            policy: policy::Policy::new(reload::operator_rules(&config)),
            counters: Counters::default(),
            caps: limits::Caps::new(config.max_ingress, config.max_egress, config.max_per_client),
            resolvers: dns::Resolvers::new(config.dns_upstream.clone(), config.resolv_conf.clone()),
            observed: metrics::Observed::default(),
            config,
        }
    }
}

impl AsRef<Counters> for Shared {
    fn as_ref(&self) -> &Counters {
        &self.counters
    }
}

/// Why host-proxy could not start.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    /// A published port could not be bound.
    #[error("cannot listen on published address {addr}: {source}")]
    Publish {
        /// The address.
        addr: std::net::SocketAddr,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
    /// The egress listen address could not be bound.
    #[error("cannot listen for egress streams on {addr}: {source}")]
    Listen {
        /// The address.
        addr: common::transport::LinkAddr,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
    /// The nftables table for the transparent ranges could not be installed.
    #[error("cannot install the nftables table for --publish-transparent: {0}")]
    Nftables(String),
    /// The metrics address could not be bound.
    #[error("cannot listen for metrics on {addr}: {source}")]
    Metrics {
        /// The address.
        addr: std::net::SocketAddr,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
    /// The parent's own addresses, which egress must not reach, could not be read.
    #[error("cannot list the parent's interface addresses: {0}")]
    LocalAddrs(#[source] nix::Error),
}

/// Runs host-proxy for each enclave of `configs` (one per `[[enclaves]]` table, or the one)
/// until SIGTERM or SIGINT. The settings that are not per enclave are the same in each.
pub async fn run(configs: Vec<Config>) -> Result<(), StartError> {
    let global = configs.first().expect("at least one enclave").clone();
    common::transport::set_vsock_buffer(global.vsock_buffer_kib * 1024);
    let enclaves: Vec<Arc<Shared>> = configs
        .into_iter()
        .map(|c| Arc::new(Shared::new(c)))
        .collect();
    let listeners: usize = enclaves
        .iter()
        .flat_map(|e| &e.config.publish)
        .map(|p| usize::from(p.count))
        .sum();
    check_fd_limit(&global, enclaves.len(), listeners);
    // Before anything is served, so no egress stream is checked without them.
    let addrs = interface_addrs().map_err(StartError::LocalAddrs)?;
    for e in &enclaves {
        e.policy.set_local_addrs(addrs.clone());
    }
    info!(addrs = ?addrs, "egress denies the parent's own addresses");

    // tokio keeps a signal handler installed for the life of the process once one is registered,
    // so registering here, before `ready`, means an early SIGUSR1 is never fatal (its default
    // action) even if the logging task below has not run yet.
    let _usr1 = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::user_defined1());
    let mut tasks = tokio::task::JoinSet::new();
    for e in &enclaves {
        let e = e.clone();
        tasks.spawn(async move {
            common::metrics::log_on_sigusr1(&e.counters, &e.label).await;
        });
    }
    tasks.spawn(refresh_local_addrs(enclaves.clone()));
    // SIGHUP reloads; registered before `ready` so an early one is never fatal.
    let mut hup = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup()).ok();
    let mut served: Vec<reload::Served> = Vec::new();
    for e in &enclaves {
        let mut s = reload::Served::default();
        s.apply(&e.config, e, true).await?;
        served.push(s);
    }
    // One listener per egress address; on a shared vsock one, streams go by the peer's CID.
    let mut by_listen: Vec<(LinkAddr, Vec<Arc<Shared>>)> = Vec::new();
    for e in &enclaves {
        match by_listen.iter_mut().find(|(a, _)| *a == e.config.listen) {
            Some((_, group)) => group.push(e.clone()),
            None => by_listen.push((e.config.listen.clone(), vec![e.clone()])),
        }
    }
    for (addr, group) in by_listen {
        let listener = addr
            .listen()
            .await
            .map_err(|source| StartError::Listen { addr, source })?;
        tasks.spawn(egress::serve(listener, group));
    }
    if let Some(addr) = global.metrics {
        let listener = tokio::net::TcpListener::bind(addr)
            .await
            .map_err(|source| StartError::Metrics { addr, source })?;
        tasks.spawn(metrics::serve(
            listener,
            Arc::new(metrics::registry(enclaves.clone())),
        ));
    }
    // Last before ready: nothing that can fail comes after the table is in place.
    let mut transparent = transparent::Served::default();
    let ranges: Vec<_> = enclaves
        .iter()
        .map(|e| (e.clone(), e.config.publish_transparent.clone()))
        .collect();
    transparent.apply(&ranges, global.transparent_port).await?;

    for (e, s) in enclaves.iter().zip(&served) {
        info!(
            enclave = %e.label,
            address = %e.config.enclave,
            listen = %e.config.listen,
            published = ?s.describe(),
            "serving enclave"
        );
    }
    info!(enclaves = enclaves.len(), metrics = ?global.metrics, "host-proxy ready");
    common::telemetry::notify_ready();
    let shutdown = common::telemetry::shutdown_signal();
    tokio::pin!(shutdown);
    loop {
        tokio::select! {
            () = &mut shutdown => break,
            Some(()) = async { hup.as_mut()?.recv().await } => {
                reload::reload(&mut served, &mut transparent, &enclaves).await;
            }
        }
    }
    common::telemetry::notify_stopping();
    transparent.stop();
    for s in &mut served {
        s.stop();
    }
    tasks.shutdown().await;
    for e in &enclaves {
        e.counters.log(&e.label);
    }
    Ok(())
}

/// Every address on every interface of the parent, IPv4 and IPv6.
fn interface_addrs() -> Result<Vec<IpAddr>, nix::Error> {
    Ok(nix::ifaddrs::getifaddrs()?
        .filter_map(|ifa| ifa.address)
        .filter_map(|sa| match (sa.as_sockaddr_in(), sa.as_sockaddr_in6()) {
            (Some(v4), _) => Some(IpAddr::V4(v4.ip())),
            (_, Some(v6)) => Some(IpAddr::V6(v6.ip())),
            _ => None,
        })
        .collect())
}

/// Re-reads the parent's addresses every [`LOCAL_ADDRS_REFRESH`] for every enclave's policy;
/// runs until cancelled. getifaddrs is one netlink dump, well under a millisecond, so it runs on
/// the runtime.
async fn refresh_local_addrs(enclaves: Vec<Arc<Shared>>) {
    let start = tokio::time::Instant::now() + LOCAL_ADDRS_REFRESH;
    let mut tick = tokio::time::interval_at(start, LOCAL_ADDRS_REFRESH);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        match interface_addrs() {
            Ok(addrs) => {
                let mut changed = false;
                for e in &enclaves {
                    changed |= e.policy.set_local_addrs(addrs.clone());
                }
                if changed {
                    info!(addrs = ?addrs, "the parent's addresses changed; egress denies the new set");
                }
            }
            // At most one line per refresh; the last set read stays in force.
            Err(e) => warn!("cannot re-read the parent's interface addresses: {e}"),
        }
    }
}

/// Raises the open-file limit for the caps, which each enclave has: each carried connection
/// holds two descriptors, ingress (client socket and link stream) and egress (link stream and
/// destination socket) alike.
fn check_fd_limit(config: &Config, enclaves: usize, listeners: usize) {
    let conns = config
        .max_ingress
        .saturating_add(config.max_egress)
        .saturating_mul(enclaves);
    let need = u64::try_from(conns.saturating_mul(2).saturating_add(listeners))
        .unwrap_or(u64::MAX)
        .saturating_add(FD_MARGIN);
    common::telemetry::raise_fd_limit(need, "--max-ingress and --max-egress (2 per connection)");
}
