//! The macro benchmark: memcaslap, iperf3 and an open-loop latency generator through every path
//! into the emulated enclave, on one topology, in one run, with ratios to DIRECT.
//!
//! Paths (README, "Benchmark"; `--only` picks some):
//! - DIRECT: the load generator inside the enclave namespace, against the published port;
//! - ENCLAVE-NET: the pair;
//! - SPLICE: a socat TCP<->UNIX<->TCP pair (the kernel-path design of vsock-proxy, Oyster and
//!   enclaver);
//! - SLIRP4NETNS and PASTA (tap path, clients from the client namespace), and PASTA's loopback
//!   path (clients on the parent's own loopback, which pasta hands to kernel `splice()`).
//!
//! Figures (`--figures` picks some): memcaslap with the proxies' CPU per transaction, latency
//! percentiles at a fixed rate, iperf3 against a server in the enclave namespace and against one
//! in a container behind `docker run -p`, egress iperf3, DNS round trips to dnsmasq (DIRECT and
//! ENCLAVE-NET: the peers have no resolver inside the test's namespaces), iperf3 over UDP at
//! three datagram sizes, and (ENCLAVE-NET only) single-stream iperf3 with 10,000 idle
//! connections open through the pair.
//!
//! Each figure is the median of `--runs` runs. Output: Markdown tables on stdout and in
//! `--out DIR/<stem>.md`, and every raw run in `--out DIR/<stem>.json`; the stem is `latest` for
//! a full run, `demo`, `pair`, or `partial` when `--only` or `--figures` leave something out.
// The benchmark times real processes, so wall-clock time is right here.
#![allow(clippy::disallowed_types, clippy::unwrap_used)]

use std::io::{Read, Write};
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::PathBuf;
use std::process::Command;
use std::time::{Duration, Instant};

use clap::{Parser, ValueEnum};
use enclave_net_benches::loadgen;
use enclave_net_benches::report::{self, PathResult, TABLES};
use enclave_net_benches::tools::{self, cpu_secs, iperf3, memcaslap, peak_rss_mib};
use enclave_net_tests::docker::{IPERF3_IMAGE, MEMCACHED_IMAGE};
use enclave_net_tests::idle::{self, Idle};
use enclave_net_tests::lab::Lab;
use enclave_net_tests::netns::Netns;
use enclave_net_tests::process::Daemon;
use enclave_net_tests::topology::INTERNET_IP;
use serde_json::{json, Value};

/// A path into the enclave.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
enum PathId {
    /// No proxy: the load generator in the enclave namespace.
    Direct,
    /// The pair.
    EnclaveNet,
    /// A socat TCP<->UNIX<->TCP pair.
    Splice,
    /// slirp4netns.
    Slirp4netns,
    /// pasta, clients from the client namespace (its tap path).
    Pasta,
    /// pasta, clients on the parent's loopback (its splice path).
    PastaLoopback,
}

/// A group of figures.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
enum Group {
    /// memcaslap TPS and the proxies' CPU per transaction.
    Memcaslap,
    /// Latency percentiles at a fixed rate.
    Latency,
    /// iperf3 against the server in the enclave namespace, 1 and 4 streams, both ways.
    Iperf,
    /// iperf3 against a server in a container behind `docker run -p`.
    Container,
    /// iperf3 from the enclave to a server outside.
    Egress,
    /// ENCLAVE-NET single-stream iperf3 with many idle connections open through the pair.
    Scale,
    /// DNS round trips to dnsmasq: straight, and through the enclave's resolver.
    Dns,
    /// iperf3 over UDP at several datagram sizes, both ways.
    Udp,
}

/// Command-line options.
#[derive(Debug, Parser)]
#[command(name = "enclave-bench")]
struct Args {
    /// Runs per figure; the table shows the median.
    #[arg(long, default_value = "3")]
    runs: usize,
    /// memcaslap duration per run, seconds.
    #[arg(long, default_value = "10")]
    memcaslap_secs: u32,
    /// iperf3 duration per run, seconds.
    #[arg(long, default_value = "5")]
    iperf_secs: u32,
    /// Only DIRECT and ENCLAVE-NET, memcaslap only (the demo).
    #[arg(long)]
    demo: bool,
    /// Only DIRECT and ENCLAVE-NET, every figure: to compare two builds of the pair quickly
    /// (set ENCLAVE_NET_BIN_DIR to the other build's binaries). Writes pair.md and pair.json.
    #[arg(long)]
    pair_only: bool,
    /// Only these paths (comma-separated). Ratios need `direct` among them.
    #[arg(long, value_enum, value_delimiter = ',')]
    only: Vec<PathId>,
    /// Only these figures (comma-separated).
    #[arg(long, value_enum, value_delimiter = ',')]
    figures: Vec<Group>,
    /// Where to write the results.
    #[arg(long, default_value = "benches/results")]
    out: PathBuf,
    /// MTU for slirp4netns and pasta (their best, by DESIGN.md).
    #[arg(long, default_value = "65520")]
    peer_mtu: u32,
    /// Latency: memcached gets per second, over all connections.
    #[arg(long, default_value = "20000")]
    latency_rate: f64,
    /// Latency: connections.
    #[arg(long, default_value = "16")]
    latency_conns: usize,
    /// Latency: measured seconds per run (after a 1 s warm-up).
    #[arg(long, default_value = "10")]
    latency_secs: f64,
    /// Scale: idle connections held open through the pair.
    #[arg(long, default_value = "10000")]
    idle: usize,
    /// Scale: client source addresses the idle connections come from (10.99.0.100 onwards);
    /// host-proxy allows 256 connections per client address by default.
    #[arg(long, default_value = "50", value_parser = clap::value_parser!(u8).range(1..=150))]
    idle_sources: u8,
    /// Internal: be the scale figures' enclave server, holding every connection on this
    /// address until killed.
    #[arg(long, hide = true, value_name = "IP:PORT")]
    hold_idle: Option<std::net::SocketAddrV4>,
}

