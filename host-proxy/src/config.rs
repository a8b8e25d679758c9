//! Configuration: command-line options, and the same as keys of a `--config` file
//! ([`common::config_file`]).

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
    /// A TOML file of options: each key is an option's long name with underscores
    /// (`max_udp_flows = 512`); an option on the command line overrides its key. See README,
    /// "Config files".
    #[arg(long, value_name = "PATH")]
    pub config: Option<std::path::PathBuf>,

    /// Where enclave-proxy accepts ingress streams (vsock:CID:PORT or unix:PATH).
    #[arg(long, value_name = "ADDR")]
    pub enclave: LinkAddr,

    /// Where to accept egress streams from enclave-proxy.
    #[arg(long, value_name = "ADDR", default_value = "vsock:any:5001")]
    pub listen: LinkAddr,

    /// Publish a port: `[IP:]HOST_PORT[:ENCLAVE_PORT]`, ranges of equal length allowed. Repeatable.
    #[arg(long = "publish", short = 'p', value_name = "SPEC")]
    pub publish: Vec<Publish>,

    /// Publishes UDP: `[IP:]HOST_PORT[:ENCLAVE_PORT]`, the syntax of `--publish`; repeatable.
    /// Each client address and port is one flow into the enclave.
    #[arg(long = "publish-udp", value_name = "SPEC")]
    pub publish_udp: Vec<Publish>,

    /// Forward every TCP connection arriving on these ports to the same port in the enclave,
    /// through one listener and an nftables table of host-proxy's own: `[IFACE:]RANGE[,RANGE...]`,
    /// for example `eth0:80,443,1024-61439`. Repeatable. Ports outside stay the parent's own.
    #[arg(long = "publish-transparent", value_name = "[IFACE:]PORTS")]
    pub publish_transparent: Vec<crate::transparent::Transparent>,

    /// The one port the transparent ranges are redirected to; it must lie outside them.
    #[arg(long, value_name = "PORT", default_value = "61440")]
    pub transparent_port: u16,

    /// The most UDP ingress flows at once; past it a new client's datagrams are dropped and
    /// counted.
    #[arg(long, value_name = "N", default_value = "1024", value_parser = parse_cap)]
    pub max_udp_flows: usize,

    /// Allow egress to `CIDR[:PORTS]`. Repeatable; the most specific rule wins, and at a tie an
    /// operator's rule beats a default, so `--allow 169.254.169.254/32:80` re-opens one port.
    #[arg(long = "allow", value_name = "CIDR[:PORTS]", value_parser = parse_allow)]
    pub allow: Vec<Rule>,

    /// Deny egress to `CIDR[:PORTS]`. Repeatable. 169.254.0.0/16, loopback, the parent's own
    /// addresses and the other ways to reach the parent are denied by default.
    #[arg(long = "deny", value_name = "CIDR[:PORTS]", value_parser = parse_deny)]
    pub deny: Vec<Rule>,

    /// How long an egress connect to a destination may take.
    #[arg(long, value_name = "SECONDS", default_value = "10", value_parser = common::cli::parse_secs)]
    pub connect_timeout: Duration,

    /// How long a peer may take to send a header or a status.
    #[arg(long, value_name = "SECONDS", default_value = "5", value_parser = common::cli::parse_secs)]
    pub handshake_timeout: Duration,

    /// Close a connection with a reset once no byte has moved either way for this long.
    /// Default: never (TCP keep-alive still finds peers that vanished).
    #[arg(long, value_name = "SECONDS", value_parser = common::cli::parse_secs)]
    pub idle_timeout: Option<Duration>,

    /// The most ingress connections carried at once; past it a new client is reset.
    #[arg(long, value_name = "N", default_value = "16384", value_parser = parse_cap)]
    pub max_ingress: usize,

    /// The most egress connections carried at once; past it the enclave's connect fails.
    #[arg(long, value_name = "N", default_value = "16384", value_parser = parse_cap)]
    pub max_egress: usize,

    /// The most ingress connections from one client address at once (IPv6: one /64); past it
    /// that client is reset. Also the most UDP ingress flows of one client address on one
    /// published UDP port; past it that client's new flows are dropped. Raise it when clients
    /// arrive through a proxy or load balancer that hides their addresses.
    #[arg(long, value_name = "N", default_value = "256", value_parser = parse_cap)]
    pub max_per_client: usize,

    /// Removed: the one shared cap became `--max-ingress` and `--max-egress`. Kept only to say
    /// so, rather than let an old unit file fail with a bare "unexpected argument".
    #[arg(long, value_name = "N", hide = true, value_parser = reject_max_connections)]
    pub max_connections: Option<usize>,

    /// Worker threads. 1 keeps every hop of a connection on one thread, which is fastest when
    /// cores are scarce; 0 means one per core, for parents with many cores and streams.
    #[arg(long, default_value = "1")]
    pub threads: usize,

    /// Buffer of each vsock link stream, in KiB: the credit it grants the other daemon. vsock's
    /// own default, 256 KiB, stalls multi-gigabit streams; see the README for the choice.
    /// Ignored on unix: links.
    #[arg(long, value_name = "KIB", default_value = "2048", value_parser = clap::value_parser!(u64).range(64..=65536))]
    pub vsock_buffer_kib: u64,

    /// Serve Prometheus metrics at `http://ADDR/metrics` (for example 127.0.0.1:9464). Off by
    /// default; it tells whoever reaches it what the enclave's traffic looks like, so bind it
    /// where only the monitoring can.
    #[arg(long, value_name = "ADDR")]
    pub metrics: Option<std::net::SocketAddr>,

    /// Log format: text or json.
    #[arg(long, default_value = "text")]
    pub log_format: LogFormat,

    /// A resolver for the enclave's DNS queries, `IP` or `IP:PORT` (port 53 by default);
    /// repeatable, tried in order. Without it, the nameservers of `--resolv-conf`, re-read
    /// whenever that file changes.
    #[arg(long = "dns-upstream", value_name = "IP[:PORT]", value_parser = crate::dns::parse_upstream)]
    pub dns_upstream: Vec<std::net::SocketAddr>,

    /// The parent's resolver configuration, whose `nameserver` lines serve the enclave when no
    /// `--dns-upstream` is given.
    #[arg(long, value_name = "PATH", default_value = "/etc/resolv.conf")]
    pub resolv_conf: std::path::PathBuf,

    /// How long one enclave DNS query may take over all resolvers before the enclave is
    /// answered SERVFAIL: below the 5 s after which glibc's stub resolver gives up on a server.
    #[arg(long, value_name = "SECONDS", default_value = "3", value_parser = common::cli::parse_secs)]
    pub dns_timeout: Duration,

    /// A UDP flow from the enclave ends after this long without a datagram either way. 60 s
    /// covers request/response protocols and keeps NAT-style state short; streams that are
    /// quiet longer (a QUIC connection's keep-alives come every 15-30 s) open a new flow.
    #[arg(long, value_name = "SECONDS", default_value = "60", value_parser = common::cli::parse_secs)]
    pub udp_idle_timeout: Duration,
}

