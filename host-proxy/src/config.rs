//! Configuration: command-line options, and the same as keys of a `--config` file
//! ([`common::config_file`]).

use std::time::Duration;

use clap::Parser;
use common::telemetry::LogFormat;
use common::transport::LinkAddr;

use common::config_file::Origin;

use crate::policy::{Action, Rule};
use crate::publish::Publish;
use crate::transparent::Transparent;

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

    /// Where enclave-proxy accepts ingress streams (vsock:CID:PORT, hvsock:PATH:PORT for a
    /// guest behind Firecracker, Cloud Hypervisor or vhost-device-vsock, or unix:PATH). Several
    /// enclaves are set in a config file, one `[[enclaves]]` table each (README, "Several
    /// enclaves").
    #[arg(long, value_name = "ADDR")]
    pub enclave: LinkAddr,

    /// The enclave's name in logs and metrics (default: its `--enclave` address): 1 to 64
    /// letters, digits and `_.:/-`.
    #[arg(long, value_name = "NAME", value_parser = parse_name)]
    pub name: Option<String>,

    /// Where to accept egress streams from enclave-proxy. On vsock, each stream is the
    /// enclave's whose CID it comes from; a stream from any other CID is refused.
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
    pub publish_transparent: Vec<Transparent>,

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

/// The keys one `[[enclaves]]` table of a config file sets; every other key is set once, for
/// every enclave.
pub const PER_ENCLAVE: common::config_file::Sections<'static> = common::config_file::Sections {
    key: "enclaves",
    keys: &[
        "name",
        "enclave",
        "listen",
        "publish",
        "publish_udp",
        "publish_transparent",
        "allow",
        "deny",
    ],
};

impl Config {
    /// The enclave's name in logs and metrics: `--name`, else the `--enclave` address.
    pub fn label(&self) -> String {
        self.name
            .clone()
            .unwrap_or_else(|| self.enclave.to_string())
    }

    /// The enclave's vsock context ID, when it is reached over vsock.
    pub fn cid(&self) -> Option<u32> {
        match self.enclave {
            LinkAddr::Vsock { cid, .. } => Some(cid),
            LinkAddr::Unix(_) | LinkAddr::Hybrid { .. } => None,
        }
    }
}

/// Checks what each option alone cannot, over every enclave served (one per `[[enclaves]]`
/// table, or the one): no host port is published twice for one protocol, the transparent ranges
/// keep clear of each other, of the publishes and of `--transparent-port`, and each enclave's
/// egress streams can be told apart from the others'. `Origin` says where each value was set, for
/// the message.
pub fn check(all: &[(Config, Origin)]) -> Result<(), String> {
    for long in ["publish", "publish-udp"] {
        let list: Vec<(&Publish, String)> = all
            .iter()
            .flat_map(|(c, origin)| {
                let specs = if long == "publish" {
                    &c.publish
                } else {
                    &c.publish_udp
                };
                specs
                    .iter()
                    .enumerate()
                    .map(|(i, p)| (p, origin.of(long, i)))
            })
            .collect();
        for (i, (a, at_a)) in list.iter().enumerate() {
            if let Some((b, at_b)) = list[i + 1..].iter().find(|(b, _)| a.overlaps(b)) {
                return Err(format!(
                    "--{long} {a} ({at_a}) and --{long} {b} ({at_b}) overlap: a host port can be \
                     published only once"
                ));
            }
        }
    }
    // Each range with its enclave's index.
    let transparent: Vec<(usize, &Transparent, String)> = all
        .iter()
        .enumerate()
        .flat_map(|(e, (c, origin))| {
            c.publish_transparent
                .iter()
                .enumerate()
                .map(move |(i, t)| (e, t, origin.of("publish-transparent", i)))
        })
        .collect();
    let publishes = || {
        all.iter().flat_map(|(c, origin)| {
            c.publish
                .iter()
                .enumerate()
                .map(|(i, p)| (p, origin.of("publish", i)))
        })
    };
    let to = all[0].0.transparent_port;
    for (i, (mine, t, at)) in transparent.iter().enumerate() {
        if t.ports.contains(to) {
            return Err(format!(
                "--publish-transparent {t} ({at}) covers --transparent-port {to}, which its \
                 connections are redirected to"
            ));
        }
        for (p, at_p) in publishes() {
            if let Some(port) = p
                .pairs()
                .map(|(a, _)| a.port())
                .find(|&h| t.ports.contains(h))
            {
                return Err(format!(
                    "--publish-transparent {t} ({at}) and --publish {p} ({at_p}) overlap at port \
                     {port}: a host port can be published only once"
                ));
            }
        }
        // Within one enclave two ranges may share ports on different interfaces; across
        // enclaves a port is one enclave's, as connections are routed by port alone.
        for (theirs, u, at_u) in &transparent[i + 1..] {
            if let (Some(port), true) = (t.ports.common(&u.ports), mine != theirs) {
                return Err(format!(
                    "--publish-transparent {t} ({at}) and --publish-transparent {u} ({at_u}) \
                     of another enclave share port {port}: a port's connections go to one enclave"
                ));
            }
        }
    }
    if !transparent.is_empty() {
        if let Some((p, at)) = publishes().find(|(p, _)| p.pairs().any(|(a, _)| a.port() == to)) {
            return Err(format!(
                "--transparent-port {to} is also published by --publish {p} ({at})"
            ));
        }
    }
    for (c, origin) in all {
        if matches!(c.listen, LinkAddr::Vsock { .. }) && c.cid().is_none() {
            return Err(format!(
                "--listen {} ({}) is vsock, where egress streams are told apart by the peer's \
                 CID, but --enclave {} has none: use a vsock: enclave address, or a unix: or \
                 hvsock: listen address",
                c.listen,
                origin.of("listen", 0),
                c.enclave
            ));
        }
    }
    for (i, (a, at)) in all.iter().enumerate() {
        for (b, at_b) in &all[i + 1..] {
            let (la, lb) = (a.label(), b.label());
            let (at, at_b) = (at.of("enclave", 0), at_b.of("enclave", 0));
            if la == lb {
                return Err(format!(
                    "two enclaves are named {la} ({at} and {at_b}): give each its own `name`"
                ));
            }
            if a.enclave == b.enclave {
                return Err(format!(
                    "enclaves {la} and {lb} have the same address {}",
                    a.enclave
                ));
            }
            if a.listen != b.listen {
                continue;
            }
            let told_apart = matches!(a.listen, LinkAddr::Vsock { .. })
                && a.cid().zip(b.cid()).is_some_and(|(x, y)| x != y);
            if !told_apart {
                return Err(format!(
                    "enclaves {la} ({at}) and {lb} ({at_b}) both send egress to listen {}: \
                     streams are told apart by the vsock peer's CID, so a shared listen address \
                     needs vsock: enclave addresses; with unix: give each enclave its own \
                     `listen` path",
                    a.listen
                ));
            }
        }
    }
    Ok(())
}