impl Args {
    fn paths(&self) -> Vec<PathId> {
        if self.demo || self.pair_only {
            vec![PathId::Direct, PathId::EnclaveNet]
        } else if self.only.is_empty() {
            PathId::value_variants().to_vec()
        } else {
            self.only.clone()
        }
    }

    fn has(&self, p: PathId) -> bool {
        self.paths().contains(&p)
    }

    fn wants(&self, g: Group) -> bool {
        if self.demo {
            g == Group::Memcaslap
        } else {
            self.figures.is_empty() || self.figures.contains(&g)
        }
    }

    fn stem(&self) -> &'static str {
        if self.demo {
            "demo"
        } else if self.pair_only {
            "pair"
        } else if !self.only.is_empty() || !self.figures.is_empty() {
            "partial"
        } else {
            "latest"
        }
    }
}

struct Clock(Instant);

impl Clock {
    fn stage(&self, what: &str) {
        println!("[{:>6.1}s] {what}", self.0.elapsed().as_secs_f64());
        let _ = std::io::stdout().flush();
    }
}

/// How a client reaches one path.
struct Target<'a> {
    name: &'static str,
    /// Where the load generators run.
    client: &'a Netns,
    /// memcached in its container.
    memcached: String,
    /// iperf3 in the enclave namespace.
    iperf: Option<String>,
    /// iperf3 in a container.
    container: Option<String>,
    /// Namespace and address for the egress iperf3, where the path has egress.
    egress: Option<(&'a Netns, String)>,
    /// Namespace and resolver for the DNS round trips, where the path has a resolver.
    dns: Option<(&'a Netns, SocketAddr)>,
    /// iperf3 in the enclave namespace over UDP, where the path carries UDP.
    udp: Option<String>,
    /// The proxy processes whose CPU and memory are reported.
    pids: Vec<u32>,
}

/// The iperf3 figures: key, streams, reverse (the server sends).
const IPERF: [(&str, u32, bool); 4] = [
    ("in1", 1, false),
    ("out1", 1, true),
    ("in4", 4, false),
    ("out4", 4, true),
];

/// The UDP figures' datagram sizes: small, one Ethernet frame, and several frames.
const UDP_SIZES: [usize; 3] = [64, 1400, 8000];

/// DNS queries timed per run, one at a time.
const DNS_QUERIES: u16 = 2000;
/// The name the DNS figures look up, in dnsmasq's test zone.
const DNS_NAME: &str = "bench.enclave.test";

/// The enclave's gateway: enclave-proxy, and its resolver.
const GATEWAY: Ipv4Addr = Ipv4Addr::new(10, 240, 0, 1);

/// Published ports. The pair and every peer forward each to the enclave port beside it.
const ENCLAVE_MEMCACHED: u16 = 8080;
const ENCLAVE_IPERF: u16 = 5201;
const ENCLAVE_IPERF_CONTAINER: u16 = 5202;
const ENCLAVE_IDLE: u16 = 7000;
const PAIR_IPERF: u16 = 15201;
const PAIR_IPERF_CONTAINER: u16 = 15202;
const PAIR_IDLE: u16 = 17000;

/// Notices a proxy process that has exited, so that the figures after it fail at once and the
/// notes say when it went.
struct Watch<'a> {
    pids: &'a [u32],
    noted: bool,
}

impl Watch<'_> {
    /// Whether every proxy still runs; if not, notes (once) that one had exited before `what`.
    fn ok(&mut self, r: &mut PathResult, what: &str) -> bool {
        let Some(pid) = self.pids.iter().find(|p| !tools::alive(**p)) else {
            return true;
        };
        if !self.noted {
            r.notes.push(format!(
                "proxy process {pid} had exited before {what}; every figure from there on failed"
            ));
            self.noted = true;
        }
        false
    }
}

