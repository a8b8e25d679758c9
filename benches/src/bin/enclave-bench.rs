//! The macro benchmark: memcaslap and iperf3 through every path into the emulated enclave, on
//! one topology, in one run, with ratios to DIRECT.
//!
//! Paths (README, "Benchmark"):
//! - DIRECT: the load generator inside the enclave namespace, against the published port;
//! - ENCLAVE-NET: the pair;
//! - SPLICE: a socat TCP<->UNIX<->TCP pair (the kernel-path design of vsock-proxy, Oyster and
//!   enclaver);
//! - SLIRP4NETNS and PASTA (tap path, clients from the client namespace), and PASTA's loopback
//!   path (clients on the parent's own loopback, which pasta hands to kernel `splice()`).
//!
//! Each figure is the median of `--runs` runs. Output: a Markdown table on stdout and in
//! `--out DIR/latest.md`, and every raw run in `--out DIR/latest.json`.
// The benchmark times real processes, so wall-clock time is right here.
#![allow(clippy::disallowed_types, clippy::unwrap_used)]

use std::fmt::Write as _;
use std::io::{Read, Write};
use std::path::PathBuf;
use std::process::Command;
use std::time::{Duration, Instant};

use clap::Parser;
use enclave_net_tests::docker::MEMCACHED_IMAGE;
use enclave_net_tests::lab::Lab;
use enclave_net_tests::netns::Netns;
use enclave_net_tests::process::Daemon;
use serde_json::{json, Value};

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
    /// Where to write latest.md and latest.json.
    #[arg(long, default_value = "benches/results")]
    out: PathBuf,
    /// MTU for slirp4netns and pasta (their best, by DESIGN.md).
    #[arg(long, default_value = "65520")]
    peer_mtu: u32,
}

/// The figures, in table order.
const FIGURES: [(&str, &str); 6] = [
    ("memcaslap", "memcaslap TPS"),
    ("in1", "iperf3 1 stream in"),
    ("out1", "iperf3 1 stream out"),
    ("in4", "iperf3 4 streams in"),
    ("out4", "iperf3 4 streams out"),
    ("egress1", "egress iperf3 1 stream"),
];

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
    memcached: String,
    iperf: Option<String>,
    /// Namespace and address for the egress iperf3, where the path has egress.
    egress: Option<(&'a Netns, String)>,
    /// The proxy processes whose CPU and memory are reported.
    pids: Vec<u32>,
}

#[derive(Default)]
struct PathResult {
    name: &'static str,
    runs: Vec<(String, Vec<Option<f64>>)>,
    cpu_secs: Option<f64>,
    peak_rss_mib: Option<f64>,
    notes: Vec<String>,
}

fn median(xs: &[Option<f64>]) -> Option<f64> {
    let mut ok: Vec<f64> = xs.iter().flatten().copied().collect();
    if ok.len() < xs.len() || ok.is_empty() {
        return None;
    }
    ok.sort_by(f64::total_cmp);
    Some(ok[ok.len() / 2])
}

fn run_in(ns: &Netns, program: &str, args: &[&str], limit: u32) -> Option<String> {
    use enclave_net_tests::cleanup::{forget, register, Item};
    let child = Command::new("timeout")
        .arg(limit.to_string())
        .args(["ip", "netns", "exec", ns.name(), program])
        .args(args)
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::null())
        .spawn()
        .ok()?;
    // Registered so that Ctrl-C stops the load generator too.
    let item = Item::Process(child.id());
    register(item.clone());
    let out = child.wait_with_output();
    forget(&item);
    let out = out.ok()?;
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    out.status.success().then_some(text)
}

fn memcaslap(ns: &Netns, server: &str, secs: u32) -> Option<f64> {
    let t = format!("{secs}s");
    let out = run_in(
        ns,
        "memcaslap",
        &["-s", server, "-T", "2", "-c", "32", "-t", &t],
        secs + 30,
    )?;
    let line = out.lines().rev().find(|l| l.contains("TPS:"))?;
    let tps = line.split("TPS:").nth(1)?.split_whitespace().next()?;
    tps.parse().ok()
}

fn iperf3(ns: &Netns, server: &str, secs: u32, streams: u32, reverse: bool) -> Option<f64> {
    let (host, port) = server.rsplit_once(':')?;
    let (t, p) = (secs.to_string(), streams.to_string());
    let mut args = vec![
        "-c",
        host,
        "-p",
        port,
        "-t",
        &t,
        "-P",
        &p,
        "-J",
        "--connect-timeout",
        "5000",
    ];
    if reverse {
        args.push("-R");
    }
    let out = run_in(ns, "iperf3", &args, secs + 20)?;
    let v: Value = serde_json::from_str(&out).ok()?;
    let bps = v["end"]["sum_received"]["bits_per_second"].as_f64()?;
    (bps > 0.0).then_some(bps / 1e9)
}

