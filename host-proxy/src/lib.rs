//! host-proxy: the parent-instance half of enclave-net.
//!
//! - [`ingress`]: accepts TCP on published ports and opens one stream per connection to
//!   enclave-proxy, naming the real client and the enclave port.
//! - [`egress`]: accepts streams from enclave-proxy, applies the [`policy`], connects to the
//!   destination and answers with a status.
//! - [`splice`]: the byte pump both use once a connection is up.
#![forbid(unsafe_code)]

pub mod config;
pub mod egress;
pub mod ingress;
pub mod policy;
pub mod publish;
pub mod splice;

use std::sync::Arc;

use common::metrics::Counters;
use tokio::sync::Semaphore;
use tracing::info;

pub use config::Config;

/// State shared by every connection task.
#[derive(Debug)]
pub struct Shared {
    /// The configuration.
    pub config: Config,
    /// The egress policy.
    pub policy: policy::Policy,
    /// Counters.
    pub counters: Counters,
    /// One permit per carried connection.
    pub permits: Arc<Semaphore>,
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
}

/// Runs host-proxy until SIGTERM or SIGINT.
pub async fn run(config: Config) -> Result<(), StartError> {
    common::telemetry::raise_fd_limit();
    let mut rules = config.allow.clone();
    rules.extend(config.deny.iter().cloned());
    let shared = Arc::new(Shared {
        policy: policy::Policy::new(rules),
        counters: Counters::default(),
        permits: Arc::new(Semaphore::new(config.max_connections)),
        config,
    });

    let mut tasks = tokio::task::JoinSet::new();
    let mut published = Vec::new();
    for spec in &shared.config.publish {
        for (addr, enclave_port) in spec.pairs() {
            let listener = tokio::net::TcpListener::bind(addr)
                .await
                .map_err(|source| StartError::Publish { addr, source })?;
            published.push(format!("{addr}->{enclave_port}"));
            tasks.spawn(ingress::serve(listener, enclave_port, shared.clone()));
        }
    }
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

    info!(
        listen = %shared.config.listen,
        enclave = %shared.config.enclave,
        published = ?published,
        "host-proxy ready"
    );
    common::telemetry::shutdown_signal().await;
    tasks.shutdown().await;
    shared.counters.log("host-proxy");
    Ok(())
}
