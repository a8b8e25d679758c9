//! Shared pieces of enclave-net's two daemons.
//!
//! Layers, from the wire up:
//! - [`wire`]: the sans-IO stream header and status codec (the protocol primer lives there);
//! - [`frame`]: the payload framing after the status (data, FIN, RST; primer there);
//! - [`transport`]: `vsock:CID:PORT` and `unix:PATH` link addresses and streams, with the 32 KiB
//!   write cap;
//! - [`handshake`]: reading and writing those messages on a stream with deadlines;
//! - [`metrics`]: connection and byte counters;
//! - [`exposition`]: those counters as Prometheus metrics, and the HTTP responder;
//! - [`cli`]: command-line value parsers;
//! - [`ports`]: port lists such as `80,443,8000-8100`;
//! - [`serve`]: the accept loop shared by every listener;
//! - [`sys`]: allocator tuning, the crate's one unsafe call;
//! - [`telemetry`]: tracing set-up and shutdown signals.
#![deny(unsafe_code)]

pub mod cli;
pub mod config_file;
pub mod datagram;
pub mod dns;
pub mod exposition;
pub mod frame;
pub mod handshake;
pub mod metrics;
pub mod ports;
pub mod serve;
pub mod sys;
pub mod telemetry;
pub mod transport;
pub mod wire;