impl Config {
    /// Checks what each option alone cannot: no host port is published twice for one protocol.
    /// `origin` says where each value was set, for the message.
    pub fn check(&self, origin: &common::config_file::Origin) -> Result<(), String> {
        for (long, list) in [
            ("publish", &self.publish),
            ("publish-udp", &self.publish_udp),
        ] {
            for (i, a) in list.iter().enumerate() {
                if let Some((j, b)) = list
                    .iter()
                    .enumerate()
                    .skip(i + 1)
                    .find(|(_, b)| a.overlaps(b))
                {
                    return Err(format!(
                        "--{long} {a} ({}) and --{long} {b} ({}) overlap: a host port can be \
                         published only once",
                        origin.of(long, i),
                        origin.of(long, j)
                    ));
                }
            }
        }
        for (i, t) in self.publish_transparent.iter().enumerate() {
            let at = origin.of("publish-transparent", i);
            if t.ports.contains(self.transparent_port) {
                return Err(format!(
                    "--publish-transparent {t} ({at}) covers --transparent-port {}, which its \
                     connections are redirected to",
                    self.transparent_port
                ));
            }
            for (j, p) in self.publish.iter().enumerate() {
                if let Some(port) = p
                    .pairs()
                    .map(|(a, _)| a.port())
                    .find(|&h| t.ports.contains(h))
                {
                    return Err(format!(
                        "--publish-transparent {t} ({at}) and --publish {p} ({}) overlap at port \
                         {port}: a host port can be published only once",
                        origin.of("publish", j)
                    ));
                }
            }
        }
        if self
            .publish
            .iter()
            .flat_map(|p| p.pairs())
            .any(|(a, _)| a.port() == self.transparent_port)
            && !self.publish_transparent.is_empty()
        {
            return Err(format!(
                "--transparent-port {} is also a --publish port",
                self.transparent_port
            ));
        }
        Ok(())
    }
}

