//! The packaged load generators (memcaslap, iperf3) run inside a namespace, a DNS round-trip
//! timer, and the CPU time of the proxy processes they load.
// The benchmark times real processes: wall-clock time is right here.
#![allow(clippy::disallowed_types)]

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use enclave_net_tests::cleanup::{forget, register, Item};
use enclave_net_tests::netns::Netns;
use serde_json::Value;

/// Runs `program` inside `ns` with a time limit; its stdout if it exits with 0.
pub fn run_in(ns: &Netns, program: &str, args: &[&str], limit_secs: u32) -> Option<String> {
    let child = Command::new("timeout")
        .arg(limit_secs.to_string())
        .args(["ip", "netns", "exec", ns.name(), program])
        .args(args)
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
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

/// memcaslap's result: transactions per second and the transactions in all.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Memcaslap {
    /// Transactions per second.
    pub tps: f64,
    /// Transactions in the run.
    pub ops: f64,
}

/// Parses memcaslap's last line, `Run time: 10.0s Ops: 757466 TPS: 75727 Net_rate: ...`.
pub fn parse_memcaslap(out: &str) -> Option<Memcaslap> {
    let line = out.lines().rev().find(|l| l.contains("TPS:"))?;
    let field = |name: &str| -> Option<f64> {
        line.split(name)
            .nth(1)?
            .split_whitespace()
            .next()?
            .parse()
            .ok()
    };
    Some(Memcaslap {
        tps: field("TPS:")?,
        ops: field("Ops:")?,
    })
}

/// memcaslap with 2 threads and 32 connections for `secs` against `server` (`IP:PORT`).
pub fn memcaslap(ns: &Netns, server: &str, secs: u32) -> Option<Memcaslap> {
    let t = format!("{secs}s");
    let out = run_in(
        ns,
        "memcaslap",
        &["-s", server, "-T", "2", "-c", "32", "-t", &t],
        secs + 30,
    )?;
    parse_memcaslap(&out)
}

/// Received Gbit/s from iperf3's `-J` output.
pub fn parse_iperf3(out: &str) -> Option<f64> {
    let v: Value = serde_json::from_str(out).ok()?;
    let bps = v["end"]["sum_received"]["bits_per_second"].as_f64()?;
    (bps > 0.0).then_some(bps / 1e9)
}

/// iperf3 against `server` (`IP:PORT`) with `streams` streams; `reverse` has the server send.
/// Gbit/s received.
pub fn iperf3(ns: &Netns, server: &str, secs: u32, streams: u32, reverse: bool) -> Option<f64> {
    let p = streams.to_string();
    parse_iperf3(&iperf3_json(ns, server, secs, reverse, &["-P", &p])?)
}

/// iperf3 over UDP against `server`, datagrams of `len` bytes sent as fast as the sender can
/// (`-b 0`); `reverse` has the server send. Gbit/s received, and the percentage lost.
pub fn iperf3_udp(ns: &Netns, server: &str, secs: u32, len: usize, reverse: bool) -> Option<Udp> {
    let l = len.to_string();
    parse_iperf3_udp(&iperf3_json(
        ns,
        server,
        secs,
        reverse,
        &["-u", "-b", "0", "-l", &l],
    )?)
}

/// One UDP iperf3 run.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Udp {
    /// Gbit/s received.
    pub gbps: f64,
    /// Datagrams lost, in percent of those sent.
    pub lost_percent: f64,
}

/// Received Gbit/s and loss from a UDP iperf3's `-J` output.
pub fn parse_iperf3_udp(out: &str) -> Option<Udp> {
    let v: Value = serde_json::from_str(out).ok()?;
    let sum = &v["end"]["sum_received"];
    Some(Udp {
        gbps: sum["bits_per_second"].as_f64()? / 1e9,
        lost_percent: sum["lost_percent"].as_f64()?,
    })
}

/// iperf3's JSON output for a run against `server` with `extra` arguments.
fn iperf3_json(
    ns: &Netns,
    server: &str,
    secs: u32,
    reverse: bool,
    extra: &[&str],
) -> Option<String> {
    let (host, port) = server.rsplit_once(':')?;
    let t = secs.to_string();
    let mut args = vec![
        "-c",
        host,
        "-p",
        port,
        "-t",
        &t,
        "-J",
        "--connect-timeout",
        "5000",
    ];
    args.extend_from_slice(extra);
    if reverse {
        args.push("-R");
    }
    run_in(ns, "iperf3", &args, secs + 20)
}

