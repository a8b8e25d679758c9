//! Super-frames on the TAP (issue 7): TCP segmentation offload between the enclave kernel and
//! enclave-proxy. A container behind `docker run -p` takes a 64 MiB upload and serves a 64 MiB
//! download through the pair, each checked end to end by SHA-256, with `--offload on` and with
//! `--offload off`. With it on, enclave-proxy's TAP counters show that both directions really
//! crossed the TAP as super-frames (the download as TSO frames from the kernel, the upload as
//! GSO frames to it); with it off, that no frame was larger than the bridge's MTU allows.
//!
//! `o3_iperf3_into_a_container` (ignored: a measurement, not a check) prints single-stream
//! iperf3 throughput into a container with offload on and off. Run as root.
// These tests time real processes across namespaces, so wall-clock `std::time::Instant` is right here.
#![allow(clippy::unwrap_used, missing_docs, clippy::disallowed_types)]

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use enclave_net_tests::cleanup;
use enclave_net_tests::docker::BUSYBOX_IMAGE;
use enclave_net_tests::lab::Lab;
use enclave_net_tests::process::Counters;
use enclave_net_tests::require_root;
use enclave_net_tests::topology::{ENCLAVE_IP, ENCLAVE_PORT, PARENT_IP, PUBLISHED};
use enclave_net_tests::traffic::{hex, payload, send_then_read, sha};
use sha2::{Digest, Sha256};
use tokio::io::AsyncReadExt;

/// Bytes each way.
const SIZE: usize = 64 << 20;
/// The published port of the download source (the upload sink is on [`PUBLISHED`]).
const SOURCE_PORT: u16 = 18081;
/// The largest frame a container's traffic makes on Docker's 1,500-byte bridge.
const BRIDGE_FRAME: u64 = 14 + 1500;

fn published(port: u16) -> SocketAddr {
    SocketAddr::from((PARENT_IP, port))
}

/// Starts the lab with enclave-proxy's `--offload` set, and two containers: a sink on enclave
/// port 8080 that answers the SHA-256 of everything a connection sent (busybox `sha256sum`
/// behind `nc -e`), and a source on 8081 that sends `blob` (bind-mounted) and closes.
fn lab(offload: &str) -> (Lab, Vec<u8>) {
    let lab = Lab::start(
        &["--publish", &format!("{SOURCE_PORT}:8081")],
        &["--offload", offload],
    );
    assert!(
        lab.topo
            .enclave_proxy()
            .log_text()
            .contains(&format!("TAP offload {offload}")),
        "enclave-proxy says which offload is in use:\n{}",
        lab.topo.logs()
    );
    lab.docker.cli(&[
        "run",
        "-d",
        "-p",
        "8080:80",
        BUSYBOX_IMAGE,
        "nc",
        "-ll",
        "-p",
        "80",
        "-e",
        "busybox",
        "sha256sum",
    ]);
    let blob = payload(0x0ff1_0ad0, SIZE);
    let path = lab.topo.dir.0.join("blob");
    std::fs::write(&path, &blob).unwrap();
    let mount = format!("{}:/blob:ro", path.display());
    lab.docker.cli(&[
        "run",
        "-d",
        "-p",
        "8081:81",
        "-v",
        &mount,
        BUSYBOX_IMAGE,
        "nc",
        "-ll",
        "-p",
        "81",
        "-e",
        "cat",
        "/blob",
    ]);
    (lab, blob)
}

/// What the sink answers for `data`: `sha256sum`'s line for standard input.
fn sink_reply(data: &[u8]) -> String {
    format!("{}  -\n", hex(&sha(data)))
}

