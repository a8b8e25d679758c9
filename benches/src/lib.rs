//! Benchmarks of enclave-net.
//!
//! - `cargo bench -p enclave-net-benches --bench codec`: the stream header codec;
//! - `cargo bench -p enclave-net-benches --bench stack`: bulk TCP through smoltcp with the
//!   sockets configured as enclave-proxy configures them, over an in-memory device;
//! - `enclave-bench` (`src/bin/enclave-bench.rs`): the macro benchmark against the peers, on
//!   the emulated enclave. Its parts live here:
//!   - [`tools`]: memcaslap and iperf3 in a namespace, and the proxies' CPU time;
//!   - [`loadgen`]: the open-loop memcached generator behind the latency table;
//!   - [`enclave_net_tests::idle`] (in the test harness, shared with the scale test): the idle
//!     connections of the scale table;
//!   - [`report`]: medians, ratios, the Markdown tables and the JSON.
#![forbid(unsafe_code)]

pub mod loadgen;
pub mod report;
pub mod tools;
