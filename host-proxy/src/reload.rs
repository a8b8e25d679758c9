//! The published ports being served, and SIGHUP: read the configuration again and apply each
//! enclave's publishes (the transparent ranges too, [`crate::transparent::Served`]) and egress
//! policy without dropping anything already carried.
//!
//! Each published address has a task of its own that accepts on it; every connection it accepts
//! is a task of its own too. A reload stops the accepting tasks of the publishes that went (or
//! changed their enclave port) and binds the new ones, so connections already up keep flowing,
//! removed ports stop accepting and new ones start. The egress policy is swapped whole; each
//! egress connection is checked once, when it is set up. A configuration that does not load (a
//! bad file, a bad value, a port published twice) is refused with a logged reason and the
//! running one stays in force. Other settings are read at start only: a reload that changes one
//! says so.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Arc;

use tokio::task::JoinHandle;
use tracing::{error, info, warn};

use crate::config::Config;
use crate::policy::Rule;
use crate::{ingress, udp, Shared, StartError};

/// The publishes being served, by protocol and listen address: the enclave port and the task
/// accepting on it.
#[derive(Debug, Default)]
pub struct Served {
    tcp: HashMap<SocketAddr, (u16, JoinHandle<()>)>,
    udp: HashMap<SocketAddr, (u16, JoinHandle<()>)>,
}

impl Served {
    /// Serves exactly the publishes of `config`. At start (`strict`) a port that cannot be bound
    /// is the error returned; on reload it is logged and the others still apply.
    pub async fn apply(
        &mut self,
        config: &Config,
        shared: &Arc<Shared>,
        strict: bool,
    ) -> Result<(), StartError> {
        self.release(config).await;
        self.bind_new(config, shared, strict).await
    }

    /// Stops the publishes `config` no longer has (or whose enclave port changed), so their
    /// addresses are free. A reload releases for every enclave before any binds: a port moving
    /// from one enclave to another is then free when its new enclave binds it.
    pub async fn release(&mut self, config: &Config) {
        for is_udp in [false, true] {
            let want = wanted(config, is_udp);
            let map = if is_udp { &mut self.udp } else { &mut self.tcp };
            let gone: Vec<SocketAddr> = map
                .iter()
                .filter(|(addr, (port, _))| want.get(addr) != Some(port))
                .map(|(addr, _)| *addr)
                .collect();
            for addr in gone {
                if let Some((port, task)) = map.remove(&addr) {
                    task.abort();
                    let _ = task.await;
                    info!(%addr, enclave.port = port, udp = is_udp, "stopped publishing");
                }
            }
        }
    }

    /// Binds the publishes of `config` not yet served. At start (`strict`) a port that cannot be
    /// bound is the error returned; on reload it is logged and the others still apply.
    pub async fn bind_new(
        &mut self,
        config: &Config,
        shared: &Arc<Shared>,
        strict: bool,
    ) -> Result<(), StartError> {
        for is_udp in [false, true] {
            let want = wanted(config, is_udp);
            let map = if is_udp { &mut self.udp } else { &mut self.tcp };
            let mut new: Vec<(SocketAddr, u16)> = want
                .into_iter()
                .filter(|(addr, _)| !map.contains_key(addr))
                .collect();
            new.sort_unstable();
            for (addr, port) in new {
                match bind(addr, port, is_udp, shared).await {
                    Ok(task) => {
                        map.insert(addr, (port, task));
                    }
                    Err(e) if strict => return Err(e),
                    Err(e) => error!("{e}; the rest of the configuration applies"),
                }
            }
        }
        Ok(())
    }

    /// What is published, `ADDR->PORT` (`udp:` for UDP), sorted.
    pub fn describe(&self) -> Vec<String> {
        let mut out: Vec<String> = self
            .tcp
            .iter()
            .map(|(addr, (port, _))| format!("{addr}->{port}"))
            .chain(
                self.udp
                    .iter()
                    .map(|(addr, (port, _))| format!("udp:{addr}->{port}")),
            )
            .collect();
        out.sort();
        out
    }

    /// Stops accepting everywhere.
    pub fn stop(&mut self) {
        for (_, task) in self.tcp.values().chain(self.udp.values()) {
            task.abort();
        }
    }
}

/// Each listen address of `config`'s publishes (UDP or TCP) and its enclave port.
fn wanted(config: &Config, is_udp: bool) -> HashMap<SocketAddr, u16> {
    let specs = if is_udp {
        &config.publish_udp
    } else {
        &config.publish
    };
    specs.iter().flat_map(|p| p.pairs()).collect()
}

