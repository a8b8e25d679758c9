//! Test harness for enclave-net: namespaces, daemons and traffic, all cleaned up on drop.
//!
//! Every test needs root (namespaces, TAP devices). Each builds its own [`topology::Topology`],
//! so tests can run in parallel; namespace names carry the test process's PID.
#![forbid(unsafe_code)]
// These tests time real processes across namespaces, so wall-clock `std::time::Instant` is right here.
#![allow(clippy::unwrap_used, missing_docs, clippy::disallowed_types)]

pub mod cleanup;
pub mod docker;
pub mod lab;
pub mod netns;
pub mod process;
pub mod topology;
pub mod traffic;

/// Panics with a clear message unless running as root.
pub fn require_root() {
    assert!(
        nix::unistd::geteuid().is_root(),
        "these tests create network namespaces and TAP devices: run them as root"
    );
}
