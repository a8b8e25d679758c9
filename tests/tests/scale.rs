//! Scale, end to end: "10,000 concurrent idle ingress connections are held while a 64 MiB
//! transfer completes with the right checksum."
//!
//! Run as root. The test builds its own client / parent / enclave / internet namespaces and
//! removes them afterwards, even when it fails.
//!
//! **Descriptors.** The hard `RLIMIT_NOFILE` on the machines this runs on is 20,000, and without
//! `CAP_SYS_RESOURCE` not even root can raise it. host-proxy spends two descriptors per ingress
//! connection (the client's socket and its link stream), so one host-proxy cannot carry 10,000.
//! The test therefore runs **two host-proxies** in the parent, each publishing its own port to
//! the same enclave-proxy link socket, and opens 5,000 connections through each:
//! enclave-proxy, one stack and one descriptor per link stream, carries all 10,000. The client
//! ends are in this process (one descriptor each); the server ends are in a process of their
//! own in the enclave namespace, the `idle-holder` binary ([`enclave_net_tests::idle::hold`]),
//! which counts a connection only once it has accepted it, that is once it crossed the pair.
//!
//! The clients come from 50 extra addresses in the client namespace (10.99.0.100 onwards), 200
//! each and 100 to each host-proxy, under host-proxy's default `--max-per-client` of 256. At
//! most [`WINDOW`] connections are between `connect` and the holder's `accept` at once:
//! enclave-proxy resets set-ups beyond 1,024 in flight.
//!
//! Once all 10,000 are held (the holder's count and the daemons' live-ingress gauges agree),
//! 64 MiB go each way through the first host-proxy on a connection of its own, checked by
//! SHA-256 at both ends; then every one of the 10,000 must still be open at both ends.
// These tests time real processes across namespaces, so wall-clock `std::time::Instant` is right here.
#![allow(clippy::unwrap_used, missing_docs, clippy::disallowed_types)]

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::time::{Duration, Instant};

use enclave_net_tests::idle::{self, capacity, Idle, WINDOW};
use enclave_net_tests::process::{bin, Daemon};
use enclave_net_tests::topology::*;
use enclave_net_tests::traffic::*;
use enclave_net_tests::{raise_nofile, require_root};

/// Idle connections held through the pair.
const IDLE: usize = 10_000;
/// host-proxies carrying them, an equal share each.
const HOSTS: usize = 2;
/// Client addresses the idle connections come from (10.99.0.100 onwards).
const SOURCES: u8 = 50;
/// The enclave port the holder listens on.
const ENCLAVE_IDLE: u16 = 9090;
/// The parent port each host-proxy publishes it on: the first one's, then the second one's.
const PUBLISHED_IDLE: [u16; HOSTS] = [19090, 19091];
/// The transfer, each way.
const BIG: usize = 64 * 1024 * 1024;
/// The transfer's seed.
const SEED: u64 = 0x5ca1e;
/// How long the transfer may take: a few seconds is usual.
const TRANSFER_LIMIT: Duration = Duration::from_secs(60);

/// Polls `f` every 200 ms for up to `secs` until it returns `Ok`; panics otherwise, with `what`
/// and the last error.
fn wait_for<T>(secs: u64, what: &str, mut f: impl FnMut() -> Result<T, String>) -> T {
    let deadline = Instant::now() + Duration::from_secs(secs);
    loop {
        match f() {
            Ok(v) => return v,
            Err(last) if Instant::now() > deadline => panic!("{what} within {secs} s: {last}"),
            Err(_) => std::thread::sleep(Duration::from_millis(200)),
        }
    }
}

/// Everything the daemons and the holder logged, for failure messages.
fn logs(topo: &Topology, second: &Daemon, holder: &Daemon) -> String {
    let tail = |d: &Daemon| {
        let text = d.log_text();
        let lines: Vec<&str> = text.lines().collect();
        lines[lines.len().saturating_sub(20)..].join("\n")
    };
    format!(
        "{}\n--- second host-proxy ---\n{}\n--- idle-holder (last lines) ---\n{}",
        topo.logs(),
        second.log_text(),
        tail(holder)
    )
}

/// Live ingress connections of (first host-proxy, second host-proxy, enclave-proxy).
fn live(topo: &Topology, second: &Daemon) -> (u64, u64, u64) {
    (
        topo.host().counters().live().0,
        second.counters().live().0,
        topo.enclave_proxy().counters().live().0,
    )
}