/// Waits until the sink answers through the pair (the container may still be starting).
async fn wait_for_sink(lab: &Lab) {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        if let Ok(s) = lab.topo.client.connect(published(PUBLISHED)).await {
            if let Ok(Ok(reply)) =
                tokio::time::timeout(Duration::from_secs(5), send_then_read(s, b"")).await
            {
                if reply == sink_reply(b"") {
                    return;
                }
            }
        }
        assert!(
            Instant::now() < deadline,
            "the sink never answered\n{}",
            lab.topo.logs()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Uploads 64 MiB to the sink and checks the hash it answers.
async fn upload(lab: &Lab) -> Duration {
    let data = payload(0x0ff1_0ae0, SIZE);
    let s = lab.topo.client.connect(published(PUBLISHED)).await.unwrap();
    let start = Instant::now();
    let reply = send_then_read(s, &data).await.unwrap();
    let took = start.elapsed();
    assert_eq!(
        reply,
        sink_reply(&data),
        "the container hashed something else\n{}",
        lab.topo.logs()
    );
    took
}

/// Downloads the source's 64 MiB and checks its hash; retries while the container starts (a
/// connection it does not take yet ends with nothing read).
async fn download(lab: &Lab, blob: &[u8]) -> Duration {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let mut s = lab
            .topo
            .client
            .connect(published(SOURCE_PORT))
            .await
            .unwrap();
        let start = Instant::now();
        let mut hasher = Sha256::new();
        let mut buf = vec![0u8; 256 * 1024];
        let mut total = 0;
        let ended = loop {
            match s.read(&mut buf).await {
                Ok(0) => break Ok(()),
                Ok(n) => {
                    hasher.update(&buf[..n]);
                    total += n;
                }
                Err(e) => break Err(e),
            }
        };
        if total == 0 {
            assert!(
                Instant::now() < deadline,
                "the source never sent anything ({ended:?})\n{}",
                lab.topo.logs()
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
            continue;
        }
        let took = start.elapsed();
        ended.unwrap_or_else(|e| panic!("download failed after {total} bytes: {e}"));
        assert_eq!(total, blob.len());
        let got: [u8; 32] = hasher.finalize().into();
        assert_eq!(hex(&got), hex(&sha(blob)), "the download was corrupted");
        return took;
    }
}

/// Stops enclave-proxy and returns the TAP counters it logs on the way out.
fn tap_counters(lab: &mut Lab) -> Counters {
    let mut proxy = lab.topo.enclave_proxy.take().unwrap();
    assert!(proxy.stop(), "enclave-proxy exits cleanly");
    let log = proxy.log_text();
    let line = log
        .lines()
        .find(|l| l.contains("TAP closed"))
        .unwrap_or_else(|| panic!("no TAP counters in the log:\n{log}"));
    Counters::parse(line)
}

fn gbps(bytes: usize, took: Duration) -> f64 {
    bytes as f64 * 8.0 / took.as_secs_f64() / 1e9
}

async fn both_ways(offload: &str) -> Counters {
    let (mut lab, blob) = tokio::task::block_in_place(|| lab(offload));
    wait_for_sink(&lab).await;
    let up = upload(&lab).await;
    let down = download(&lab, &blob).await;
    eprintln!(
        "offload {offload}: 64 MiB up in {up:.2?} ({:.2} Gbit/s), down in {down:.2?} ({:.2} Gbit/s)",
        gbps(SIZE, up),
        gbps(SIZE, down)
    );
    let counters = tap_counters(&mut lab);
    eprintln!("offload {offload}: TAP counters {:?}", counters.0);
    counters
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn o1_super_frames_both_ways_keep_the_data() {
    require_root();
    let c = both_ways("on").await;
    // The download: the container's stack builds GSO packets, which the bridge keeps whole and
    // the kernel hands to the TAP as TSO frames.
    assert!(
        c.get("tap.rx_gso") > 0,
        "no super-frame from the kernel: {c:?}"
    );
    assert!(c.get("tap.rx_max") > BRIDGE_FRAME, "{c:?}");
    // The upload: the sink's SYN-ACK had its MSS raised, and what smoltcp sent beyond 1,460
    // bytes went out marked for the kernel to cut.
    assert!(c.get("tap.mss_raised") >= 1, "{c:?}");
    assert!(
        c.get("tap.tx_gso") > 0,
        "no super-frame to the kernel: {c:?}"
    );
    assert!(c.get("tap.tx_max") > BRIDGE_FRAME, "{c:?}");
    assert_eq!(c.get("tap.rx_unsupported"), 0);
    assert_eq!(c.get("tap.tx_dropped"), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn o2_offload_forced_off_keeps_the_data_and_every_frame_small() {
    require_root();
    let c = both_ways("off").await;
    assert_eq!(c.get("tap.rx_gso"), 0, "{c:?}");
    assert_eq!(c.get("tap.tx_gso"), 0, "{c:?}");
    assert_eq!(c.get("tap.mss_raised"), 0, "{c:?}");
    // Only container traffic crossed the TAP, so every frame fit the bridge's MTU.
    assert!(c.get("tap.rx_max") <= BRIDGE_FRAME, "{c:?}");
    assert!(c.get("tap.tx_max") <= BRIDGE_FRAME, "{c:?}");
    assert_eq!(c.get("tap.tx_dropped"), 0);
}

/// Where an iperf3 run goes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Path {
    /// From the client namespace through the pair to the container behind `-p` (port 18080).
    Pair,
    /// From the enclave namespace to the same published port: the enclave kernel's own path,
    /// no pair, for reference.
    Direct,
    /// From the client namespace through the pair to an iperf3 server in the enclave namespace
    /// itself (no container, no bridge: the TAP's own 65,520-byte MTU), for reference.
    PairNoContainer,
}

/// Single-stream iperf3 from the client namespace into a container behind `-p`, through the
/// pair with offload on and with it off, each direction, with the enclave kernel's own path to
/// the same container and the pair's path to a server outside any container for reference;
/// prints medians in Gbit/s. Both labs run at once and their runs alternate, so that load from
/// elsewhere on the machine weighs on both alike. A measurement: run it with `--ignored
/// --nocapture`; `OFFLOAD_IPERF_SECS` and `OFFLOAD_IPERF_RUNS` change its length,
/// `OFFLOAD_IPERF_PATHS` (a list of `container`, `direct`, `no-container`) what it measures.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "a measurement, not a check"]
async fn o3_iperf3_into_a_container() {
    require_root();
    let secs = std::env::var("OFFLOAD_IPERF_SECS").unwrap_or_else(|_| "10".into());
    let runs: usize = std::env::var("OFFLOAD_IPERF_RUNS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(3);
    let wanted = std::env::var("OFFLOAD_IPERF_PATHS")
        .unwrap_or_else(|_| "container,direct,no-container".into());
    let mut labs = Vec::new();
    for offload in ["on", "off"] {
        let lab = tokio::task::block_in_place(|| {
            let lab = Lab::start(
                &["--publish", &format!("{SOURCE_PORT}:8081")],
                &["--offload", offload],
            );
            lab.docker.import_iperf3_image();
            lab.docker.cli(&[
                "run",
                "-d",
                "-p",
                "8080:5201",
                enclave_net_tests::docker::IPERF3_IMAGE,
            ]);
            lab
        });
        let local = Server::start(
            lab.topo
                .enclave
                .command("iperf3")
                .args(["-s", "-p", "8081"])
                .stdout(std::process::Stdio::null()),
        );
        // Tuple fields drop in order: the server goes before its lab and namespace.
        labs.push((offload, local, lab));
    }
    let mut rows = Vec::new();
    for (path, name) in [
        (Path::Pair, "container"),
        (Path::Direct, "direct"),
        (Path::PairNoContainer, "no-container"),
    ] {
        if !wanted.split(',').any(|w| w.trim() == name) {
            continue;
        }
        // The direct path does not cross the pair: measured once, in the first lab.
        let labs = if path == Path::Direct {
            &labs[..1]
        } else {
            &labs[..]
        };
        for reverse in [false, true] {
            let mut results = vec![Vec::new(); labs.len()];
            for _ in 0..runs {
                for (i, (_, _, lab)) in labs.iter().enumerate() {
                    let r = tokio::task::block_in_place(|| iperf3(lab, &secs, reverse, path));
                    results[i].push(r);
                }
            }
            for ((offload, _, _), mut r) in labs.iter().zip(results) {
                r.sort_by(f64::total_cmp);
                let direction = if reverse { "to client" } else { "from client" };
                let label = match path {
                    Path::Direct => "direct (no pair), container".to_string(),
                    _ => format!("pair, offload {offload:3}, {name}"),
                };
                rows.push(format!(
                    "{label:31} {direction:11}: median {:5.2} Gbit/s of {r:.2?}",
                    r[r.len() / 2]
                ));
            }
        }
    }
    for row in rows {
        eprintln!("{row}");
    }
}

/// An iperf3 server this test started, killed by its PID when dropped, even by a panic, and
/// by the harness's clean-up on Ctrl-C.
struct Server(std::process::Child);

impl Server {
    fn start(cmd: &mut std::process::Command) -> Server {
        let child = cmd.spawn().unwrap();
        cleanup::register(cleanup::Item::Process(child.id()));
        Server(child)
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        cleanup::forget(&cleanup::Item::Process(self.0.id()));
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// One iperf3 run (see [`Path`]); returns the receiver's Gbit/s. Retries while the server
/// starts.
fn iperf3(lab: &Lab, secs: &str, reverse: bool, path: Path) -> f64 {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let mut cmd = match path {
            Path::Pair | Path::PairNoContainer => {
                let port = if path == Path::Pair {
                    PUBLISHED
                } else {
                    SOURCE_PORT
                };
                let mut cmd = lab.topo.client.command("iperf3");
                cmd.args(["-c", &PARENT_IP.to_string(), "-p", &port.to_string()]);
                cmd
            }
            Path::Direct => {
                let mut cmd = lab.topo.enclave.command("iperf3");
                cmd.args([
                    "-c",
                    &ENCLAVE_IP.to_string(),
                    "-p",
                    &ENCLAVE_PORT.to_string(),
                ]);
                cmd
            }
        };
        cmd.args(["-t", secs, "-f", "g"]);
        if reverse {
            cmd.arg("-R");
        }
        let out = cmd.output().unwrap();
        let text = String::from_utf8_lossy(&out.stdout);
        if out.status.success() {
            // The receiver's summary line: "... 12.3 GBytes  10.5 Gbits/sec  receiver".
            let line = text
                .lines()
                .find(|l| l.trim_end().ends_with("receiver"))
                .unwrap_or_else(|| panic!("no receiver line:\n{text}"));
            let words: Vec<&str> = line.split_whitespace().collect();
            let at = words.iter().position(|w| *w == "Gbits/sec").unwrap();
            return words[at - 1].parse().unwrap();
        }
        assert!(
            Instant::now() < deadline,
            "iperf3 failed: {text}{}\n{}",
            String::from_utf8_lossy(&out.stderr),
            lab.topo.logs()
        );
        std::thread::sleep(Duration::from_millis(200));
    }
}
