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

use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use common::metrics::Counters;
use tracing::{info, warn};

pub use config::Config;

/// How often the parent's own addresses are read again for the egress policy (DHCP can change
/// them while host-proxy runs).
pub const LOCAL_ADDRS_REFRESH: Duration = Duration::from_secs(10);

/// Descriptors beyond the connections' own: listeners, the runtime, logs, getifaddrs' socket.
const FD_MARGIN: u64 = 64;

/// State shared by every connection task.
#[derive(Debug)]
pub struct Shared {
    /// The configuration.
    pub config: Config,
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

/// Runs host-proxy until SIGTERM or SIGINT.
pub async fn run(config: Config) -> Result<(), StartError> {
    common::transport::set_vsock_buffer(config.vsock_buffer_kib * 1024);
    let shared = Arc::new(Shared {
        policy: policy::Policy::new(reload::operator_rules(&config)),
        counters: Counters::default(),
        caps: limits::Caps::new(config.max_ingress, config.max_egress, config.max_per_client),
        resolvers: dns::Resolvers::new(config.dns_upstream.clone(), config.resolv_conf.clone()),
        observed: metrics::Observed::default(),
        config,
    });
    let listeners: usize = shared
        .config
        .publish
        .iter()
        .map(|p| usize::from(p.count))
        .sum();
    check_fd_limit(&shared.config, listeners);
    // Before anything is served, so no egress stream is checked without them.
    let addrs = interface_addrs().map_err(StartError::LocalAddrs)?;
    shared.policy.set_local_addrs(addrs);
    info!(addrs = ?shared.policy.local_addrs(), "egress denies the parent's own addresses");

    // tokio keeps a signal handler installed for the life of the process once one is registered,
    // so registering here, before `ready`, means an early SIGUSR1 is never fatal (its default
    // action) even if the logging task below has not run yet.
    let _usr1 = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::user_defined1());
    let mut tasks = tokio::task::JoinSet::new();
    let for_usr1 = shared.clone();
    tasks.spawn(async move {
        common::metrics::log_on_sigusr1(&for_usr1.counters, "host-proxy").await;
    });
    tasks.spawn(refresh_local_addrs(shared.clone()));
    // SIGHUP reloads; registered before `ready` so an early one is never fatal.
    let mut hup = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup()).ok();
    let mut served = reload::Served::default();
    served.apply(&shared.config, &shared, true).await?;
    let egress_listener =
        shared
            .config
            .listen
            .listen()
            .await
            .map_err(|source| StartError::Listen {
                addr: shared.config.listen.clone(),
                source,
            })?;
    tasks.spawn(egress::serve(egress_listener, shared.clone()));
    if let Some(addr) = shared.config.metrics {
        let listener = tokio::net::TcpListener::bind(addr)
            .await
            .map_err(|source| StartError::Metrics { addr, source })?;
        let registry = metrics::registry(
            shared.clone(),
            &shared.observed,
            &shared.config.enclave.to_string(),
        );
        tasks.spawn(metrics::serve(listener, Arc::new(registry)));
    }
    // Last before ready: nothing that can fail comes after the table is in place.
    let transparent = !shared.config.publish_transparent.is_empty();
    if transparent {
        // The listener first, so no redirected connection finds the port closed.
        let addr = SocketAddr::from((
            std::net::Ipv4Addr::UNSPECIFIED,
            shared.config.transparent_port,
        ));
        let listener = tokio::net::TcpListener::bind(addr)
            .await
            .map_err(|source| StartError::Publish { addr, source })?;
        tasks.spawn(ingress::serve(
            listener,
            ingress::EnclavePort::Original,
            shared.clone(),
        ));
        transparent::install(
            &shared.config.publish_transparent,
            shared.config.transparent_port,
        )
        .map_err(StartError::Nftables)?;
        info!(
            table = transparent::TABLE,
            ranges = ?shared.config.publish_transparent.iter().map(ToString::to_string).collect::<Vec<_>>(),
            "nftables table installed"
        );
    }

    info!(
        listen = %shared.config.listen,
        enclave = %shared.config.enclave,
        published = ?served.describe(),
        metrics = ?shared.config.metrics,
        "host-proxy ready"
    );
    common::telemetry::notify_ready();
    let shutdown = common::telemetry::shutdown_signal();
    tokio::pin!(shutdown);
    loop {
        tokio::select! {
            () = &mut shutdown => break,
            Some(()) = async { hup.as_mut()?.recv().await } => {
                reload::reload(&mut served, &shared).await;
            }
        }
    }
    common::telemetry::notify_stopping();
    if transparent {
        match transparent::remove() {
            Ok(()) => info!(table = transparent::TABLE, "nftables table removed"),
            Err(e) => warn!(
                table = transparent::TABLE,
                "cannot remove the nftables table: {e}"
            ),
        }
    }
    served.stop();
    tasks.shutdown().await;
    shared.counters.log("host-proxy");
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

/// Re-reads the parent's addresses every [`LOCAL_ADDRS_REFRESH`]; runs until cancelled.
/// getifaddrs is one netlink dump, well under a millisecond, so it runs on the runtime.
async fn refresh_local_addrs(shared: Arc<Shared>) {
    let start = tokio::time::Instant::now() + LOCAL_ADDRS_REFRESH;
    let mut tick = tokio::time::interval_at(start, LOCAL_ADDRS_REFRESH);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        match interface_addrs() {
            Ok(addrs) => {
                if shared.policy.set_local_addrs(addrs) {
                    info!(addrs = ?shared.policy.local_addrs(), "the parent's addresses changed; egress denies the new set");
                }
            }
            // At most one line per refresh; the last set read stays in force.
            Err(e) => warn!("cannot re-read the parent's interface addresses: {e}"),
        }
    }
}

/// Raises the open-file limit for the caps: each carried connection holds two descriptors,
/// ingress (client socket and link stream) and egress (link stream and destination socket) alike.
fn check_fd_limit(config: &Config, listeners: usize) {
    let conns = config.max_ingress.saturating_add(config.max_egress);
    let need = u64::try_from(conns.saturating_mul(2).saturating_add(listeners))
        .unwrap_or(u64::MAX)
        .saturating_add(FD_MARGIN);
    common::telemetry::raise_fd_limit(need, "--max-ingress and --max-egress (2 per connection)");
}
