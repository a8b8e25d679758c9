//! Configuration: command-line options, and the same as keys of a `--config` file
//! ([`common::config_file`]).

use std::net::Ipv4Addr;
use std::time::Duration;

use clap::Parser;
use common::ports::PortSet;
use common::telemetry::LogFormat;
use common::transport::LinkAddr;

/// enclave-net's in-enclave daemon: owns the TAP device that is the enclave's default route and
/// carries every TCP connection across it to and from host-proxy, one vsock stream each.
#[derive(Debug, Clone, Parser)]
#[command(name = "enclave-proxy", version)]
pub struct Config {
    /// A TOML file of options: each key is an option's long name with underscores
    /// (`max_udp_flows = 512`); an option on the command line overrides its key. See README,
    /// "Config files".
    #[arg(long, value_name = "PATH")]
    pub config: Option<std::path::PathBuf>,

    /// Where egress streams go: host-proxy's --listen (vsock:CID:PORT, hvsock:PATH:PORT or
    /// unix:PATH).
    #[arg(long, value_name = "ADDR", default_value = "vsock:3:5001")]
    pub host: LinkAddr,

    /// Where ingress streams from host-proxy arrive.
    #[arg(long, value_name = "ADDR", default_value = "vsock:any:5000")]
    pub listen: LinkAddr,

    /// TAP device name.
    #[arg(long, default_value = "tap0")]
    pub tap: String,

    /// The enclave kernel's side of the TAP, as ADDRESS/PREFIX.
    #[arg(long, value_name = "CIDR", default_value = "10.240.0.2/30", value_parser = parse_cidr)]
    pub address: (Ipv4Addr, u8),

    /// The userspace stack's side of the TAP: the enclave's default gateway.
    #[arg(long, value_name = "IP", default_value = "10.240.0.1")]
    pub gateway: Ipv4Addr,

    /// TAP MTU. The default, 65520, was chosen by measurement: the userspace stack costs a roughly
    /// fixed amount per packet, so the largest frames move the most bytes per CPU cycle (see
    /// README, "Choosing the MTU").
    #[arg(long, default_value = "65520", value_parser = clap::value_parser!(u32).range(576..=65521))]
    pub mtu: u32,

    /// Enclave ports that ingress may reach, like 80,443,8000-8100 (default: all). Streams for
    /// other ports are answered "denied": the host is untrusted.
    #[arg(long, value_name = "PORTS")]
    pub expose: Option<PortSet>,

    /// How long an egress connection may take to be confirmed by host-proxy, and an ingress
    /// connection to be accepted inside the enclave.
    #[arg(long, value_name = "SECONDS", default_value = "15", value_parser = common::cli::parse_secs)]
    pub connect_timeout: Duration,

    /// How long host-proxy may take to send an ingress header.
    #[arg(long, value_name = "SECONDS", default_value = "5", value_parser = common::cli::parse_secs)]
    pub handshake_timeout: Duration,

    /// The most ingress connections carried at once; past it host-proxy is answered at once.
    #[arg(long, value_name = "N", default_value = "16384")]
    pub max_ingress: usize,

    /// The most egress connections at once, those waiting on host-proxy included; past it an
    /// application's connect() fails at once.
    #[arg(long, value_name = "N", default_value = "16384")]
    pub max_egress: usize,

    /// The most egress connections waiting on host-proxy for one destination (IP and port), so
    /// that a slow or black-holed destination delays only its own connections. A connect only
    /// waits for one host-proxy round trip and the destination's handshake, so the default
    /// leaves room for large bursts to one healthy server.
    #[arg(long, value_name = "N", default_value = "1024")]
    pub max_pending_per_destination: usize,

    /// Per-connection TCP buffer in each direction, in KiB. Memory is only committed as it is
    /// used, so idle connections stay small.
    #[arg(long, value_name = "KIB", default_value = "512", value_parser = clap::value_parser!(u32).range(16..=65536))]
    pub tcp_buffer_kib: u32,

    /// Buffer of each vsock link stream, in KiB: the credit it grants the other daemon. vsock's
    /// own default, 256 KiB, stalls multi-gigabit streams; see the README for the choice.
    /// Ignored on unix: links.
    #[arg(long, value_name = "KIB", default_value = "2048", value_parser = clap::value_parser!(u64).range(64..=65536))]
    pub vsock_buffer_kib: u64,

    /// TCP segmentation offload on the TAP: `on` lets TCP cross it in super-frames of up to
    /// 64 KiB both ways, container traffic included (whose own MSS is 1,460); `off` keeps every
    /// frame within the flow's MSS, as the kernel would send it on a wire. If the kernel refuses
    /// TSO, enclave-proxy logs why and runs as with `off`.
    #[arg(long, value_name = "on|off", default_value = "on")]
    pub offload: Offload,