fn measure(t: &Target, args: &Args, clock: &Clock) -> PathResult {
    let cpu_before = cpu_secs(&t.pids);
    let mut r = PathResult {
        name: t.name.into(),
        ..Default::default()
    };
    let mut watch = Watch {
        pids: &t.pids,
        noted: false,
    };
    let runs = args.runs;
    if args.wants(Group::Memcaslap) {
        for run in 1..=runs {
            clock.stage(&format!("{}: memcaslap, run {run}/{runs}", t.name));
            if !watch.ok(&mut r, &format!("memcaslap run {run}")) {
                r.push("memcaslap", None);
                r.push("cpu_us_per_txn", None);
                continue;
            }
            let before = cpu_secs(&t.pids);
            let m = memcaslap(t.client, &t.memcached, args.memcaslap_secs);
            // socat's per-connection children: their CPU reaches the parent once reaped.
            tools::settle_children(&t.pids, Duration::from_secs(3));
            let after = cpu_secs(&t.pids);
            r.push("memcaslap", m.map(|m| m.tps));
            if !t.pids.is_empty() {
                let per_txn = match (m, before, after) {
                    (Some(m), Some(b), Some(a)) if m.ops > 0.0 => Some((a - b) * 1e6 / m.ops),
                    _ => None,
                };
                r.push("cpu_us_per_txn", per_txn);
            }
            if m.is_none() {
                r.notes.push(format!("memcaslap: run {run} failed"));
            }
        }
    }
    if args.wants(Group::Latency) {
        for run in 1..=runs {
            clock.stage(&format!(
                "{}: latency at {} gets/s over {} connections, run {run}/{runs}",
                t.name, args.latency_rate, args.latency_conns
            ));
            if !watch.ok(&mut r, &format!("latency run {run}")) {
                for key in ["lat_p50", "lat_p99", "lat_p999", "lat_late", "lat_lost"] {
                    r.push(key, None);
                }
                continue;
            }
            latency(t, args, run, &mut r);
        }
    }
    let bulk = [
        (Group::Iperf, "", &t.iperf, "iperf3"),
        (Group::Container, "c_", &t.container, "container iperf3"),
    ];
    for (group, prefix, addr, what) in bulk {
        let Some(addr) = addr.as_ref().filter(|_| args.wants(group)) else {
            continue;
        };
        for (key, streams, reverse) in IPERF {
            let key = format!("{prefix}{key}");
            for run in 1..=runs {
                clock.stage(&format!("{}: {what} {key}, run {run}/{runs}", t.name));
                if !watch.ok(&mut r, &format!("{what} {key} run {run}")) {
                    r.push(&key, None);
                    continue;
                }
                let v = iperf3(t.client, addr, args.iperf_secs, streams, reverse);
                if v.is_none() {
                    r.notes.push(format!("{what} {key}: run {run} failed"));
                }
                r.push(&key, v);
            }
        }
    }
    if let Some((ns, addr)) = t.egress.as_ref().filter(|_| args.wants(Group::Egress)) {
        for run in 1..=runs {
            clock.stage(&format!("{}: egress iperf3, run {run}/{runs}", t.name));
            if !watch.ok(&mut r, &format!("egress iperf3 run {run}")) {
                r.push("egress1", None);
                continue;
            }
            let v = iperf3(ns, addr, args.iperf_secs, 1, false);
            if v.is_none() {
                r.notes.push(format!("egress iperf3: run {run} failed"));
            }
            r.push("egress1", v);
        }
    }
    if let Some((ns, server)) = t.dns.as_ref().filter(|_| args.wants(Group::Dns)) {
        for run in 1..=runs {
            clock.stage(&format!("{}: DNS round trips, run {run}/{runs}", t.name));
            if !watch.ok(&mut r, &format!("DNS run {run}")) {
                r.push("dns_p50", None);
                r.push("dns_p99", None);
                continue;
            }
            dns(ns, *server, run, &mut r);
        }
    }
    if let Some(addr) = t.udp.as_ref().filter(|_| args.wants(Group::Udp)) {
        for len in UDP_SIZES {
            for (way, reverse) in [("in", false), ("out", true)] {
                let key = format!("udp_{way}_{len}");
                for run in 1..=runs {
                    clock.stage(&format!("{}: UDP iperf3 {key}, run {run}/{runs}", t.name));
                    if !watch.ok(&mut r, &format!("UDP iperf3 {key} run {run}")) {
                        r.push(&key, None);
                        continue;
                    }
                    let v = tools::iperf3_udp(t.client, addr, args.iperf_secs, len, reverse);
                    if v.is_none() {
                        r.notes.push(format!("UDP iperf3 {key}: run {run} failed"));
                    }
                    r.push(&key, v.map(|v| v.gbps));
                    r.push(&format!("{key}_lost_percent"), v.map(|v| v.lost_percent));
                }
            }
        }
    }
    if !t.pids.is_empty() {
        r.cpu_secs = cpu_secs(&t.pids)
            .zip(cpu_before)
            .map(|(after, before)| after - before);
        r.peak_rss_mib = t.pids.iter().map(|p| peak_rss_mib(*p)).sum();
        // A column of the first table, so only beside its figures.
        if [Group::Memcaslap, Group::Iperf, Group::Egress]
            .iter()
            .any(|g| args.wants(*g))
        {
            r.push("peak_rss_mib", r.peak_rss_mib);
        }
    }
    r
}