/// DNS round trips through one path.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct DnsLatency {
    /// Median round trip; `None` if more than half were lost.
    pub p50: Option<Duration>,
    /// 99th percentile; `None` if more than 1% were lost.
    pub p99: Option<Duration>,
    /// Queries unanswered within [`DNS_WAIT`].
    pub lost: u64,
    /// Answers that were not a NOERROR answer with a record.
    pub errors: u64,
}

/// How long a DNS query may wait for its answer before it counts as lost.
pub const DNS_WAIT: Duration = Duration::from_secs(1);

/// `count` A queries for `name`, one at a time over one UDP socket from `ns` to `server`, after
/// 100 unmeasured ones; each timed from its send to its answer (matched by id).
pub fn dns_latency(
    ns: &Netns,
    server: std::net::SocketAddr,
    name: &str,
    count: u16,
) -> std::io::Result<DnsLatency> {
    const WARMUP: u16 = 100;
    let name = name.to_string();
    ns.run(move || {
        let socket = std::net::UdpSocket::bind("0.0.0.0:0")?;
        socket.connect(server)?;
        socket.set_read_timeout(Some(DNS_WAIT))?;
        let mut buf = [0u8; 4096];
        let (mut rtts, mut errors) = (Vec::new(), 0);
        for id in 0..WARMUP.saturating_add(count) {
            let sent = Instant::now();
            socket.send(&enclave_net_tests::dns::query(id, &name, 1, None))?;
            let answer = loop {
                match socket.recv(&mut buf) {
                    // A late answer to an earlier query.
                    Ok(n) if n < 12 || buf[..2] != id.to_be_bytes() => continue,
                    Ok(_) => break Some(sent.elapsed()),
                    Err(e)
                        if matches!(
                            e.kind(),
                            std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                        ) =>
                    {
                        break None
                    }
                    Err(e) => return Err(e),
                }
            };
            let good = buf[3] & 0x0f == 0 && buf[6..8] != [0, 0];
            match answer {
                Some(rtt) if id >= WARMUP && good => rtts.push(rtt.as_nanos() as u64),
                Some(_) if id >= WARMUP => errors += 1,
                _ => {}
            }
        }
        rtts.sort_unstable();
        let measured = u64::from(count);
        Ok(DnsLatency {
            p50: crate::loadgen::quantile(&rtts, measured, 0.50),
            p99: crate::loadgen::quantile(&rtts, measured, 0.99),
            lost: measured - rtts.len() as u64 - errors,
            errors,
        })
    })
}

/// `(ppid, utime + stime + cutime + cstime in ticks)` from a `/proc/PID/stat` line.
fn parse_stat(stat: &str) -> Option<(u32, f64)> {
    // The command name may hold spaces and brackets: the fields start after the last ')'.
    let fields: Vec<&str> = stat.rsplit_once(')')?.1.split_whitespace().collect();
    // state=0 ppid=1 ... utime=11 stime=12 cutime=13 cstime=14 (man 5 proc, fields 3..17).
    let ppid = fields.get(1)?.parse().ok()?;
    let ticks: f64 = fields
        .get(11..15)?
        .iter()
        .map(|f| f.parse::<f64>().ok())
        .sum::<Option<f64>>()?;
    Some((ppid, ticks))
}

/// Every process's parent, from /proc.
fn parents() -> Vec<(u32, u32)> {
    let Ok(dir) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    dir.flatten()
        .filter_map(|e| e.file_name().to_str()?.parse::<u32>().ok())
        .filter_map(|pid| {
            let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
            Some((pid, parse_stat(&stat)?.0))
        })
        .collect()
}

/// `pid` and every process below it.
fn tree(pid: u32) -> Vec<u32> {
    let all = parents();
    let mut out = vec![pid];
    let mut i = 0;
    while i < out.len() {
        let p = out[i];
        out.extend(all.iter().filter(|(_, pp)| *pp == p).map(|(c, _)| *c));
        i += 1;
    }
    out
}

/// Whether `pid` is running (it exists and is not a zombie waiting to be reaped).
pub fn alive(pid: u32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .ok()
        .and_then(|s| {
            let state = s.rsplit_once(')')?.1.split_whitespace().next()?.to_string();
            Some(state != "Z" && state != "X")
        })
        .unwrap_or(false)
}

