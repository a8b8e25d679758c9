//! Network namespaces that a test creates and always removes, and sockets opened inside them.
//!
//! `setns` moves only the calling thread, so [`Netns::run`] does its work on a short-lived thread
//! of its own. A socket keeps the namespace it was created in, so the sockets made there can be
//! used from any thread afterwards.

use std::fs::File;
use std::io;
use std::net::SocketAddr;
use std::process::Command;
use std::sync::atomic::{AtomicU32, Ordering};

use nix::sched::{setns, CloneFlags};

static NEXT: AtomicU32 = AtomicU32::new(0);

/// Prefix of every namespace the tests make: `ent<pid>x<n><role>`.
pub const PREFIX: &str = "ent";

/// A network namespace, deleted on drop.
#[derive(Debug)]
pub struct Netns {
    name: String,
}

/// Runs a command and fails loudly with its output if it fails.
pub fn sh(args: &[&str]) {
    let out = Command::new(args[0])
        .args(&args[1..])
        .output()
        .unwrap_or_else(|e| panic!("cannot run {args:?}: {e}"));
    assert!(
        out.status.success(),
        "{args:?} failed: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Deletes namespaces left by test processes that died without cleaning up (killed by a
/// signal): their names carry the dead process's PID.
pub fn remove_stale() {
    let Ok(dir) = std::fs::read_dir("/run/netns") else {
        return;
    };
    for entry in dir.flatten() {
        let name = entry.file_name().to_string_lossy().into_owned();
        let Some(rest) = name.strip_prefix(PREFIX) else {
            continue;
        };
        let Some(pid) = rest.split('x').next().and_then(|p| p.parse::<i32>().ok()) else {
            continue;
        };
        if !std::path::Path::new(&format!("/proc/{pid}")).exists() {
            let _ = Command::new("ip").args(["netns", "del", &name]).status();
        }
    }
}

impl Netns {
    /// Creates a namespace with `lo` up. `role` is a short tag for the name.
    pub fn new(role: &str) -> Netns {
        let n = NEXT.fetch_add(1, Ordering::Relaxed);
        let name = format!("{PREFIX}{}x{n}{role}", std::process::id());
        sh(&["ip", "netns", "add", &name]);
        crate::cleanup::register(crate::cleanup::Item::Netns(name.clone()));
        let ns = Netns { name };
        ns.ip(&["link", "set", "lo", "up"]);
        ns
    }

    /// The namespace's name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Its path under /run/netns.
    pub fn path(&self) -> String {
        format!("/run/netns/{}", self.name)
    }

    /// Runs `ip -n NAME ARGS...`.
    pub fn ip(&self, args: &[&str]) {
        let mut full = vec!["ip", "-n", &self.name];
        full.extend_from_slice(args);
        sh(&full);
    }

    /// A command that runs inside the namespace (`ip netns exec`).
    pub fn command(&self, program: &str) -> Command {
        let mut c = Command::new("ip");
        c.args(["netns", "exec", &self.name, program]);
        c
    }

    /// Runs `f` on a thread that has joined this namespace.
    pub fn run<R: Send + 'static>(&self, f: impl FnOnce() -> R + Send + 'static) -> R {
        let path = self.path();
        std::thread::spawn(move || {
            let file = File::open(&path).unwrap_or_else(|e| panic!("open {path}: {e}"));
            setns(&file, CloneFlags::CLONE_NEWNET).unwrap_or_else(|e| panic!("setns {path}: {e}"));
            f()
        })
        .join()
        .unwrap_or_else(|_| panic!("thread in {} panicked", self.name))
    }

    /// A TCP listener inside the namespace. Call from within a tokio runtime.
    pub fn listen(&self, addr: SocketAddr) -> tokio::net::TcpListener {
        let std_listener = self
            .run(move || {
                let l = std::net::TcpListener::bind(addr)?;
                l.set_nonblocking(true)?;
                Ok::<_, io::Error>(l)
            })
            .unwrap_or_else(|e| panic!("bind {addr}: {e}"));
        tokio::net::TcpListener::from_std(std_listener).expect("register listener")
    }

    /// Connects from inside the namespace.
    pub async fn connect(&self, addr: SocketAddr) -> io::Result<tokio::net::TcpStream> {
        let socket = self.run(move || {
            if addr.is_ipv4() {
                tokio::net::TcpSocket::new_v4()
            } else {
                tokio::net::TcpSocket::new_v6()
            }
        })?;
        let stream = socket.connect(addr).await?;
        stream.set_nodelay(true)?;
        Ok(stream)
    }
}

impl Netns {
    /// `n` unconnected IPv4 TCP sockets made inside the namespace on one thread, each bound to
    /// `src` (port 0) when given. Connect them with `TcpSocket::connect`, which does not block.
    pub fn sockets(
        &self,
        n: usize,
        src: Option<std::net::IpAddr>,
    ) -> io::Result<Vec<tokio::net::TcpSocket>> {
        self.run(move || {
            (0..n)
                .map(|_| {
                    let s = tokio::net::TcpSocket::new_v4()?;
                    if let Some(ip) = src {
                        s.bind(SocketAddr::new(ip, 0))?;
                    }
                    Ok(s)
                })
                .collect()
        })
    }

    /// Connects from inside the namespace, from the source address `src`.
    pub async fn connect_from(
        &self,
        src: std::net::IpAddr,
        addr: SocketAddr,
    ) -> io::Result<tokio::net::TcpStream> {
        let socket = self.sockets(1, Some(src))?.remove(0);
        let stream = socket.connect(addr).await?;
        stream.set_nodelay(true)?;
        Ok(stream)
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        let _ = Command::new("ip")
            .args(["netns", "del", &self.name])
            .status();
        crate::cleanup::forget(&crate::cleanup::Item::Netns(self.name.clone()));
    }
}

/// Joins two namespaces with a veth pair, created directly inside them so that names never
/// clash in the root namespace. Addresses are `CIDR`s.
pub fn veth(a: &Netns, a_if: &str, a_addr: &str, b: &Netns, b_if: &str, b_addr: &str) {
    sh(&[
        "ip",
        "link",
        "add",
        a_if,
        "netns",
        a.name(),
        "type",
        "veth",
        "peer",
        "name",
        b_if,
        "netns",
        b.name(),
    ]);
    a.ip(&["addr", "add", a_addr, "dev", a_if]);
    b.ip(&["addr", "add", b_addr, "dev", b_if]);
    a.ip(&["link", "set", a_if, "up"]);
    b.ip(&["link", "set", b_if, "up"]);
}