/// A cap: a whole number of connections, at least 1.
fn parse_cap(s: &str) -> Result<usize, String> {
    match s.parse::<usize>() {
        Ok(n) if n > 0 => Ok(n),
        _ => Err(format!("{s:?} is not a number of connections from 1 up")),
    }
}

fn reject_max_connections(_: &str) -> Result<usize, String> {
    Err(
        "host-proxy has separate caps now: use --max-ingress and --max-egress \
         (and --max-per-client)"
            .into(),
    )
}

fn parse_allow(s: &str) -> Result<Rule, String> {
    Rule::parse(s, Action::Allow).map_err(|e| e.to_string())
}

fn parse_deny(s: &str) -> Result<Rule, String> {
    Rule::parse(s, Action::Deny).map_err(|e| e.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn overlapping_publishes_are_refused_with_where_they_came_from() {
        let check = |args: &[&str]| {
            let mut all = vec!["host-proxy", "--enclave", "unix:/x"];
            all.extend_from_slice(args);
            Config::try_parse_from(all)
                .unwrap()
                .check(&common::config_file::Origin::default())
        };
        assert!(check(&["-p", "8080:80", "-p", "9000-9010:9000-9010"]).is_ok());
        let e = check(&["-p", "8080:80", "-p", "8000-8100:8000-8100"]).unwrap_err();
        assert!(e.contains("8080:80") && e.contains("8000-8100") && e.contains("the command line"));
        assert!(
            check(&["--publish-udp", "53", "-p", "53"]).is_ok(),
            "TCP and UDP apart"
        );
        let e = check(&["-p", "8080:80", "--publish-transparent", "eth0:8000-8100"]).unwrap_err();
        assert!(e.contains("port 8080"), "{e}");
        let e = check(&["--publish-transparent", "1024-65535"]).unwrap_err();
        assert!(e.contains("--transparent-port 61440"), "{e}");
        assert!(check(&["--publish-transparent", "eth0:80,443,1024-61439"]).is_ok());
    }

    /// config/host-proxy.example.toml has a key for every option, and loads, with every value
    /// it shows live too; its publishes do not overlap.
    #[test]
    fn the_example_config_is_complete_and_valid() {
        let path = concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/../config/host-proxy.example.toml"
        );
        let (config, origin) =
            common::config_file::check_example::<Config>("host-proxy", path.as_ref()).unwrap();
        config.check(&origin).unwrap();
    }

    #[test]
    fn caps_and_timeouts() {
        let c = Config::try_parse_from(["host-proxy", "--enclave", "unix:/x"]).unwrap();
        assert_eq!(
            (c.max_ingress, c.max_egress, c.max_per_client),
            (16384, 16384, 256)
        );
        assert_eq!(c.idle_timeout, None);
        let c = Config::try_parse_from([
            "host-proxy",
            "--enclave",
            "unix:/x",
            "--max-ingress",
            "10",
            "--max-egress",
            "20",
            "--max-per-client",
            "3",
            "--idle-timeout",
            "90",
        ])
        .unwrap();
        assert_eq!((c.max_ingress, c.max_egress, c.max_per_client), (10, 20, 3));
        assert_eq!(c.idle_timeout, Some(Duration::from_secs(90)));
        assert!(Config::try_parse_from([
            "host-proxy",
            "--enclave",
            "unix:/x",
            "--max-egress",
            "0"
        ])
        .is_err());
    }

    #[test]
    fn the_old_shared_cap_says_what_replaced_it() {
        let err = Config::try_parse_from([
            "host-proxy",
            "--enclave",
            "unix:/x",
            "--max-connections",
            "100",
        ])
        .unwrap_err()
        .to_string();
        assert!(err.contains("--max-ingress"), "{err}");
    }
}