/// One run of DNS round trips against `server` from `ns`.
fn dns(ns: &Netns, server: SocketAddr, run: usize, r: &mut PathResult) {
    let us = |d: Option<Duration>| Some(d.map_or(f64::INFINITY, |d| d.as_secs_f64() * 1e6));
    match tools::dns_latency(ns, server, DNS_NAME, DNS_QUERIES) {
        Ok(d) => {
            r.push("dns_p50", us(d.p50));
            r.push("dns_p99", us(d.p99));
            r.push("dns_lost", Some(d.lost as f64));
            if d.errors > 0 {
                r.notes.push(format!(
                    "DNS run {run}: {} answers were not NOERROR with a record",
                    d.errors
                ));
            }
        }
        Err(e) => {
            r.push("dns_p50", None);
            r.push("dns_p99", None);
            r.notes.push(format!("DNS run {run} failed: {e}"));
        }
    }
}

/// One run of the open-loop generator against the path's memcached.
fn latency(t: &Target, args: &Args, run: usize, r: &mut PathResult) {
    let spec = loadgen::Spec {
        rate: args.latency_rate,
        duration: Duration::from_secs_f64(args.latency_secs),
        ..loadgen::Spec::default()
    };
    let result = t
        .memcached
        .parse::<SocketAddr>()
        .map_err(|e| e.to_string())
        .and_then(|addr| {
            let conns = args.latency_conns;
            // One at a time: slirp4netns's forwarded port has a listen queue of 1.
            t.client
                .run(move || {
                    (0..conns)
                        .map(|_| {
                            std::net::TcpStream::connect_timeout(&addr, Duration::from_secs(5))
                        })
                        .collect::<std::io::Result<Vec<_>>>()
                })
                .map_err(|e| format!("connect: {e}"))
        })
        .and_then(|streams| loadgen::run(streams, &spec).map_err(|e| e.to_string()));
    // A percentile among the lost requests is infinite (shown as "lost").
    let us = |d: Option<Duration>| Some(d.map_or(f64::INFINITY, |d| d.as_secs_f64() * 1e6));
    match result {
        Ok(rep) => {
            r.push("lat_p50", us(rep.p50));
            r.push("lat_p90", us(rep.p90));
            r.push("lat_p99", us(rep.p99));
            r.push("lat_p999", us(rep.p999));
            r.push("lat_max", us(rep.max));
            r.push("lat_late", Some(rep.late as f64));
            r.push("lat_lost", Some(rep.lost as f64));
            r.push("lat_errors", Some(rep.errors as f64));
            r.push("lat_measured", Some(rep.measured as f64));
            r.push("lat_send_lag_p50", us(rep.send_lag_p50));
            r.push("lat_send_lag_p99", us(rep.send_lag_p99));
            if rep.errors > 0 {
                r.notes.push(format!(
                    "latency run {run}: {} answers were not a hit",
                    rep.errors
                ));
            }
        }
        Err(e) => {
            for key in ["lat_p50", "lat_p99", "lat_p999", "lat_late", "lat_lost"] {
                r.push(key, None);
            }
            r.notes.push(format!("latency run {run} failed: {e}"));
        }
    }
}

/// "Max open files" of a process: (soft, hard).
fn nofile_limit(pid: u32) -> Option<(String, String)> {
    let limits = std::fs::read_to_string(format!("/proc/{pid}/limits")).ok()?;
    let line = limits.lines().find(|l| l.starts_with("Max open files"))?;
    let mut f = line["Max open files".len()..].split_whitespace();
    Some((f.next()?.to_string(), f.next()?.to_string()))
}

fn fd_count(pid: u32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/fd")).map_or(0, |d| d.count())
}