/// Waits up to 10 s for the live ingress gauges of both host-proxies and enclave-proxy to read
/// `want`.
fn live_becomes(topo: &Topology, second: &Daemon, want: (u64, u64, u64), what: &str) {
    wait_for(10, what, || {
        let now = live(topo, second);
        if now == want {
            Ok(now)
        } else {
            Err(format!("{now:?}, want {want:?}"))
        }
    });
}

#[test]
fn s01_ten_thousand_idle_connections_are_held_through_a_64mib_transfer() {
    require_root();
    let started = Instant::now();
    // The daemons and the holder inherit this; this process holds the 10,000 client ends.
    let nofile = raise_nofile(65_536);
    assert!(
        nofile >= IDLE as u64 + 1024,
        "RLIMIT_NOFILE is {nofile}: too low for this process to hold {IDLE} client ends"
    );
    let per_host = IDLE / HOSTS;
    let topo = Topology::start(
        &[
            "--publish",
            &format!("{}:{ENCLAVE_IDLE}", PUBLISHED_IDLE[0]),
        ],
        &[],
    );
    // The second host-proxy: the same enclave link, a publish of its own, and an egress
    // listener enclave-proxy never uses.
    let second = {
        let mut cmd = topo
            .parent
            .command(bin("host-proxy").to_str().expect("utf-8 path"));
        cmd.args([
            "--enclave".to_string(),
            format!("unix:{}", topo.enclave_link().display()),
            "--listen".into(),
            format!("unix:{}", topo.dir.0.join("host-2.sock").display()),
            "--publish".into(),
            format!("{}:{ENCLAVE_IDLE}", PUBLISHED_IDLE[1]),
        ]);
        Daemon::start("host-proxy #2", cmd, topo.dir.0.join("host-proxy-2.log"))
    };
    for (name, d) in [("host-proxy", topo.host()), ("host-proxy #2", &second)] {
        let fits = capacity(nofile, d.fd_count() as u64, 16);
        assert!(
            fits >= per_host as u64,
            "{name} can carry only {fits} connections with RLIMIT_NOFILE {nofile}, not \
             {per_host}"
        );
    }
    let holder = {
        let mut cmd = topo.enclave.command(env!("CARGO_BIN_EXE_idle-holder"));
        cmd.arg(format!("0.0.0.0:{ENCLAVE_IDLE}"));
        Daemon::start_with(
            "idle-holder",
            cmd,
            topo.dir.0.join("idle-holder.log"),
            "holding connections",
            Duration::from_secs(5),
        )
    };
    let sources: Vec<IpAddr> = (0..SOURCES)
        .map(|i| IpAddr::V4(Ipv4Addr::new(10, 99, 0, 100 + i)))
        .collect();
    for ip in &sources {
        topo.client
            .ip(&["addr", "add", &format!("{ip}/24"), "dev", "toparent"]);
    }
    let rss_before = [
        topo.host().rss_kib(),
        second.rss_kib(),
        topo.enclave_proxy().rss_kib(),
    ];

    // Open the 10,000, WINDOW at a time, spread over both host-proxies.
    let dsts = PUBLISHED_IDLE.map(|port| SocketAddr::from((PARENT_IP, port)));
    let held = || idle::held(&holder.log_text());
    let idle = Idle::open(&topo.client, &dsts, &sources, IDLE, &held).unwrap_or_else(|e| {
        panic!(
            "opening {IDLE} idle connections ({WINDOW} at a time): {e}\n{}",
            logs(&topo, &second, &holder)
        )
    });
    let opened = started.elapsed();
    let want = (per_host as u64, per_host as u64, IDLE as u64);
    live_becomes(
        &topo,
        &second,
        want,
        "live ingress gauges (host-proxy, host-proxy #2, enclave-proxy)",
    );
    let rss_after = [
        topo.host().rss_kib(),
        second.rss_kib(),
        topo.enclave_proxy().rss_kib(),
    ];
    let per_conn =
        |i: usize, n: usize| rss_after[i].saturating_sub(rss_before[i]) * 1024 / n as u64;
    println!(
        "{IDLE} idle connections held {:.1} s into the test; live ingress {want:?}; descriptors: \
         host-proxy {}, host-proxy #2 {}, enclave-proxy {}, idle-holder {}; VmRSS growth per \
         connection: host-proxy {} B, host-proxy #2 {} B, enclave-proxy {} B",
        opened.as_secs_f64(),
        topo.host().fd_count(),
        second.fd_count(),
        topo.enclave_proxy().fd_count(),
        holder.fd_count(),
        per_conn(0, per_host),
        per_conn(1, per_host),
        per_conn(2, IDLE),
    );

    // 64 MiB each way through the first host-proxy while they are held.
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let data = client_payload(SEED, BIG);
    let (want_to_enclave, want_from_enclave) = (sha(&data), sha(&payload(reply_seed(SEED), BIG)));
    let transfer = Instant::now();
    let outcome = runtime.block_on(async {
        let mut results = serve_exchange(topo.enclave.listen(any(ENCLAVE_PORT)), BIG);
        let carry = async {
            let stream = topo
                .client
                .connect(topo.published())
                .await
                .map_err(|e| format!("connect to {}: {e}", topo.published()))?;
            let from_enclave = exchange(stream, &data)
                .await
                .map_err(|e| format!("client: {e}"))?;
            let to_enclave = results
                .recv()
                .await
                .ok_or("the enclave server reported nothing")?;
            Ok::<_, String>((from_enclave, to_enclave))
        };
        tokio::time::timeout(TRANSFER_LIMIT, carry)
            .await
            .unwrap_or_else(|_| Err(format!("not done within {TRANSFER_LIMIT:?}")))
    });
    let transfer = transfer.elapsed();
    let ((got_hash, got_len), (server_seed, server_hash, server_len)) =
        outcome.unwrap_or_else(|e| {
            let counters: Vec<String> = [topo.host(), topo.enclave_proxy()]
                .iter()
                .map(|d| format!("{:?}", d.counters().0))
                .collect();
            panic!(
                "the 64 MiB transfer with {IDLE} idle connections held failed: {e}
                 counters (host-proxy, enclave-proxy): {counters:?}\n{}",
                logs(&topo, &second, &holder)
            )
        });
    assert_eq!(
        (got_len, server_seed, server_len),
        (BIG, SEED, BIG),
        "(bytes from the enclave, seed, bytes the enclave received)"
    );
    assert!(
        got_hash == want_from_enclave,
        "the 64 MiB from the enclave arrived with the wrong SHA-256"
    );
    assert!(
        server_hash == want_to_enclave,
        "the 64 MiB to the enclave arrived with the wrong SHA-256"
    );
    println!(
        "64 MiB each way with {IDLE} idle connections held: {:.2} s ({:.0} Mbit/s each way)",
        transfer.as_secs_f64(),
        BIG as f64 * 8.0 / 1e6 / transfer.as_secs_f64()
    );

    // Every idle connection is still open: at both ends, and in both daemons once the
    // transfer's own connection has gone.
    live_becomes(
        &topo,
        &second,
        want,
        "live ingress gauges back to the idle ones after the transfer",
    );
    // The holder drops ended connections once a second: give it a scan.
    std::thread::sleep(Duration::from_millis(1500));
    let log = holder.log_text();
    assert_eq!(
        (idle::held(&log), idle::closed(&log)),
        (IDLE, 0),
        "(held, closed) at the enclave server after the transfer\n{}",
        logs(&topo, &second, &holder)
    );
    let open = idle.still_open();
    assert_eq!(
        open,
        IDLE,
        "client ends still open after the transfer (the others ended or were reset)\n{}",
        logs(&topo, &second, &holder)
    );
    for (name, d) in [
        ("host-proxy", topo.host()),
        ("host-proxy #2", &second),
        ("enclave-proxy", topo.enclave_proxy()),
    ] {
        let c = d.counters();
        assert_eq!(
            (c.get("capped"), c.get("failed"), c.get("reset")),
            (0, 0, 0),
            "{name}: connections capped, failed or reset"
        );
    }
    println!(
        "all {IDLE} still open after the transfer; {:.1} s in all",
        started.elapsed().as_secs_f64()
    );
    // Dropped in reverse order: the clients, the holder, the second host-proxy, then the
    // topology (the pair, the namespaces, the directory).
}
