//! Test harness for enclave-net: namespaces, daemons and traffic, all cleaned up on drop.
//!
//! Every test needs root (namespaces, TAP devices). Each builds its own [`topology::Topology`],
//! so tests can run in parallel; namespace names carry the test process's PID.
#![forbid(unsafe_code)]
// These tests time real processes across namespaces, so wall-clock `std::time::Instant` is right here.
#![allow(clippy::unwrap_used, missing_docs, clippy::disallowed_types)]

pub mod cleanup;
pub mod dns;
pub mod docker;
pub mod idle;
pub mod lab;
pub mod microvm;
pub mod netns;
pub mod process;
pub mod scrape;
pub mod topology;
pub mod traffic;

/// Panics with a clear message unless running as root.
pub fn require_root() {
    assert!(
        nix::unistd::geteuid().is_root(),
        "these tests create network namespaces and TAP devices: run them as root"
    );
}

/// Raises this process's open-file limit to at least `n` if it may: the hard limit too when the
/// process has `CAP_SYS_RESOURCE`, otherwise the soft limit up to the hard one. Daemons started
/// afterwards inherit it. Returns the soft limit now in force.
pub fn raise_nofile(n: u64) -> u64 {
    use nix::sys::resource::{getrlimit, setrlimit, Resource};
    let (soft, hard) = getrlimit(Resource::RLIMIT_NOFILE).expect("getrlimit");
    if soft >= n {
        return soft;
    }
    if setrlimit(Resource::RLIMIT_NOFILE, n, hard.max(n)).is_ok() {
        return n;
    }
    let _ = setrlimit(Resource::RLIMIT_NOFILE, hard, hard);
    getrlimit(Resource::RLIMIT_NOFILE).expect("getrlimit").0
}

/// Runs a test body with a time limit, so a hang fails instead of stalling CI.
pub async fn bounded<F: std::future::Future<Output = ()>>(secs: u64, f: F) {
    tokio::time::timeout(std::time::Duration::from_secs(secs), f)
        .await
        .expect("test timed out");
}

/// An address in the "internet" namespace.
pub fn internet(port: u16) -> std::net::SocketAddr {
    std::net::SocketAddr::from((topology::INTERNET_IP, port))
}
