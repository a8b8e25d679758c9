//! enclave-proxy: the in-enclave half of enclave-net.
//!
//! Layers, from the wire up (smoltcp's `phy/`, `iface/`, `socket/` split is the model):
//! - [`sys`]: the TAP ioctls (TUNSETIFF, TUNSETOFFLOAD), the only unsafe code;
//! - [`tap`]: the TAP device: frames in and out, pooled buffers, TCP segmentation offload;
//! - [`packet`]: sans-IO frame work: spotting SYNs, writing ICMP errors, the `virtio_net_hdr`
//!   and the MSS work that lets TCP cross the TAP in 64 KiB super-frames;
//! - [`netlink`]: addresses, MTU, link state and the default route, over rtnetlink;
//! - [`shard`]: the stack as many small smoltcp interfaces, so a frame's cost does not grow with
//!   the number of connections;
//! - [`stack`]: the single task that owns smoltcp, the sockets and the link streams;
//! - [`conn`]: one connection's state machine and zero-copy byte pump;
//! - [`egress`] and [`ingress`]: stream set-up with host-proxy;
//! - [`metrics`]: its own Prometheus metrics, served at the gateway (`--metrics-port`).
//!
//! Nothing here touches netfilter: the enclave's rules belong to Docker.
#![deny(unsafe_code)]

pub mod config;
pub mod conn;
pub mod egress;
pub mod fragments;
pub mod ingress;
pub mod metrics;
pub mod netlink;
pub mod packet;
pub mod shard;
pub mod stack;
pub mod sys;
pub mod tap;
pub mod udp;

use std::sync::Arc;

use common::metrics::Counters;
use tracing::info;

pub use config::Config;

/// Why enclave-proxy could not start.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    /// Bad combination of options.
    #[error("invalid configuration: {0}")]
    Config(String),
    /// The TAP device could not be opened.
    #[error("cannot open TAP device {name}: {source}")]
    Tap {
        /// The device name.
        name: String,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
    /// Netlink configuration failed.
    #[error(transparent)]
    Netlink(#[from] netlink::NetlinkError),
    /// The ingress listen address could not be bound.
    #[error("cannot listen for ingress streams on {addr}: {source}")]
    Listen {
        /// The address.
        addr: common::transport::LinkAddr,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
    /// A stale `--ready-file` could not be removed.
    #[error("cannot remove the stale ready file {path}: {source}")]
    ReadyFile {
        /// The path.
        path: std::path::PathBuf,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
    /// `--resolv-conf` could not be written.
    #[error("cannot write {path}: {source}")]
    ResolvConf {
        /// The path.
        path: std::path::PathBuf,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
}

/// Writes a resolv.conf naming the gateway as the only nameserver: atomically where it can (a
/// reader never sees half a file), in place where the file is a mount point (`EBUSY`, as in a
/// container).
fn write_resolv_conf(path: &std::path::Path, gateway: std::net::Ipv4Addr) -> std::io::Result<()> {
    let text =
        format!("# Written by enclave-proxy: its resolver at the gateway.\nnameserver {gateway}\n");
    let tmp = path.with_extension("enclave-proxy.tmp");
    std::fs::write(&tmp, &text)?;
    match std::fs::rename(&tmp, path) {
        Err(e) if e.raw_os_error() == Some(libc::EBUSY) => {
            let _ = std::fs::remove_file(&tmp);
            std::fs::write(path, text)
        }
        r => r,
    }
}

/// Runs enclave-proxy until SIGTERM or SIGINT. Must run on a current-thread runtime: the stack
/// task and its helpers share one thread, so wakers never cross threads.
pub async fn run(config: Config) -> Result<(), StartError> {
    common::transport::set_vsock_buffer(config.vsock_buffer_kib * 1024);
    config.validate().map_err(StartError::Config)?;
    let ready_file =
        match &config.ready_file {
            Some(path) => Some(common::telemetry::ReadyFile::new(path.clone()).map_err(
                |source| StartError::ReadyFile {
                    path: path.clone(),
                    source,
                },
            )?),
            None => None,
        };
    // One descriptor per connection (its link stream), plus the TAP, sockets and a margin.
    let need = config.max_ingress.saturating_add(config.max_egress) as u64 + 64;
    common::telemetry::raise_fd_limit(need, "--max-ingress and --max-egress (1 per connection)");
    let tap_err = |source| StartError::Tap {
        name: config.tap.clone(),
        source,
    };
    let file = sys::open_tap(&config.tap).map_err(tap_err)?;
    let tap = tap::Tap::new(file, config.mtu as usize, config.offload).map_err(tap_err)?;
    netlink::configure(&netlink::TapConfig {
        name: config.tap.clone(),
        address: config.address.0,
        prefix: config.address.1,
        gateway: config.gateway,
        mtu: config.mtu,
    })
    .await?;
    // One rtnetlink connection for the daemon's life: ingress asks it where each client routes.
    let routes = Arc::new(netlink::Routes::open(&config.tap, config.address).await?);

    let listener = config
        .listen
        .listen()
        .await
        .map_err(|source| StartError::Listen {
            addr: config.listen.clone(),
            source,
        })?;
    let counters = Arc::new(Counters::default());
    let settings = stack::Settings {
        address: config.address,
        gateway: config.gateway,
        host: config.host.clone(),
        connect_timeout: config.connect_timeout,
        buffer: config.tcp_buffer_kib as usize * 1024,
        max_ingress: config.max_ingress,
        max_egress: config.max_egress,
        max_pending_per_destination: config.max_pending_per_destination,
        dns: !config.no_dns,
        udp_idle: config.udp_idle_timeout,
        max_udp_flows: config.max_udp_flows,
        mtu: config.mtu as usize,
    };
    let (mut stack, events) = stack::Stack::new(tap, settings, counters.clone());
    let metrics = config.metrics_port.map(|port| {
        Arc::new(metrics::Metrics::new(
            port,
            counters.clone(),
            events.clone(),
        ))
    });
    stack.set_metrics(metrics.clone());
    let accept = tokio::spawn(ingress::serve(
        listener,
        ingress::Admission {
            expose: config.expose.clone(),
            handshake_timeout: config.handshake_timeout,
            metrics: metrics.clone(),
        },
        routes,
        events,
        counters.clone(),
    ));
    // Registered before `ready`: tokio keeps the handler for the process's life, so an early
    // SIGUSR1 is never fatal (its default action).
    let _usr1 = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::user_defined1());
    let usr1 = {
        let counters = counters.clone();
        tokio::spawn(async move {
            common::metrics::log_on_sigusr1(&counters, "enclave-proxy").await;
        })
    };
    if let (Some(path), false) = (&config.resolv_conf, config.no_dns) {
        write_resolv_conf(path, config.gateway).map_err(|source| StartError::ResolvConf {
            path: path.clone(),
            source,
        })?;
    }
    info!(
        tap = %config.tap,
        address = %format!("{}/{}", config.address.0, config.address.1),
        gateway = %config.gateway,
        mtu = config.mtu,
        host = %config.host,
        listen = %config.listen,
        dns = !config.no_dns,
        metrics = ?config.metrics_port.map(|p| std::net::SocketAddrV4::new(config.gateway, p)),
        "enclave-proxy ready"
    );
    common::telemetry::notify_ready();
    if let Some(f) = &ready_file {
        f.ready();
    }
    stack
        .run(async {
            common::telemetry::shutdown_signal().await;
            common::telemetry::notify_stopping();
            if let Some(f) = &ready_file {
                f.stopping();
            }
        })
        .await;
    accept.abort();
    usr1.abort();
    counters.log("enclave-proxy");
    Ok(())
}
