//! The benchmark's results, and the Markdown tables and JSON made from them.
//!
//! Every figure is a list of runs; a table cell shows the median, with its ratio to DIRECT's
//! median of the same figure where the column asks for one. A figure with a failed run shows
//! as failed rather than as the median of the runs that worked.

use std::fmt::Write as _;

use serde_json::{json, Value};

/// One path's figures.
#[derive(Debug, Default)]
pub struct PathResult {
    /// The row name.
    pub name: String,
    /// Figure key -> one value per run (`None`: the run failed).
    pub figures: Vec<(String, Vec<Option<f64>>)>,
    /// Peak resident memory of the proxy processes.
    pub peak_rss_mib: Option<f64>,
    /// CPU seconds the proxy processes spent over all of the path's figures.
    pub cpu_secs: Option<f64>,
    /// Notes printed under the tables.
    pub notes: Vec<String>,
}

impl PathResult {
    /// Records one run of a figure.
    pub fn push(&mut self, key: &str, value: Option<f64>) {
        match self.figures.iter_mut().find(|(k, _)| k == key) {
            Some((_, runs)) => runs.push(value),
            None => self.figures.push((key.to_string(), vec![value])),
        }
    }

    /// The runs of a figure.
    pub fn runs(&self, key: &str) -> Option<&[Option<f64>]> {
        self.figures
            .iter()
            .find(|(k, _)| k == key)
            .map(|(_, r)| r.as_slice())
    }

    /// The median of a figure, if every run worked.
    pub fn median(&self, key: &str) -> Option<f64> {
        self.runs(key).and_then(median)
    }
}

/// The median, or `None` if there are no runs or any failed.
pub fn median(xs: &[Option<f64>]) -> Option<f64> {
    let mut ok: Vec<f64> = xs.iter().flatten().copied().collect();
    if ok.len() < xs.len() || ok.is_empty() {
        return None;
    }
    ok.sort_by(f64::total_cmp);
    Some(ok[ok.len() / 2])
}

/// How a figure is shown.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Unit {
    /// Transactions per second, in thousands.
    Tps,
    /// Gbit/s.
    Gbps,
    /// Microseconds.
    Micros,
    /// A count.
    Count,
    /// MiB.
    Mib,
}

/// One column of a table.
#[derive(Debug, Clone, Copy)]
pub struct Column {
    /// The figure key.
    pub key: &'static str,
    /// The header.
    pub label: &'static str,
    /// How values are shown.
    pub unit: Unit,
    /// Whether to show the ratio to DIRECT.
    pub ratio: bool,
}

const fn col(key: &'static str, label: &'static str, unit: Unit, ratio: bool) -> Column {
    Column {
        key,
        label,
        unit,
        ratio,
    }
}

/// One table: a title, what it measures, and its columns.
#[derive(Debug, Clone, Copy)]
pub struct Table {
    /// Shown as a heading.
    pub title: &'static str,
    /// One paragraph under the heading.
    pub about: &'static str,
    /// What the first row is called in this table.
    pub direct_name: &'static str,
    /// The columns after the path name.
    pub columns: &'static [Column],
}