/// CPU seconds (own and reaped children) of a process, from /proc/PID/stat.
fn cpu_secs(pid: u32) -> Option<f64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let after = stat.rsplit_once(')')?.1;
    let f: Vec<f64> = after
        .split_whitespace()
        .filter_map(|x| x.parse().ok())
        .collect();
    // Fields after the name: state(skipped, not numeric) ... utime=11 stime=12 cutime=13 cstime=14
    // in this numeric-only list (state dropped), i.e. the 14th..17th fields of the stat line.
    Some((f.get(10)? + f.get(11)? + f.get(12)? + f.get(13)?) / 100.0)
}

fn peak_rss_mib(pid: u32) -> Option<f64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let line = status.lines().find(|l| l.starts_with("VmHWM:"))?;
    let kib: f64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib / 1024.0)
}

fn measure(t: &Target, args: &Args, clock: &Clock) -> PathResult {
    let cpu_before: Vec<Option<f64>> = t.pids.iter().map(|p| cpu_secs(*p)).collect();
    let mut result = PathResult {
        name: t.name,
        ..Default::default()
    };
    for (key, label) in FIGURES {
        if args.demo && key != "memcaslap" {
            continue;
        }
        let applicable = match key {
            "egress1" => t.egress.is_some(),
            "memcaslap" => true,
            _ => t.iperf.is_some(),
        };
        let mut runs = Vec::new();
        for run in 1..=args.runs {
            if !applicable {
                break;
            }
            clock.stage(&format!("{}: {label}, run {run}/{}", t.name, args.runs));
            let v = match key {
                "memcaslap" => memcaslap(t.client, &t.memcached, args.memcaslap_secs),
                "egress1" => t
                    .egress
                    .as_ref()
                    .and_then(|(ns, addr)| iperf3(ns, addr, args.iperf_secs, 1, false)),
                _ => {
                    let streams = if key.ends_with('4') { 4 } else { 1 };
                    t.iperf.as_ref().and_then(|addr| {
                        iperf3(
                            t.client,
                            addr,
                            args.iperf_secs,
                            streams,
                            key.starts_with("out"),
                        )
                    })
                }
            };
            if v.is_none() {
                result.notes.push(format!("{label}: run {run} failed"));
            }
            runs.push(v);
        }
        result.runs.push((key.to_string(), runs));
    }
    let cpu: Option<f64> = t
        .pids
        .iter()
        .zip(cpu_before)
        .map(|(p, before)| Some(cpu_secs(*p)? - before?))
        .sum();
    result.cpu_secs = if t.pids.is_empty() { None } else { cpu };
    result.peak_rss_mib = if t.pids.is_empty() {
        None
    } else {
        t.pids.iter().map(|p| peak_rss_mib(*p)).sum()
    };
    result
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

fn main() {
    let args = Args::parse();
    enclave_net_tests::require_root();
    let clock = Clock(Instant::now());
    let cores = std::thread::available_parallelism().map_or(0, |n| n.get());
    clock.stage("building the emulated enclave: namespaces, the pair, dockerd, images");
    let mut lab = Lab::start(&["--publish", "15201:5201"], &[]);
    let dir = lab.topo.dir.0.clone();
    clock.stage("starting memcached behind docker run -p 8080:11211, and iperf3 servers");
    lab.docker
        .cli(&["run", "-d", "-p", "8080:11211", MEMCACHED_IMAGE]);
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
    let topo = &lab.topo;
    results.push(measure(
        &Target {
            name: "DIRECT",
            client: &topo.enclave,
            memcached: "10.240.0.2:8080".into(),
            iperf: Some("10.240.0.2:5201".into()),
            egress: None,
            pids: vec![],
        },
        &args,
        &clock,
    ));
    let pair_pids: Vec<u32> = [&topo.host, &topo.enclave_proxy]
        .into_iter()
        .flatten()
        .filter_map(Daemon::pid)
        .collect();
    results.push(measure(
        &Target {
            name: "ENCLAVE-NET",
            client: &topo.client,
            memcached: "10.99.0.1:18080".into(),
            iperf: Some("10.99.0.1:15201".into()),
            egress: Some((&topo.enclave, "10.98.0.2:5201".into())),
            pids: pair_pids,
        },
        &args,
        &clock,
    ));
    if !args.demo && !args.pair_only {
        clock.stage("SPLICE: starting socat pairs");
        let sock = |n: &str| dir.join(n).display().to_string();
        let b = "-b131072";
        let splice = [
            daemon(
                "socat-e-mc",
                &topo.enclave,
                "socat",
                &[
                    b.into(),
                    format!("UNIX-LISTEN:{},fork", sock("mc.sock")),
                    "TCP:10.240.0.2:8080,nodelay".into(),
                ],
                &dir,
            ),
            daemon(
                "socat-p-mc",
                &topo.parent,
                "socat",
                &[
                    b.into(),
                    "TCP-LISTEN:28080,fork,reuseaddr,nodelay".into(),
                    format!("UNIX-CONNECT:{}", sock("mc.sock")),
                ],
                &dir,
            ),
            daemon(
                "socat-e-ip",
                &topo.enclave,
                "socat",
                &[
                    b.into(),
                    format!("UNIX-LISTEN:{},fork", sock("ip.sock")),
                    "TCP:10.240.0.2:5201,nodelay".into(),
                ],
                &dir,
            ),
            daemon(
                "socat-p-ip",
                &topo.parent,
                "socat",
                &[
                    b.into(),
                    "TCP-LISTEN:25201,fork,reuseaddr,nodelay".into(),
                    format!("UNIX-CONNECT:{}", sock("ip.sock")),
                ],
                &dir,
            ),
            daemon(
                "socat-p-eg",
                &topo.parent,
                "socat",
                &[
                    b.into(),
                    format!("UNIX-LISTEN:{},fork", sock("eg.sock")),
                    "TCP:10.98.0.2:5201,nodelay".into(),
                ],
                &dir,
            ),
            daemon(
                "socat-e-eg",
                &topo.enclave,
                "socat",
                &[
                    b.into(),
                    "TCP-LISTEN:35201,fork,reuseaddr,nodelay".into(),
                    format!("UNIX-CONNECT:{}", sock("eg.sock")),
                ],
                &dir,
            ),
        ];
        let pids = splice.iter().filter_map(Daemon::pid).collect();
        let mut r = measure(
            &Target {
                name: "SPLICE (socat)",
                client: &topo.client,
                memcached: "10.99.0.1:28080".into(),
                iperf: Some("10.99.0.1:25201".into()),
                egress: Some((&topo.enclave, "127.0.0.1:35201".into())),
                pids,
            },
            &args,
            &clock,
        );
        r.notes
            .push("egress is a fixed-destination forward, as vsock-proxy's".into());
        results.push(r);
        drop(splice);

        clock.stage("stopping enclave-proxy: slirp4netns and pasta take the enclave's route");
        lab.topo.enclave_proxy.take();
        let topo = &lab.topo;
        let api = dir.join("slirp.sock");
        let mtu = format!("--mtu={}", args.peer_mtu);
        let slirp = daemon(
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
        for (host, guest) in [(48080, 8080), (45201, 5201)] {
            let reply = slirp_api(
                &api,
                &json!({"execute": "add_hostfwd", "arguments": {"proto": "tcp", "host_addr": "0.0.0.0", "host_port": host, "guest_addr": "10.0.2.100", "guest_port": guest}}),
            );
            assert!(reply.contains("return"), "slirp4netns add_hostfwd: {reply}");
        }
        let mut r = measure(
            &Target {
                name: "SLIRP4NETNS",
                client: &topo.client,
                memcached: "10.99.0.1:48080".into(),
                iperf: Some("10.99.0.1:45201".into()),
                egress: Some((&topo.enclave, "10.98.0.2:5201".into())),
                pids: slirp.pid().into_iter().collect(),
            },
            &args,
            &clock,
        );
        r.notes.push(format!("MTU {}", args.peer_mtu));
        results.push(r);
        drop(slirp);

        let pasta = daemon(
            "pasta",
            &topo.parent,
            "pasta",
            &s(&[
                "-f",
                "-e",
                "-4",
                "--runas",
                "0",
                "--netns",
                &topo.enclave.path(),
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
                "-t",
                "38080:8080",
                "-t",
                "35201:5201",
                "-u",
                "none",
                "-T",
                "none",
                "-U",
                "none",
            ]),
            &dir,
        );
        let pids: Vec<u32> = pasta.pid().into_iter().collect();
        let mut r = measure(
            &Target {
                name: "PASTA (tap path)",
                client: &topo.client,
                memcached: "10.99.0.1:38080".into(),
                iperf: Some("10.99.0.1:35201".into()),
                egress: Some((&topo.enclave, "10.98.0.2:5201".into())),
                pids: pids.clone(),
            },
            &args,
            &clock,
        );
        r.notes.push(format!("MTU {}", args.peer_mtu));
        results.push(r);
        let mut r = measure(
            &Target {
                name: "PASTA (loopback splice, stretch reference)",
                client: &topo.parent,
                memcached: "127.0.0.1:38080".into(),
                iperf: Some("127.0.0.1:35201".into()),
                egress: None,
                pids,
            },
            &args,
            &clock,
        );
        r.notes.push("clients on the parent's own loopback".into());
        results.push(r);
        drop(pasta);
    }
    clock.stage("tearing down");
    report(&results, &args, cores);
}

fn fmt_value(key: &str, v: f64) -> String {
    if key == "memcaslap" {
        format!("{:.0}k", v / 1000.0)
    } else {
        format!("{v:.1} Gbps")
    }
}

fn report(results: &[PathResult], args: &Args, cores: usize) {
    let direct: Vec<Option<f64>> = FIGURES
        .iter()
        .map(|(k, _)| {
            results
                .first()
                .and_then(|r| r.runs.iter().find(|(key, _)| key == k))
                .and_then(|(_, runs)| median(runs))
        })
        .collect();
    let date = Command::new("date")
        .args(["-u", "+%Y-%m-%d %H:%M UTC"])
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
        .unwrap_or_default();
    let mut md = format!(
        "Measured {date} on {cores} cores; median of {} runs; ratio to DIRECT in brackets.\n\n",
        args.runs
    );
    let shown: Vec<(usize, &(&str, &str))> = FIGURES
        .iter()
        .enumerate()
        .filter(|(_, (k, _))| !args.demo || *k == "memcaslap")
        .collect();
    md.push_str("| path |");
    for (_, (_, label)) in &shown {
        let _ = write!(md, " {label} |");
    }
    md.push_str(" proxy CPU s | proxy peak RSS |\n|---|");
    for _ in &shown {
        md.push_str("---|");
    }
    md.push_str("---|---|\n");
    let mut json_paths = Vec::new();
    for r in results {
        let _ = write!(md, "| {} |", r.name);
        let mut figures = serde_json::Map::new();
        for (i, (key, _)) in &shown {
            let runs = r
                .runs
                .iter()
                .find(|(k, _)| k == key)
                .map(|(_, v)| v.clone());
            let cell = match runs.as_deref() {
                None | Some([]) => "n/a".to_string(),
                Some(runs) => match median(runs) {
                    None => format!(
                        "failed ({}/{} runs)",
                        runs.iter().flatten().count(),
                        runs.len()
                    ),
                    Some(m) => match direct[*i] {
                        Some(d) if d > 0.0 && r.name != "DIRECT" => {
                            format!("{} ({:.2}×)", fmt_value(key, m), m / d)
                        }
                        _ => fmt_value(key, m),
                    },
                },
            };
            let _ = write!(md, " {cell} |");
            figures.insert(
                key.to_string(),
                json!({"runs": runs, "median": runs.as_deref().and_then(median)}),
            );
        }
        let cpu = r.cpu_secs.map_or("n/a".into(), |c| format!("{c:.1}"));
        let rss = r
            .peak_rss_mib
            .map_or("n/a".into(), |m| format!("{m:.1} MiB"));
        let _ = writeln!(md, " {cpu} | {rss} |");
        json_paths.push(json!({
            "path": r.name, "figures": figures, "proxy_cpu_secs": r.cpu_secs,
            "proxy_peak_rss_mib": r.peak_rss_mib, "notes": r.notes,
        }));
    }
    let notes: Vec<String> = results
        .iter()
        .flat_map(|r| r.notes.iter().map(move |n| format!("- {}: {n}", r.name)))
        .collect();
    if !notes.is_empty() {
        md.push('\n');
        md.push_str(&notes.join("\n"));
        md.push('\n');
    }
    println!("\n{md}");
    let _ = std::fs::create_dir_all(&args.out);
    let stem = if args.demo {
        "demo"
    } else if args.pair_only {
        "pair"
    } else {
        "latest"
    };
    let json = json!({"date": date, "cores": cores, "runs": args.runs,
        "memcaslap_secs": args.memcaslap_secs, "iperf_secs": args.iperf_secs, "paths": json_paths});
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