/// The processes below `pid` whose command name is `name`.
pub fn descendants_named(pid: u32, name: &str) -> Vec<u32> {
    tree(pid)
        .into_iter()
        .skip(1)
        .filter(|p| {
            std::fs::read_to_string(format!("/proc/{p}/comm")).is_ok_and(|c| c.trim() == name)
        })
        .collect()
}

/// The load averages, as /proc/loadavg gives them (1, 5 and 15 minutes).
pub fn load_average() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .map(|l| l.split_whitespace().take(3).collect::<Vec<_>>().join(" "))
        .unwrap_or_default()
}

const TICKS_PER_SEC: f64 = 100.0;

/// CPU seconds, user and system, of `pid`, of its children still running (socat forks one per
/// connection) and of those already reaped. `None` if `pid` is gone.
pub fn tree_cpu_secs(pid: u32) -> Option<f64> {
    let own = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let mut ticks = parse_stat(&own)?.1;
    for child in tree(pid).into_iter().skip(1) {
        if let Some((_, t)) = std::fs::read_to_string(format!("/proc/{child}/stat"))
            .ok()
            .and_then(|s| parse_stat(&s))
        {
            ticks += t;
        }
    }
    Some(ticks / TICKS_PER_SEC)
}

/// CPU seconds of every process in `pids` and below; `None` if any is gone.
pub fn cpu_secs(pids: &[u32]) -> Option<f64> {
    pids.iter().map(|p| tree_cpu_secs(*p)).sum()
}

/// Waits (up to `limit`) until none of `pids` has children left, so that the CPU time of
/// per-connection children that just exited is in their parent's count.
pub fn settle_children(pids: &[u32], limit: Duration) {
    let deadline = Instant::now() + limit;
    while Instant::now() < deadline {
        if pids.iter().all(|p| tree(*p).len() == 1) {
            return;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Peak resident memory (VmHWM) of a process in MiB.
pub fn peak_rss_mib(pid: u32) -> Option<f64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let line = status.lines().find(|l| l.starts_with("VmHWM:"))?;
    let kib: f64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib / 1024.0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn memcaslap_summary() {
        let out = "cmd_get: 76474\n\nRun time: 2.0s Ops: 84988 TPS: 42487 Net_rate: 47.5M/s\n";
        assert_eq!(
            parse_memcaslap(out),
            Some(Memcaslap {
                tps: 42487.0,
                ops: 84988.0
            })
        );
        assert_eq!(parse_memcaslap("connection refused"), None);
    }

    #[test]
    fn iperf3_json() {
        let out = r#"{"end": {"sum_received": {"bits_per_second": 9.5e9}}}"#;
        assert_eq!(parse_iperf3(out), Some(9.5));
        assert_eq!(parse_iperf3(r#"{"error": "unable to connect"}"#), None);
        // iperf3 3.12 over UDP: the receiver's side of the run.
        let udp = r#"{"end": {"sum_sent": {"bits_per_second": 2e9, "lost_percent": 0},
            "sum_received": {"bits_per_second": 1.5e9, "lost_percent": 25.0}}}"#;
        assert_eq!(
            parse_iperf3_udp(udp),
            Some(Udp {
                gbps: 1.5,
                lost_percent: 25.0
            })
        );
        assert_eq!(parse_iperf3_udp(r#"{"error": "unable to connect"}"#), None);
    }

    #[test]
    fn stat_line_with_an_awkward_name() {
        let stat = "42 (a) b) S 7 42 42 0 -1 4194560 100 0 0 0 250 50 3 2 20 0 1 0 5 0 0";
        assert_eq!(parse_stat(stat), Some((7, 305.0)));
    }

    #[test]
    fn this_process_has_cpu_time() {
        let me = std::process::id();
        let spent = cpu_secs(&[me]).unwrap();
        assert!(spent >= 0.0);
        assert!(tree(me).contains(&me));
        assert!(alive(me));
        assert!(!alive(u32::MAX));
        assert!(descendants_named(me, "no-such-process").is_empty());
        assert_eq!(load_average().split_whitespace().count(), 3);
        assert!(peak_rss_mib(me).unwrap() > 0.0);
    }
}