    /// Log format: text or json.
    #[arg(long, default_value = "text")]
    pub log_format: LogFormat,

    /// Do not answer DNS at the gateway. By default enclave-proxy answers DNS on UDP and TCP
    /// port 53 at the gateway address (not on loopback: Docker replaces a loopback resolver in
    /// containers) and forwards every query to host-proxy, which asks the parent's resolvers.
    #[arg(long)]
    pub no_dns: bool,

    /// Write a resolv.conf here naming the gateway as nameserver, once the TAP is up (for
    /// example /etc/resolv.conf: containers on Docker's default bridge then inherit it).
    #[arg(long, value_name = "PATH")]
    pub resolv_conf: Option<std::path::PathBuf>,

    /// A UDP flow (the app's socket and one destination) ends after this long without a
    /// datagram either way: 60 s covers request/response protocols and keeps state short; a
    /// quieter stream opens a new flow when it speaks again.
    #[arg(long, value_name = "SECONDS", default_value = "60", value_parser = common::cli::parse_secs)]
    pub udp_idle_timeout: Duration,

    /// The most UDP flows (DNS included) at once. Each is a task and a link stream (host-proxy
    /// spends one socket on it); past the cap a new flow's datagrams are dropped and counted.
    #[arg(long, value_name = "N", default_value = "1024")]
    pub max_udp_flows: usize,

    /// Serve enclave-proxy's own Prometheus metrics on this port of the gateway address
    /// (`http://GATEWAY:PORT/metrics`), and to ingress streams for this port, so the parent
    /// scrapes it by publishing the port (`host-proxy --publish 9465:PORT`). Off by default.
    /// The port is then enclave-proxy's: ingress to it never reaches the enclave's own servers.
    #[arg(long, value_name = "PORT", value_parser = clap::value_parser!(u16).range(1..))]
    pub metrics_port: Option<u16>,

    /// Say `READY=1` here once serving, for an init that runs no service manager: into a FIFO
    /// (`mkfifo`) once a reader opens it, so the init waits with `read _ < PATH`; else as a
    /// file, created then and removed at exit (README, "Starting in the enclave").
    #[arg(long, value_name = "PATH")]
    pub ready_file: Option<std::path::PathBuf>,
}

/// Whether the TAP does TCP segmentation offload (see [`Config::offload`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Offload {
    /// TSO both ways, if the kernel allows it.
    On,
    /// Checksum offload only: every frame within its flow's MSS.
    Off,
}

impl Config {
    /// Checks what clap cannot: that the gateway sits on the TAP's subnet and differs from the
    /// enclave address.
    pub fn validate(&self) -> Result<(), String> {
        let (addr, prefix) = self.address;
        if !on_subnet(self.gateway, addr, prefix) {
            return Err(format!(
                "--gateway {} is not on the subnet of --address {addr}/{prefix}",
                self.gateway
            ));
        }
        if addr == self.gateway {
            return Err(format!("--gateway and --address are both {addr}"));
        }
        if self.metrics_port == Some(crate::udp::DNS_PORT) && !self.no_dns {
            return Err("--metrics-port 53 is the gateway's DNS port (or set --no-dns)".into());
        }
        Ok(())
    }
}

/// Whether `ip` is on the `/prefix` subnet of `net`.
pub fn on_subnet(ip: Ipv4Addr, net: Ipv4Addr, prefix: u8) -> bool {
    let mask = u32::MAX.checked_shl(32 - u32::from(prefix)).unwrap_or(0);
    u32::from(ip) & mask == u32::from(net) & mask
}

fn parse_cidr(s: &str) -> Result<(Ipv4Addr, u8), String> {
    let err = || format!("{s:?} is not an IPv4 ADDRESS/PREFIX such as 10.240.0.2/30");
    let (a, p) = s.split_once('/').ok_or_else(err)?;
    let addr: Ipv4Addr = a.parse().map_err(|_| err())?;
    let prefix: u8 = p.parse().map_err(|_| err())?;
    if prefix == 0 || prefix > 30 {
        return Err(format!(
            "{s:?}: the prefix must be 1 to 30, to leave room for the gateway"
        ));
    }
    Ok((addr, prefix))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// config/enclave-proxy.example.toml has a key for every option, and loads, with every
    /// value it shows live too.
    #[test]
    fn the_example_config_is_complete_and_valid() {
        let path = concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/../config/enclave-proxy.example.toml"
        );
        common::config_file::check_example::<Config>("enclave-proxy", path.as_ref()).unwrap();
    }
}