/// The scale figures: single-stream iperf3 through the pair with no idle connections, then
/// with `--idle` of them open (or as many as host-proxy's descriptor limit allows).
fn scale(lab: &Lab, args: &Args, clock: &Clock, r: &mut PathResult) {
    let topo = &lab.topo;
    let server = format!("10.99.0.1:{PAIR_IPERF}");
    let measure_all = |idle: usize, r: &mut PathResult| {
        let suffix = if idle == 0 { "none" } else { "idle" };
        for (key, streams, reverse) in &IPERF[..2] {
            for run in 1..=args.runs {
                clock.stage(&format!(
                    "{}: scale, iperf3 {key} with {idle} idle connections, run {run}/{}",
                    r.name, args.runs
                ));
                let v = iperf3(&topo.client, &server, args.iperf_secs, *streams, *reverse);
                r.push(&format!("scale_{key}_{suffix}"), v);
            }
        }
    };
    let fail = |r: &mut PathResult, why: String| {
        r.notes.push(format!("scale: {why}"));
        for key in ["scale_in1_idle", "scale_out1_idle"] {
            r.push(key, None);
        }
    };
    measure_all(0, r);
    let Some(host_pid) = topo.host.as_ref().and_then(Daemon::pid) else {
        return fail(r, "host-proxy is not running".into());
    };
    // host-proxy needs two descriptors per connection, and cannot raise its hard limit
    // without CAP_SYS_RESOURCE.
    let limit =
        nofile_limit(host_pid).map_or(u64::MAX, |(soft, _)| soft.parse().unwrap_or(u64::MAX));
    let fits = idle::capacity(limit, fd_count(host_pid) as u64, 16);
    let n = args.idle.min(usize::try_from(fits).unwrap_or(usize::MAX));
    if n < args.idle {
        r.notes.push(format!(
            "scale: {} idle connections need {} descriptors in host-proxy (2 each) but its \
             RLIMIT_NOFILE is {limit} and cannot be raised here (no CAP_SYS_RESOURCE), so the \
             scale row holds {n}",
            args.idle,
            2 * args.idle
        ));
    }
    r.push("scale_idle_count", Some(n as f64));
    let sources: Vec<IpAddr> = (0..args.idle_sources)
        .map(|i| IpAddr::V4(Ipv4Addr::new(10, 99, 0, 100 + i)))
        .collect();
    for ip in &sources {
        topo.client
            .ip(&["addr", "add", &format!("{ip}/24"), "dev", "toparent"]);
    }
    let exe = std::env::current_exe().expect("current_exe");
    let mut cmd = topo.enclave.command(exe.to_str().expect("utf-8 path"));
    cmd.args(["--hold-idle", &format!("0.0.0.0:{ENCLAVE_IDLE}")]);
    let holder = Daemon::start_with(
        "idle-holder",
        cmd,
        topo.dir.0.join("idle-holder.log"),
        "holding connections",
        Duration::from_secs(10),
    );
    clock.stage(&format!(
        "{}: scale, opening {n} idle connections from {} client addresses",
        r.name,
        sources.len()
    ));
    let idle = Idle::open(
        &topo.client,
        &[SocketAddr::from(([10, 99, 0, 1], PAIR_IDLE))],
        &sources,
        n,
        &|| idle::held(&holder.log_text()),
    );
    let idle = match idle {
        Ok(idle) => idle,
        Err(e) => {
            // What the daemons said about it.
            for line in topo
                .logs()
                .lines()
                .filter(|l| !l.contains(" INFO "))
                .take(40)
            {
                println!("  {line}");
            }
            return fail(r, e);
        }
    };
    let pids: Vec<(&str, u32)> = [
        ("host-proxy", &topo.host),
        ("enclave-proxy", &topo.enclave_proxy),
    ]
    .into_iter()
    .filter_map(|(name, d)| Some((name, d.as_ref()?.pid()?)))
    .collect();
    let fds: Vec<String> = pids
        .iter()
        .map(|(name, pid)| {
            let (soft, hard) = nofile_limit(*pid).unwrap_or_default();
            format!("{name} {} (RLIMIT_NOFILE {soft}/{hard})", fd_count(*pid))
        })
        .collect();
    let live = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        [topo.host(), topo.enclave_proxy()].map(|d| d.counters().live().0)
    }));
    r.notes.push(format!(
        "scale: {} idle connections from {} client addresses (at most {} each; host-proxy's \
         default --max-per-client is 256); open descriptors while held: {}, the clients {}, the \
         enclave server {}; live ingress connections (host-proxy, enclave-proxy): {}",
        idle.len(),
        sources.len(),
        n.div_ceil(sources.len()),
        fds.join(", "),
        fd_count(std::process::id()),
        holder.pid().map_or(0, fd_count),
        live.map_or("no counters".into(), |l| format!("{}, {}", l[0], l[1]))
    ));
    measure_all(idle.len(), r);
    let open = idle.still_open();
    if open < idle.len() {
        r.notes.push(format!(
            "scale: only {open} of {} idle connections were still open after the runs",
            idle.len()
        ));
    }
    drop(idle);
    drop(holder);
    // Let the pair close them before the next path shares the cores.
    std::thread::sleep(Duration::from_secs(3));
}

fn daemon(name: &str, ns: &Netns, program: &str, args: &[String], dir: &std::path::Path) -> Daemon {
    let mut cmd = ns.command(program);
    cmd.args(args);
    // These print nothing when ready; give them a moment to bind.
    let d = Daemon::start_with(
        name,
        cmd,
        dir.join(format!("{name}.log")),
        "",
        Duration::from_secs(5),
    );
    std::thread::sleep(Duration::from_millis(300));
    d
}

fn s(v: &[&str]) -> Vec<String> {
    v.iter().map(|x| x.to_string()).collect()
}

/// Sends one slirp4netns API request.
fn slirp_api(socket: &std::path::Path, request: &Value) -> String {
    let mut s = std::os::unix::net::UnixStream::connect(socket).expect("slirp4netns API socket");
    s.write_all(request.to_string().as_bytes()).unwrap();
    s.shutdown(std::net::Shutdown::Write).unwrap();
    let mut out = String::new();
    let _ = s.read_to_string(&mut out);
    out
}

fn wait_for_file(path: &std::path::Path) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while !path.exists() && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// A socat TCP<->UNIX<->TCP pair for one port: the parent listens on `parent_port` and the
/// enclave side connects to `enclave`.
fn socat_pair(name: &str, lab: &Lab, parent_port: u16, enclave: &str) -> [Daemon; 2] {
    let dir = &lab.topo.dir.0;
    let sock = dir.join(format!("{name}.sock")).display().to_string();
    let b = "-b131072".to_string();
    [
        daemon(
            &format!("socat-e-{name}"),
            &lab.topo.enclave,
            "socat",
            &[
                b.clone(),
                format!("UNIX-LISTEN:{sock},fork"),
                format!("TCP:{enclave},nodelay"),
            ],
            dir,
        ),
        daemon(
            &format!("socat-p-{name}"),
            &lab.topo.parent,
            "socat",
            &[
                b,
                format!("TCP-LISTEN:{parent_port},fork,reuseaddr,nodelay"),
                format!("UNIX-CONNECT:{sock}"),
            ],
            dir,
        ),
    ]
}