/// Binds one published address and starts accepting on it.
async fn bind(
    addr: SocketAddr,
    enclave_port: u16,
    is_udp: bool,
    shared: &Arc<Shared>,
) -> Result<JoinHandle<()>, StartError> {
    let failed = |source| StartError::Publish { addr, source };
    Ok(if is_udp {
        // A UDP publish that changed on reload: its old flows hold the socket until they have
        // finished (their queue closed with the old task, then up to 1 s of linger).
        let mut tries = 0;
        let socket = loop {
            match tokio::net::UdpSocket::bind(addr).await {
                Err(e) if e.kind() == std::io::ErrorKind::AddrInUse && tries < 30 => {
                    tries += 1;
                    tokio::time::sleep(std::time::Duration::from_millis(100)).await;
                }
                r => break r.map_err(failed)?,
            }
        };
        tokio::spawn(udp::serve_published(socket, enclave_port, shared.clone()))
    } else {
        let listener = tokio::net::TcpListener::bind(addr).await.map_err(failed)?;
        let target = ingress::Target::Fixed(enclave_port, shared.clone());
        tokio::spawn(ingress::serve(listener, target))
    })
}

/// The operator's egress rules of `config`.
pub fn operator_rules(config: &Config) -> Vec<Rule> {
    let mut rules = config.allow.clone();
    rules.extend(config.deny.iter().cloned());
    rules
}

/// SIGHUP: loads the configuration again from the process's own command line (and so the same
/// file, the flags still overriding it), then applies each enclave's publishes and egress policy.
/// `served[i]` is what `enclaves[i]` serves.
pub async fn reload(
    served: &mut [Served],
    transparent: &mut crate::transparent::Served,
    enclaves: &[Arc<Shared>],
) {
    common::telemetry::notify_reloading();
    let running: Vec<&Config> = enclaves.iter().map(|e| &e.config).collect();
    match load_again(&running) {
        Err(e) => error!("SIGHUP: reload refused, the running configuration stays: {e}"),
        Ok(configs) => {
            let ranges: Vec<_> = enclaves
                .iter()
                .cloned()
                .zip(configs.iter().map(|c| c.publish_transparent.clone()))
                .collect();
            let port = configs[0].transparent_port;
            if let Err(e) = transparent.apply(&ranges, port).await {
                error!("SIGHUP: {e}; the transparent ranges in force stay");
            }
            // Every enclave lets go of what it no longer publishes before any binds.
            for (config, served) in configs.iter().zip(served.iter_mut()) {
                served.release(config).await;
            }
            for ((config, shared), served) in configs.iter().zip(enclaves).zip(served) {
                shared.policy.set_operator_rules(operator_rules(config));
                // Binding failures are logged inside; nothing else can fail.
                let _ = served.bind_new(config, shared, false).await;
                info!(
                    enclave = %shared.label,
                    published = ?served.describe(),
                    allow = ?config.allow,
                    deny = ?config.deny,
                    transparent = ?config.publish_transparent.iter().map(ToString::to_string).collect::<Vec<_>>(),
                    "SIGHUP: configuration reloaded (publishes, transparent ranges and egress policy)"
                );
            }
        }
    }
    common::telemetry::notify_ready();
}

/// The configuration of each enclave as it loads now, checked: the same enclaves in the same
/// order, or an error (adding or removing an enclave takes a restart).
fn load_again(running: &[&Config]) -> Result<Vec<Config>, String> {
    let loaded = common::config_file::try_parse_sections::<Config>(
        std::env::args_os().collect(),
        &crate::config::PER_ENCLAVE,
    )
    .map_err(|e| e.to_string())?;
    let key = |c: &Config| format!("{} at {}", c.label(), c.enclave);
    let now: Vec<String> = loaded.iter().map(|(c, _)| key(c)).collect();
    let before: Vec<String> = running.iter().map(|c| key(c)).collect();
    if now != before {
        return Err(format!(
            "the enclaves changed from {before:?} to {now:?}; that takes a restart"
        ));
    }
    let mut checked = Vec::new();
    let mut others_changed = false;
    for ((mut config, origin), running) in loaded.into_iter().zip(running) {
        let mut rest = config.clone();
        rest.publish.clone_from(&running.publish);
        rest.publish_udp.clone_from(&running.publish_udp);
        rest.allow.clone_from(&running.allow);
        rest.deny.clone_from(&running.deny);
        rest.publish_transparent
            .clone_from(&running.publish_transparent);
        others_changed |= format!("{rest:?}") != format!("{running:?}");
        // The listener's port is the one bound at start.
        config.transparent_port = running.transparent_port;
        checked.push((config, origin));
    }
    if others_changed {
        warn!(
            "SIGHUP: the configuration also changes settings other than publish, publish_udp, \
             publish_transparent, allow and deny; those apply at the next restart"
        );
    }
    crate::config::check(&checked)?;
    Ok(checked.into_iter().map(|(c, _)| c).collect())
}