/// A cap: a whole number of connections, at least 1.
fn parse_cap(s: &str) -> Result<usize, String> {
    match s.parse::<usize>() {
        Ok(n) if n > 0 => Ok(n),
        _ => Err(format!("{s:?} is not a number of connections from 1 up")),
    }
}

fn parse_name(s: &str) -> Result<String, String> {
    let fits = |c: char| c.is_ascii_alphanumeric() || "_.:/-".contains(c);
    if (1..=64).contains(&s.len()) && s.chars().all(fits) {
        Ok(s.to_string())
    } else {
        Err(format!(
            "{s:?} is not a name: 1 to 64 letters, digits and `_.:/-`"
        ))
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
            let mut all = vec!["host-proxy", "--enclave", "unix:/x", "--listen", "unix:/l"];
            all.extend_from_slice(args);
            let config = Config::try_parse_from(all).unwrap();
            check(&[(config, Origin::default())])
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
        check(&[(config, origin)]).unwrap();
    }

    /// config/host-proxy.several-enclaves.example.toml loads as two enclaves that pass the
    /// checks across enclaves; and those checks refuse what cannot be served apart.
    #[test]
    fn several_enclaves() {
        let load = |text: &str| {
            let path = std::env::temp_dir().join(format!(
                "host-proxy-several-{}-{}.toml",
                std::process::id(),
                text.len()
            ));
            std::fs::write(&path, text).unwrap();
            let args = vec!["host-proxy".into(), "--config".into(), path.clone().into()];
            let loaded = common::config_file::try_parse_sections::<Config>(args, &PER_ENCLAVE)
                .map_err(|e| e.to_string())
                .and_then(|all| check(&all).map(|()| all));
            let _ = std::fs::remove_file(&path);
            loaded
        };
        let example = std::fs::read_to_string(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/../config/host-proxy.several-enclaves.example.toml"
        ))
        .unwrap();
        let all = load(&example).unwrap();
        let names: Vec<String> = all.iter().map(|(c, _)| c.label()).collect();
        assert_eq!(names, ["web", "payments"]);
        assert!(all.iter().all(|(c, _)| c.max_ingress == 4096));
        assert_eq!((all[0].0.cid(), all[1].0.cid()), (Some(16), Some(17)));
        let two = |a: &str, b: &str| {
            format!("[[enclaves]]\nenclave = \"vsock:16:5000\"\n{a}\n[[enclaves]]\nenclave = \"vsock:17:5000\"\n{b}\n")
        };
        for (text, want) in [
            (
                two("publish = [\"80\"]", "publish = [\"79-81:1-3\"]"),
                "overlap",
            ),
            (
                two(
                    "publish_transparent = [\"1000-2000\"]",
                    "publish_transparent = [\"eth1:1500\"]",
                ),
                "of another enclave share port 1500",
            ),
            (
                two("name = \"x\"", "name = \"x\""),
                "two enclaves are named x",
            ),
            (
                two("listen = \"unix:/a\"", "listen = \"unix:/a\"\nname = \"b\""),
                "both send egress to listen unix:/a",
            ),
            (
                "[[enclaves]]\nenclave = \"unix:/e1\"\n[[enclaves]]\nenclave = \"unix:/e2\"\n"
                    .to_string(),
                "is vsock, where egress streams are told apart by the peer's CID",
            ),
        ] {
            let e = load(&text).expect_err(&text);
            assert!(e.contains(want), "{text}: {e}");
        }
        // Unix links apart: each its own listen path.
        let apart = "[[enclaves]]\nenclave = \"unix:/e1\"\nlisten = \"unix:/l1\"\n\
                     [[enclaves]]\nenclave = \"unix:/e2\"\nlisten = \"unix:/l2\"\n";
        assert_eq!(load(apart).unwrap().len(), 2);
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
