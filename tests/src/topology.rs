//! The emulated deployment: client, parent, enclave and "internet" namespaces, with host-proxy
//! in the parent and enclave-proxy in the enclave, Unix sockets standing in for vsock.
//!
//! ```text
//!  client 10.99.0.2 ── 10.99.0.1 parent 10.98.0.1 ── 10.98.0.2 internet
//!                                  host-proxy           (+ 10.97.0.1, 169.254.169.254)
//!                                      ║ unix sockets in a temporary directory
//!                                  enclave-proxy ── tap0 10.240.0.2/30 enclave
//! ```
//!
//! Every address is inside these namespaces; none of them has a link to the machine's own
//! network, so no test traffic can leave them.

use std::net::{Ipv4Addr, SocketAddr};
use std::path::PathBuf;
use std::process::Command;

use crate::netns::{remove_stale, veth, Netns};
use crate::process::{bin, Daemon};

/// The client's address.
pub const CLIENT_IP: Ipv4Addr = Ipv4Addr::new(10, 99, 0, 2);
/// The parent's address on the client side, where ports are published.
pub const PARENT_IP: Ipv4Addr = Ipv4Addr::new(10, 99, 0, 1);
/// The "internet" server's address.
pub const INTERNET_IP: Ipv4Addr = Ipv4Addr::new(10, 98, 0, 2);
/// An address in the internet namespace inside the network the tests `--deny`.
pub const DENIED_IP: Ipv4Addr = Ipv4Addr::new(10, 97, 0, 1);
/// The instance metadata address, also placed in the internet namespace.
pub const METADATA_IP: Ipv4Addr = Ipv4Addr::new(169, 254, 169, 254);
/// The enclave's TAP address.
pub const ENCLAVE_IP: Ipv4Addr = Ipv4Addr::new(10, 240, 0, 2);
/// The published host port of the default topology.
pub const PUBLISHED: u16 = 18080;
/// The enclave port it maps to.
pub const ENCLAVE_PORT: u16 = 8080;

/// A temporary directory removed on drop.
#[derive(Debug)]
pub struct TempDir(pub PathBuf);

impl TempDir {
    /// Creates `/tmp/enclave-net-test-<pid>-<tag>`.
    pub fn new(tag: &str) -> TempDir {
        let path =
            std::env::temp_dir().join(format!("enclave-net-test-{}-{tag}", std::process::id()));
        let _ = std::fs::remove_dir_all(&path);
        std::fs::create_dir_all(&path).expect("create temp dir");
        crate::cleanup::register(crate::cleanup::Item::Dir(path.clone()));
        TempDir(path)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
        crate::cleanup::forget(&crate::cleanup::Item::Dir(self.0.clone()));
    }
}

/// Everything outside the enclave: the client, the parent and the internet namespaces, joined
/// and addressed as drawn at the top of this module.
#[derive(Debug)]
pub struct Outside {
    /// The client machine.
    pub client: Netns,
    /// The parent instance.
    pub parent: Netns,
    /// The outside world (with 10.97.0.1 and 169.254.169.254 on its loopback).
    pub internet: Netns,
}

impl Outside {
    /// Builds the three namespaces (removing stale ones of earlier runs first).
    pub fn build() -> Outside {
        remove_stale();
        let client = Netns::new("c");
        let parent = Netns::new("p");
        let internet = Netns::new("i");
        veth(
            &parent,
            "toclient",
            "10.99.0.1/24",
            &client,
            "toparent",
            "10.99.0.2/24",
        );
        veth(
            &parent,
            "tonet",
            "10.98.0.1/24",
            &internet,
            "toparent",
            "10.98.0.2/24",
        );
        internet.ip(&["addr", "add", "10.97.0.1/32", "dev", "lo"]);
        internet.ip(&["addr", "add", "169.254.169.254/32", "dev", "lo"]);
        client.ip(&["route", "add", "default", "via", "10.99.0.1"]);
        parent.ip(&["route", "add", "default", "via", "10.98.0.2"]);
        internet.ip(&["route", "add", "default", "via", "10.98.0.1"]);
        Outside {
            client,
            parent,
            internet,
        }
    }
}

/// The whole emulated deployment. Fields drop in order: daemons first, then namespaces, then
/// the directory.
#[derive(Debug)]
pub struct Topology {
    /// host-proxy, in `parent`.
    pub host: Option<Daemon>,
    /// enclave-proxy, in `enclave`.
    pub enclave_proxy: Option<Daemon>,
    /// The client machine.
    pub client: Netns,
    /// The parent instance.
    pub parent: Netns,
    /// The enclave.
    pub enclave: Netns,
    /// The outside world.
    pub internet: Netns,
    host_args: Vec<String>,
    enclave_args: Vec<String>,
    /// Environment for the daemons started from here on (for example `NOTIFY_SOCKET`).
    pub daemon_env: Vec<(String, String)>,
    /// Temporary directory holding the link sockets and logs.
    pub dir: TempDir,
}