fn main() {
    let args = Args::parse();
    if let Some(addr) = args.hold_idle {
        if let Err(e) = idle::hold(addr) {
            eprintln!("idle holder on {addr}: {e}");
            std::process::exit(1);
        }
        return;
    }
    enclave_net_tests::require_root();
    let clock = Clock(Instant::now());
    let cores = std::thread::available_parallelism().map_or(0, |n| n.get());
    let load_at_start = tools::load_average();
    let scale_on = args.wants(Group::Scale) && args.has(PathId::EnclaveNet);
    if scale_on {
        // This process holds the client end of every idle connection.
        let want = args.idle as u64 + 1024;
        let got = enclave_net_tests::raise_nofile(want);
        if got < want {
            println!("RLIMIT_NOFILE is {got}, below the {want} the scale figures need");
        }
    }
    clock.stage("building the emulated enclave: namespaces, the pair, dockerd, images");
    let publish = [
        (PAIR_IPERF, ENCLAVE_IPERF),
        (PAIR_IPERF_CONTAINER, ENCLAVE_IPERF_CONTAINER),
        (PAIR_IDLE, ENCLAVE_IDLE),
    ]
    .map(|(h, e)| format!("{h}:{e}"));
    let upstream = format!("{INTERNET_IP}:53");
    let mut lab = Lab::start(
        &[
            "--publish",
            &publish[0],
            "--publish",
            &publish[1],
            "--publish",
            &publish[2],
            "--publish-udp",
            &publish[0],
            "--dns-upstream",
            &upstream,
        ],
        &[],
    );
    let dir = lab.topo.dir.0.clone();
    let _dnsmasq = args.wants(Group::Dns).then(|| {
        enclave_net_tests::dns::dnsmasq(
            &lab.topo.internet,
            INTERNET_IP,
            &dir,
            300,
            &[format!("--host-record={DNS_NAME},{INTERNET_IP}")],
        )
    });
    clock.stage("starting memcached behind docker run -p 8080:11211, and iperf3 servers");
    lab.docker.cli(&[
        "run",
        "-d",
        "-p",
        &format!("{ENCLAVE_MEMCACHED}:11211"),
        MEMCACHED_IMAGE,
    ]);
    if args.wants(Group::Container) {
        lab.docker.import_iperf3_image();
        lab.docker.cli(&[
            "run",
            "-d",
            "-p",
            &format!("{ENCLAVE_IPERF_CONTAINER}:5201"),
            IPERF3_IMAGE,
        ]);
    }
    std::thread::sleep(Duration::from_millis(500));
    let _iperf_enclave = daemon(
        "iperf3-enclave",
        &lab.topo.enclave,
        "iperf3",
        &s(&["-s", "-p", "5201"]),
        &dir,
    );
    let _iperf_internet = daemon(
        "iperf3-internet",
        &lab.topo.internet,
        "iperf3",
        &s(&["-s", "-p", "5201"]),
        &dir,
    );

    let mut results = Vec::new();
    if args.has(PathId::Direct) {
        let topo = &lab.topo;
        results.push(measure(
            &Target {
                name: "DIRECT",
                client: &topo.enclave,
                memcached: format!("10.240.0.2:{ENCLAVE_MEMCACHED}"),
                iperf: Some(format!("10.240.0.2:{ENCLAVE_IPERF}")),
                container: Some(format!("10.240.0.2:{ENCLAVE_IPERF_CONTAINER}")),
                egress: None,
                dns: Some((&topo.parent, SocketAddr::from((INTERNET_IP, 53)))),
                udp: Some(format!("10.240.0.2:{ENCLAVE_IPERF}")),
                pids: vec![],
            },
            &args,
            &clock,
        ));
    }
    if args.has(PathId::EnclaveNet) {
        let topo = &lab.topo;
        let pair_pids: Vec<u32> = [&topo.host, &topo.enclave_proxy]
            .into_iter()
            .flatten()
            .filter_map(Daemon::pid)
            .collect();
        let mut r = measure(
            &Target {
                name: "ENCLAVE-NET",
                client: &topo.client,
                memcached: "10.99.0.1:18080".into(),
                iperf: Some(format!("10.99.0.1:{PAIR_IPERF}")),
                container: Some(format!("10.99.0.1:{PAIR_IPERF_CONTAINER}")),
                egress: Some((&topo.enclave, "10.98.0.2:5201".into())),
                dns: Some((&topo.enclave, SocketAddr::from((GATEWAY, 53)))),
                udp: Some(format!("10.99.0.1:{PAIR_IPERF}")),
                pids: pair_pids,
            },
            &args,
            &clock,
        );
        if scale_on {
            scale(&lab, &args, &clock, &mut r);
        }
        results.push(r);
    }
    if args.has(PathId::Splice) {
        clock.stage("SPLICE: starting socat pairs");
        let splice = [
            socat_pair(
                "mc",
                &lab,
                28080,
                &format!("10.240.0.2:{ENCLAVE_MEMCACHED}"),
            ),
            socat_pair("ip", &lab, 25201, &format!("10.240.0.2:{ENCLAVE_IPERF}")),
            socat_pair(
                "cip",
                &lab,
                25202,
                &format!("10.240.0.2:{ENCLAVE_IPERF_CONTAINER}"),
            ),
        ];
        // Egress the other way round: the enclave listens, the parent connects out.
        let eg = dir.join("eg.sock").display().to_string();
        let egress = [
            daemon(
                "socat-p-eg",
                &lab.topo.parent,
                "socat",
                &[
                    "-b131072".into(),
                    format!("UNIX-LISTEN:{eg},fork"),
                    "TCP:10.98.0.2:5201,nodelay".into(),
                ],
                &dir,
            ),
            daemon(
                "socat-e-eg",
                &lab.topo.enclave,
                "socat",
                &[
                    "-b131072".into(),
                    "TCP-LISTEN:35201,fork,reuseaddr,nodelay".into(),
                    format!("UNIX-CONNECT:{eg}"),
                ],
                &dir,
            ),
        ];
        let pids = splice
            .iter()
            .flatten()
            .chain(&egress)
            .filter_map(Daemon::pid)
            .collect();
        let topo = &lab.topo;
        let mut r = measure(
            &Target {
                name: "SPLICE (socat)",
                client: &topo.client,
                memcached: "10.99.0.1:28080".into(),
                iperf: Some("10.99.0.1:25201".into()),
                container: Some("10.99.0.1:25202".into()),
                egress: Some((&topo.enclave, "127.0.0.1:35201".into())),
                dns: None,
                udp: None,
                pids,
            },
            &args,
            &clock,
        );
        if args.wants(Group::Egress) {
            r.notes
                .push("egress is a fixed-destination forward, as vsock-proxy's".into());
        }
        results.push(r);
    }
    let peers = [PathId::Slirp4netns, PathId::Pasta, PathId::PastaLoopback];
    if peers.iter().any(|p| args.has(*p)) {
        clock.stage("stopping enclave-proxy: slirp4netns and pasta take the enclave's route");
        lab.topo.enclave_proxy.take();
    }
    if args.has(PathId::Slirp4netns) {
        let topo = &lab.topo;
        let api = dir.join("slirp.sock");
        let mtu = format!("--mtu={}", args.peer_mtu);
        let mut slirp = daemon(
            "slirp4netns",
            &topo.parent,
            "slirp4netns",
            &[
                "--configure".into(),
                mtu,
                "--disable-host-loopback".into(),
                "--api-socket".into(),
                api.display().to_string(),
                "--netns-type=path".into(),
                topo.enclave.path(),
                "tap1".into(),
            ],
            &dir,
        );
        wait_for_file(&api);
        for (proto, host, guest) in [
            ("tcp", 48080, ENCLAVE_MEMCACHED),
            ("tcp", 45201, ENCLAVE_IPERF),
            ("udp", 45201, ENCLAVE_IPERF),
            ("tcp", 45202, ENCLAVE_IPERF_CONTAINER),
        ] {
            let reply = slirp_api(
                &api,
                &json!({"execute": "add_hostfwd", "arguments": {"proto": proto, "host_addr": "0.0.0.0", "host_port": host, "guest_addr": "10.0.2.100", "guest_port": guest}}),
            );
            assert!(reply.contains("return"), "slirp4netns add_hostfwd: {reply}");
        }
        let mut r = measure(
            &Target {
                name: "SLIRP4NETNS",
                client: &topo.client,
                memcached: "10.99.0.1:48080".into(),
                iperf: Some("10.99.0.1:45201".into()),
                container: Some("10.99.0.1:45202".into()),
                egress: Some((&topo.enclave, "10.98.0.2:5201".into())),
                dns: None,
                udp: Some("10.99.0.1:45201".into()),
                pids: slirp.pid().into_iter().collect(),
            },
            &args,
            &clock,
        );
        r.notes.push(format!("MTU {}", args.peer_mtu));
        obituary("slirp4netns", &mut slirp, &mut r);
        results.push(r);
    }
    // Each pasta path gets a pasta of its own, so that one that dies in one path (it has, in
    // the enclave->client direction) does not take the other path's figures with it.
    if args.has(PathId::Pasta) {
        let topo = &lab.topo;
        let mut pasta = start_pasta(&lab, &args, &dir);
        let mut r = measure(
            &Target {
                name: "PASTA (tap path)",
                client: &topo.client,
                memcached: "10.99.0.1:38080".into(),
                iperf: Some("10.99.0.1:35201".into()),
                container: Some("10.99.0.1:35202".into()),
                egress: Some((&topo.enclave, "10.98.0.2:5201".into())),
                dns: None,
                udp: Some("10.99.0.1:35201".into()),
                pids: pasta.pid().into_iter().collect(),
            },
            &args,
            &clock,
        );
        r.notes.push(format!("MTU {}", args.peer_mtu));
        obituary("pasta", &mut pasta, &mut r);
        results.push(r);
    }
    if args.has(PathId::PastaLoopback) {
        let topo = &lab.topo;
        let mut pasta = start_pasta(&lab, &args, &dir);
        // pasta's splice path enters the enclave on loopback, where Docker's DNAT does not
        // apply: Docker's userland docker-proxy carries those connections on, so it is one of
        // this path's proxies.
        let docker_proxies =
            std::fs::read_to_string(lab.docker.socket().with_file_name("dockerd.pid"))
                .ok()
                .and_then(|p| p.trim().parse().ok())
                .map(|dockerd| tools::descendants_named(dockerd, "docker-proxy"))
                .unwrap_or_default();
        let n_docker_proxies = docker_proxies.len();
        let mut r = measure(
            &Target {
                name: "PASTA (loopback splice, stretch reference)",
                client: &topo.parent,
                memcached: "127.0.0.1:38080".into(),
                iperf: Some("127.0.0.1:35201".into()),
                container: Some("127.0.0.1:35202".into()),
                egress: None,
                dns: None,
                udp: None,
                pids: pasta.pid().into_iter().chain(docker_proxies).collect(),
            },
            &args,
            &clock,
        );
        r.notes.push(format!(
            "clients on the parent's own loopback; pasta connects to the enclave's loopback, \
             where Docker's DNAT does not apply, so Docker's docker-proxy carries memcached and \
             the container rows on: proxy CPU and memory count pasta and {n_docker_proxies} \
             docker-proxy processes"
        ));
        obituary("pasta", &mut pasta, &mut r);
        results.push(r);
    }
    write_report(&results, &args, cores, &load_at_start);
    clock.stage("tearing down");
}

