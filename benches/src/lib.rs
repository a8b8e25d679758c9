//! Benchmarks of enclave-net.
//!
//! - `cargo bench -p enclave-net-benches --bench codec`: the stream header codec;
//! - `cargo bench -p enclave-net-benches --bench stack`: bulk TCP through smoltcp with the
//!   sockets configured as enclave-proxy configures them, over an in-memory device;
//! - `benches/run.sh` (issue 3): the macro benchmark against the peers.
#![forbid(unsafe_code)]