impl Topology {
    /// Builds the namespaces and starts both daemons with the default publish (18080→8080)
    /// plus the extra arguments given.
    pub fn start(host_extra: &[&str], enclave_extra: &[&str]) -> Topology {
        let Outside {
            client,
            parent,
            internet,
        } = Outside::build();
        let enclave = Netns::new("e");
        let dir = TempDir::new(internet.name());
        let link = |name: &str| format!("unix:{}", dir.0.join(name).display());
        let mut host_args = vec![
            "--enclave".to_string(),
            link("enclave.sock"),
            "--listen".into(),
            link("host.sock"),
            "--publish".into(),
            format!("{PUBLISHED}:{ENCLAVE_PORT}"),
        ];
        host_args.extend(host_extra.iter().map(|s| s.to_string()));
        let mut enclave_args = vec![
            "--host".to_string(),
            link("host.sock"),
            "--listen".into(),
            link("enclave.sock"),
        ];
        enclave_args.extend(enclave_extra.iter().map(|s| s.to_string()));
        let mut topo = Topology {
            host: None,
            enclave_proxy: None,
            client,
            parent,
            enclave,
            internet,
            host_args,
            enclave_args,
            daemon_env: Vec::new(),
            dir,
        };
        topo.start_enclave();
        topo.start_host();
        topo
    }

    /// Starts (or restarts) enclave-proxy with the same arguments. A restart keeps the previous
    /// log as `enclave-proxy.previous.log`.
    pub fn start_enclave(&mut self) {
        let mut cmd: Command = self
            .enclave
            .command(bin("enclave-proxy").to_str().expect("utf-8 path"));
        cmd.args(&self.enclave_args);
        cmd.envs(self.daemon_env.iter().cloned());
        let log = self.dir.0.join("enclave-proxy.log");
        if log.exists() {
            let _ = std::fs::rename(&log, self.dir.0.join("enclave-proxy.previous.log"));
        }
        self.enclave_proxy = Some(Daemon::start("enclave-proxy", cmd, log));
    }

    /// Kills host-proxy with SIGKILL, as a crash would.
    pub fn kill_host(&mut self) {
        if let Some(mut d) = self.host.take() {
            d.kill();
        }
    }

    /// Kills enclave-proxy with SIGKILL, as a crash would.
    pub fn kill_enclave(&mut self) {
        if let Some(mut d) = self.enclave_proxy.take() {
            d.kill();
        }
    }

    /// The running host-proxy.
    pub fn host(&self) -> &Daemon {
        self.host.as_ref().expect("host-proxy is running")
    }

    /// The running enclave-proxy.
    pub fn enclave_proxy(&self) -> &Daemon {
        self.enclave_proxy
            .as_ref()
            .expect("enclave-proxy is running")
    }

    /// Starts (or restarts) host-proxy with the same arguments.
    pub fn start_host(&mut self) {
        let mut cmd: Command = self
            .parent
            .command(bin("host-proxy").to_str().expect("utf-8 path"));
        cmd.args(&self.host_args);
        cmd.envs(self.daemon_env.iter().cloned());
        let log = self.dir.0.join("host-proxy.log");
        let _ = std::fs::rename(&log, self.dir.0.join("host-proxy.previous.log"));
        self.host = Some(Daemon::start("host-proxy", cmd, log));
    }

    /// Stops host-proxy; returns whether it exited cleanly.
    pub fn stop_host(&mut self) -> bool {
        self.host.take().is_some_and(|mut d| d.stop())
    }

    /// The Unix socket enclave-proxy accepts ingress streams on.
    pub fn enclave_link(&self) -> PathBuf {
        self.dir.0.join("enclave.sock")
    }

    /// The Unix socket host-proxy accepts egress streams on.
    pub fn host_link(&self) -> PathBuf {
        self.dir.0.join("host.sock")
    }

    /// The published address clients connect to.
    pub fn published(&self) -> SocketAddr {
        SocketAddr::from((PARENT_IP, PUBLISHED))
    }

    /// Both daemons' logs, for failure messages.
    pub fn logs(&self) -> String {
        let mut s = String::new();
        for d in [&self.enclave_proxy, &self.host].into_iter().flatten() {
            s.push_str(&d.log_text());
        }
        s
    }
}

impl Drop for Topology {
    fn drop(&mut self) {
        // Stop the daemons first so that their logs are complete.
        self.host.take();
        self.enclave_proxy.take();
        if std::thread::panicking() {
            let keep = std::env::temp_dir().join(format!(
                "enclave-net-failed-{}-{}",
                std::process::id(),
                self.internet.name()
            ));
            let _ = std::fs::create_dir_all(&keep);
            for log in [
                "enclave-proxy.log",
                "enclave-proxy.previous.log",
                "host-proxy.log",
                "host-proxy.previous.log",
            ] {
                let _ = std::fs::copy(self.dir.0.join(log), keep.join(log));
            }
            eprintln!("daemon logs kept in {}", keep.display());
        }
    }
}