/// The tables, in order. The scale table is made separately ([`scale_table`]).
pub const TABLES: [Table; 5] = [
    Table {
        title: "Servers in the enclave namespace, and egress",
        about: "memcaslap (2 threads, 32 connections) against memcached in a container behind \
                `docker run -p 8080:11211`; proxy CPU is user+system time of the proxy \
                processes during the memcaslap runs divided by their transactions; iperf3 \
                against a server in the enclave namespace itself (in = client to enclave); \
                egress from the enclave namespace to a server outside.",
        direct_name: "DIRECT",
        columns: &[
            col("memcaslap", "memcaslap TPS", Unit::Tps, true),
            col(
                "cpu_us_per_txn",
                "proxy CPU µs per transaction",
                Unit::Micros,
                false,
            ),
            col("in1", "iperf3 1 stream in", Unit::Gbps, true),
            col("out1", "iperf3 1 stream out", Unit::Gbps, true),
            col("in4", "iperf3 4 streams in", Unit::Gbps, true),
            col("out4", "iperf3 4 streams out", Unit::Gbps, true),
            col("egress1", "egress iperf3 1 stream", Unit::Gbps, false),
            col("peak_rss_mib", "proxy peak RSS", Unit::Mib, false),
        ],
    },
    Table {
        title: "iperf3 server in a container behind `docker run -p 5202:5201`",
        about: "What users run: the server behind Docker's DNAT and bridge (MTU 1500). \
                DIRECT-container is the client in the enclave namespace against the published \
                port.",
        direct_name: "DIRECT-container",
        columns: &[
            col("c_in1", "1 stream in", Unit::Gbps, true),
            col("c_out1", "1 stream out", Unit::Gbps, true),
            col("c_in4", "4 streams in", Unit::Gbps, true),
            col("c_out4", "4 streams out", Unit::Gbps, true),
        ],
    },
    Table {
        title: "Latency at a fixed rate",
        about: "memcached `get` of one 1,024-byte value, open loop (enclave-bench's own \
                generator, benches/src/loadgen.rs): requests are sent on a fixed schedule \
                whatever the answers do, and each is timed from when it was due, so stalls \
                count for every request they delay. Late: requests handed to the kernel more \
                than 1 ms after they were due; lost: unanswered 2 s after the last was due (a \
                percentile that falls among them shows as lost). Generator lag: how late the \
                generator itself handed requests to the kernel (its own floor, from a loaded \
                machine or a full socket buffer).",
        direct_name: "DIRECT",
        columns: &[
            col("lat_p50", "p50", Unit::Micros, true),
            col("lat_p99", "p99", Unit::Micros, true),
            col("lat_p999", "p99.9", Unit::Micros, true),
            col("lat_late", "late", Unit::Count, false),
            col("lat_lost", "lost", Unit::Count, false),
            col("lat_send_lag_p99", "generator lag p99", Unit::Micros, false),
        ],
    },
    Table {
        title: "DNS round trips",
        about: "2,000 A queries over UDP for a name in the test zone of dnsmasq (Debian's), \
                one at a time after 100 unmeasured, in the \"internet\" namespace. DIRECT asks \
                dnsmasq straight from the parent namespace; ENCLAVE-NET asks the enclave's \
                gateway from the enclave namespace: enclave-proxy, host-proxy over the link, \
                then the same dnsmasq. Lost: unanswered within 1 s. The peers are not \
                measured: their resolvers (slirp4netns's, pasta's) forward to the parent's own \
                nameservers, outside the test's namespaces.",
        direct_name: "DIRECT (to dnsmasq)",
        columns: &[
            col("dns_p50", "p50", Unit::Micros, true),
            col("dns_p99", "p99", Unit::Micros, true),
            col("dns_lost", "lost", Unit::Count, false),
        ],
    },
    Table {
        title: "UDP: iperf3 -u at several datagram sizes",
        about: "iperf3 over UDP against the server in the enclave namespace, sent as fast as \
                the sender can (`-b 0`), datagrams of 64, 1,400 and 8,000 bytes (in = client \
                to enclave); Gbit/s received (what was lost is in the JSON). The pair and the \
                peers forward the port for UDP as for TCP; SPLICE (a socat TCP pair) carries \
                no UDP.",
        direct_name: "DIRECT",
        columns: &[
            col("udp_in_64", "64 B in", Unit::Gbps, true),
            col("udp_out_64", "64 B out", Unit::Gbps, true),
            col("udp_in_1400", "1,400 B in", Unit::Gbps, true),
            col("udp_out_1400", "1,400 B out", Unit::Gbps, true),
            col("udp_in_8000", "8,000 B in", Unit::Gbps, true),
            col("udp_out_8000", "8,000 B out", Unit::Gbps, true),
        ],
    },
];

