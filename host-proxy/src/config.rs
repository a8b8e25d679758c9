//! Command-line configuration.

use std::time::Duration;

use clap::Parser;
use common::telemetry::LogFormat;
use common::transport::LinkAddr;

use crate::policy::{Action, Rule};
use crate::publish::Publish;

/// enclave-net's parent-side daemon: publishes ports into the enclave and carries the enclave's
/// outgoing TCP connections under an egress policy.
#[derive(Debug, Clone, Parser)]
#[command(name = "host-proxy", version)]
pub struct Config {
    /// Where enclave-proxy accepts ingress streams (vsock:CID:PORT or unix:PATH).
    #[arg(long, value_name = "ADDR")]
    pub enclave: LinkAddr,

    /// Where to accept egress streams from enclave-proxy.
    #[arg(long, value_name = "ADDR", default_value = "vsock:any:5001")]
    pub listen: LinkAddr,

    /// Publish a port: `[IP:]HOST_PORT[:ENCLAVE_PORT]`, ranges of equal length allowed. Repeatable.
    #[arg(long = "publish", short = 'p', value_name = "SPEC")]
    pub publish: Vec<Publish>,

    /// Allow egress to `CIDR[:PORTS]`. Repeatable; the most specific rule wins.
    #[arg(long = "allow", value_name = "CIDR[:PORTS]", value_parser = parse_allow)]
    pub allow: Vec<Rule>,

    /// Deny egress to `CIDR[:PORTS]`. Repeatable. 169.254.0.0/16 and 127.0.0.0/8 are denied by
    /// default.
    #[arg(long = "deny", value_name = "CIDR[:PORTS]", value_parser = parse_deny)]
    pub deny: Vec<Rule>,

    /// How long an egress connect to a destination may take.
    #[arg(long, value_name = "SECONDS", default_value = "10", value_parser = common::cli::parse_secs)]
    pub connect_timeout: Duration,

    /// How long a peer may take to send a header or a status.
    #[arg(long, value_name = "SECONDS", default_value = "5", value_parser = common::cli::parse_secs)]
    pub handshake_timeout: Duration,

    /// The most connections carried at once, ingress and egress together.
    #[arg(long, default_value = "16384")]
    pub max_connections: usize,

    /// Worker threads. 1 keeps every hop of a connection on one thread, which is fastest when
    /// cores are scarce; 0 means one per core, for parents with many cores and streams.
    #[arg(long, default_value = "1")]
    pub threads: usize,

    /// Log format: text or json.
    #[arg(long, default_value = "text")]
    pub log_format: LogFormat,
}

fn parse_allow(s: &str) -> Result<Rule, String> {
    Rule::parse(s, Action::Allow).map_err(|e| e.to_string())
}

fn parse_deny(s: &str) -> Result<Rule, String> {
    Rule::parse(s, Action::Deny).map_err(|e| e.to_string())
}