/// `load_at_start`: the load average when the run started (the machine may be shared).
/// Starts pasta in the parent, taking the enclave's network with a tap of its own and
/// forwarding the published ports (DESIGN.md, "Running the peers").
fn start_pasta(lab: &Lab, args: &Args, dir: &std::path::Path) -> Daemon {
    let mut pasta_args = s(&[
        "-f",
        "-e",
        "-4",
        "--runas",
        "0",
        "--netns",
        &lab.topo.enclave.path(),
        "--config-net",
        "--no-dhcp",
        "-I",
        "tap1",
        "-m",
        &args.peer_mtu.to_string(),
        "-a",
        "10.88.0.2",
        "-n",
        "24",
        "-g",
        "10.88.0.1",
    ]);
    for (host, enclave) in [
        (38080, ENCLAVE_MEMCACHED),
        (35201, ENCLAVE_IPERF),
        (35202, ENCLAVE_IPERF_CONTAINER),
    ] {
        pasta_args.extend(s(&["-t", &format!("{host}:{enclave}")]));
    }
    pasta_args.extend(s(&[
        "-u",
        &format!("35201:{ENCLAVE_IPERF}"),
        "-T",
        "none",
        "-U",
        "none",
    ]));
    daemon("pasta", &lab.topo.parent, "pasta", &pasta_args, dir)
}