fn show(unit: Unit, v: f64) -> String {
    match unit {
        Unit::Tps => format!("{:.0}k", v / 1000.0),
        Unit::Gbps if v < 1.0 => format!("{:.0} Mbps", v * 1000.0),
        Unit::Gbps => format!("{v:.1} Gbps"),
        Unit::Micros if v >= 10_000.0 => format!("{:.1} ms", v / 1000.0),
        Unit::Micros if v >= 100.0 => format!("{v:.0} µs"),
        Unit::Micros => format!("{v:.1} µs"),
        Unit::Count => format!("{v:.0}"),
        Unit::Mib => format!("{v:.1} MiB"),
    }
}

fn cell(r: &PathResult, c: &Column, direct: Option<f64>, is_direct: bool) -> String {
    let Some(runs) = r.runs(c.key).filter(|r| !r.is_empty()) else {
        return "n/a".into();
    };
    match median(runs) {
        None => format!(
            "failed ({}/{} runs)",
            runs.iter().flatten().count(),
            runs.len()
        ),
        Some(m) if m.is_infinite() => "lost".into(),
        Some(m) => match direct {
            Some(d) if c.ratio && d > 0.0 && !is_direct => {
                format!("{} ({:.2}×)", show(c.unit, m), m / d)
            }
            _ => show(c.unit, m),
        },
    }
}

/// One Markdown table, or nothing if no path has any of its figures. Columns no path has are
/// left out.
pub fn table(t: &Table, results: &[PathResult]) -> String {
    let direct = results.iter().find(|r| r.name == "DIRECT");
    let columns: Vec<&Column> = t
        .columns
        .iter()
        .filter(|c| results.iter().any(|r| r.runs(c.key).is_some()))
        .collect();
    if columns.is_empty() {
        return String::new();
    }
    let mut md = format!("### {}\n\n{}\n\n| path |", t.title, t.about);
    for c in &columns {
        let _ = write!(md, " {} |", c.label);
    }
    md.push_str("\n|---|");
    for _ in &columns {
        md.push_str("---|");
    }
    md.push('\n');
    for r in results {
        if !columns.iter().any(|c| r.runs(c.key).is_some()) {
            continue;
        }
        let is_direct = r.name == "DIRECT";
        let name = if is_direct { t.direct_name } else { &r.name };
        let _ = write!(md, "| {name} |");
        for c in &columns {
            let d = direct.and_then(|d| d.median(c.key));
            let _ = write!(md, " {} |", cell(r, c, d, is_direct));
        }
        md.push('\n');
    }
    md
}

/// The scale table: each `scale_<figure>_none` beside `scale_<figure>_idle` for `r`, with
/// `scale_idle_count` idle connections.
pub fn scale_table(r: &PathResult) -> String {
    let idle = r.median("scale_idle_count").unwrap_or(0.0) as u64;
    let figures = [
        ("in1", "iperf3 1 stream in"),
        ("out1", "iperf3 1 stream out"),
    ];
    let rows: Vec<_> = figures
        .iter()
        .filter(|(f, _)| r.runs(&format!("scale_{f}_none")).is_some())
        .collect();
    if rows.is_empty() {
        return String::new();
    }
    let mut md = format!(
        "### {} with {idle} idle connections open through it\n\n\
         Single-stream iperf3 against the server in the enclave namespace, with none and then \
         with {idle} idle connections held open through the pair (clients in the client \
         namespace, an enclave server that accepts and holds them).\n\n\
         | figure | no idle connections | {idle} idle connections | ratio |\n|---|---|---|---|\n",
        r.name
    );
    for (f, label) in rows {
        let none = r.median(&format!("scale_{f}_none"));
        let idle_v = r.median(&format!("scale_{f}_idle"));
        let fmt = |v: Option<f64>| v.map_or("failed".into(), |v| show(Unit::Gbps, v));
        let ratio = match (none, idle_v) {
            (Some(a), Some(b)) if a > 0.0 => format!("{:.2}×", b / a),
            _ => "n/a".into(),
        };
        let _ = writeln!(
            md,
            "| {label} | {} | {} | {ratio} |",
            fmt(none),
            fmt(idle_v)
        );
    }
    md
}

/// The notes of every path, as a Markdown list.
pub fn notes(results: &[PathResult]) -> String {
    let notes: Vec<String> = results
        .iter()
        .flat_map(|r| r.notes.iter().map(move |n| format!("- {}: {n}", r.name)))
        .collect();
    if notes.is_empty() {
        String::new()
    } else {
        format!("{}\n", notes.join("\n"))
    }
}

/// A run's value as JSON: a failed run is `null`, a latency percentile that fell among lost
/// requests (infinite) is `"lost"`.
fn to_json(v: Option<f64>) -> Value {
    match v {
        Some(v) if v.is_infinite() => json!("lost"),
        v => json!(v),
    }
}

/// Every path as JSON: each figure's runs and median.
pub fn json_paths(results: &[PathResult]) -> Vec<Value> {
    results
        .iter()
        .map(|r| {
            let figures: serde_json::Map<String, Value> = r
                .figures
                .iter()
                .map(|(k, runs)| {
                    let m = to_json(median(runs));
                    let runs: Vec<Value> = runs.iter().map(|v| to_json(*v)).collect();
                    (k.clone(), json!({"runs": runs, "median": m}))
                })
                .collect();
            json!({
                "path": r.name, "figures": figures, "proxy_cpu_secs": r.cpu_secs,
                "proxy_peak_rss_mib": r.peak_rss_mib, "notes": r.notes,
            })
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn path(name: &str, figs: &[(&str, &[Option<f64>])]) -> PathResult {
        let mut r = PathResult {
            name: name.into(),
            ..Default::default()
        };
        for (k, runs) in figs {
            for v in *runs {
                r.push(k, *v);
            }
        }
        r
    }

    #[test]
    fn medians_ratios_failures_and_missing_columns() {
        let results = [
            path(
                "DIRECT",
                &[("memcaslap", &[Some(70e3), Some(80e3), Some(75e3)])],
            ),
            path(
                "ENCLAVE-NET",
                &[
                    ("memcaslap", &[Some(30e3), Some(20e3), Some(45e3)]),
                    ("cpu_us_per_txn", &[Some(31.0), Some(33.0), Some(32.0)]),
                    ("in1", &[Some(9.0), None, Some(9.5)]),
                ],
            ),
        ];
        let md = table(&TABLES[0], &results);
        assert!(md.contains("| DIRECT | 75k | n/a | n/a |"), "{md}");
        assert!(
            md.contains("| ENCLAVE-NET | 30k (0.40×) | 32.0 µs | failed (2/3 runs) |"),
            "{md}"
        );
        // No path has out1 and the rest: those columns are left out.
        assert!(!md.contains("1 stream out"), "{md}");
        assert_eq!(table(&TABLES[1], &results), "");
    }

    #[test]
    fn latency_lost_and_scale() {
        let mut r = path(
            "ENCLAVE-NET",
            &[
                (
                    "lat_p99",
                    &[Some(f64::INFINITY), Some(f64::INFINITY), Some(900.0)],
                ),
                ("lat_p50", &[Some(100.0), None, Some(90.0)]),
                ("scale_in1_none", &[Some(10.0)]),
                ("scale_idle_count", &[Some(10_000.0)]),
                ("scale_in1_idle", &[Some(9.0)]),
            ],
        );
        r.name = "ENCLAVE-NET".into();
        let md = table(&TABLES[2], std::slice::from_ref(&r));
        assert!(
            md.contains("| ENCLAVE-NET | failed (2/3 runs) | lost |"),
            "{md}"
        );
        let json = json_paths(std::slice::from_ref(&r));
        assert_eq!(json[0]["figures"]["lat_p99"]["median"], "lost");
        assert_eq!(json[0]["figures"]["lat_p50"]["runs"][1], Value::Null);
        let md = scale_table(&r);
        assert!(
            md.contains("| iperf3 1 stream in | 10.0 Gbps | 9.0 Gbps | 0.90× |"),
            "{md}"
        );
    }
}