/// Notes it if a peer's daemon died during its path's figures, with the end of its log.
fn obituary(name: &str, d: &mut Daemon, r: &mut PathResult) {
    if d.alive() {
        return;
    }
    let log = d.log_text();
    let last: Vec<&str> = log
        .lines()
        .filter(|l| !l.trim().is_empty())
        .rev()
        .take(3)
        .collect();
    let last: Vec<&str> = last.into_iter().rev().collect();
    r.notes.push(format!(
        "{name} exited during this path's figures; the end of its log: {}",
        if last.is_empty() {
            "(empty)".to_string()
        } else {
            last.join(" / ")
        }
    ));
}

fn write_report(results: &[PathResult], args: &Args, cores: usize, load_at_start: &str) {
    let date = Command::new("date")
        .args(["-u", "+%Y-%m-%d %H:%M UTC"])
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
        .unwrap_or_default();
    let mut md = format!(
        "Measured {date} on {cores} cores (load average {} at the start, {} at the end); \
         median of {} runs; ratio to DIRECT in brackets.\n",
        load_at_start,
        tools::load_average(),
        args.runs
    );
    for t in &TABLES {
        let table = report::table(t, results);
        if !table.is_empty() {
            md.push('\n');
            md.push_str(&table);
        }
    }
    for r in results {
        let table = report::scale_table(r);
        if !table.is_empty() {
            md.push('\n');
            md.push_str(&table);
        }
    }
    let notes = report::notes(results);
    if !notes.is_empty() {
        md.push_str("\nNotes:\n\n");
        md.push_str(&notes);
    }
    println!("\n{md}");
    let _ = std::fs::create_dir_all(&args.out);
    let stem = args.stem();
    let json = json!({"date": date, "cores": cores, "runs": args.runs,
        "load_average_start": load_at_start, "load_average_end": tools::load_average(),
        "memcaslap_secs": args.memcaslap_secs, "iperf_secs": args.iperf_secs,
        "latency": {"rate": args.latency_rate, "conns": args.latency_conns,
                    "secs": args.latency_secs, "warmup_secs": 1, "late_after_ms": 1},
        "idle": args.idle, "idle_sources": args.idle_sources,
        "paths": report::json_paths(results)});
    let _ = std::fs::write(args.out.join(format!("{stem}.md")), &md);
    let _ = std::fs::write(
        args.out.join(format!("{stem}.json")),
        serde_json::to_string_pretty(&json).unwrap_or_default(),
    );
    println!(
        "written to {}/{stem}.md and {stem}.json",
        args.out.display()
    );
}
