//! End-to-end tests of issue 6, "A dataplane you can trust": aborts stay aborts, nothing leaks,
//! state is bounded, the host cannot confuse the enclave.
//!
//! Run as root. Each test builds its own client / parent / enclave / internet namespaces and
//! removes them afterwards, even when it fails. Counters come from the daemons' SIGUSR1 line,
//! descriptor counts from `/proc/PID/fd`.
// These tests time real processes across namespaces, so wall-clock `std::time::Instant` is right here.
#![allow(clippy::unwrap_used, missing_docs, clippy::disallowed_types)]

use std::io::{ErrorKind, Read, Write};
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::frame::{Chunk, Deframer, End, FIN};
use common::wire::{Header, Kind, Status, STATUS_LEN};
use enclave_net_tests::netns::{sh, Netns};
use enclave_net_tests::topology::*;
use enclave_net_tests::traffic::*;
use enclave_net_tests::{bounded, internet, raise_nofile, require_root};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Semaphore;
use tokio::task::JoinSet;

const MIB: usize = 1024 * 1024;
/// The enclave's gateway: the source a server sees for a client it cannot route back.
const GATEWAY: Ipv4Addr = Ipv4Addr::new(10, 240, 0, 1);
/// The parent's address toward the internet, the source of every egress connection.
const PARENT_NET_IP: Ipv4Addr = Ipv4Addr::new(10, 98, 0, 1);

/// Reads until the stream ends and checks that it ended with a reset (`ECONNRESET`) within
/// `within`, never a clean end of file. Returns the bytes read before the reset.
async fn expect_reset(
    r: &mut (impl AsyncReadExt + Unpin),
    within: Duration,
    what: &str,
    topo: &Topology,
) -> u64 {
    match tokio::time::timeout(within, drain(r)).await {
        Err(_) => panic!("{what}: no reset within {within:?}\n{}", topo.logs()),
        Ok((n, Ok(()))) => panic!(
            "{what}: a clean end of file after {n} more bytes instead of a reset\n{}",
            topo.logs()
        ),
        Ok((n, Err(e))) => {
            assert_eq!(
                e.kind(),
                ErrorKind::ConnectionReset,
                "{what}: ended with {e}, not a reset\n{}",
                topo.logs()
            );
            n
        }
    }
}

/// Reads at least `n` bytes (a download in progress).
async fn read_at_least(s: &mut TcpStream, n: usize) -> std::io::Result<()> {
    let mut buf = vec![0u8; 256 * 1024];
    let mut total = 0;
    while total < n {
        match s.read(&mut buf).await? {
            0 => return Err(ErrorKind::UnexpectedEof.into()),
            k => total += k,
        }
    }
    Ok(())
}

/// One byte there and back through an echo server, within 5 s.
async fn echo_once(s: &mut TcpStream) -> std::io::Result<()> {
    let round = async {
        s.write_all(b"e").await?;
        let mut b = [0u8; 1];
        s.read_exact(&mut b).await?;
        if b != *b"e" {
            return Err(std::io::Error::other(format!("echo gave {b:?}")));
        }
        Ok(())
    };
    tokio::time::timeout(Duration::from_secs(5), round)
        .await
        .unwrap_or_else(|_| Err(ErrorKind::TimedOut.into()))
}

/// Connects (from `ns`) and checks one echo round trip.
async fn echo_works(topo: &Topology, ns: &Netns, dst: SocketAddr, what: &str) {
    let mut s = ns
        .connect(dst)
        .await
        .unwrap_or_else(|e| panic!("{what}: connect to {dst}: {e}\n{}", topo.logs()));
    echo_once(&mut s)
        .await
        .unwrap_or_else(|e| panic!("{what}: echo through {dst}: {e}\n{}", topo.logs()));
}

/// Checks that egress to `dst` fails at connect with `EHOSTUNREACH` (denied by policy), fast.
async fn egress_denied(topo: &Topology, dst: SocketAddr) {
    let started = Instant::now();
    match topo.enclave.connect(dst).await {
        Ok(_) => panic!("egress to {dst} was allowed\n{}", topo.logs()),
        Err(e) => assert_eq!(
            e.raw_os_error(),
            Some(libc::EHOSTUNREACH),
            "egress to {dst}: {e}"
        ),
    }
    assert!(
        started.elapsed() < Duration::from_secs(2),
        "denying {dst} took {:?}",
        started.elapsed()
    );
}

/// Both daemons' live-connection counts and descriptor counts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Load {
    host_live: (u64, u64),
    enclave_live: (u64, u64),
    host_fds: usize,
    enclave_fds: usize,
}

fn load(topo: &Topology) -> Load {
    Load {
        host_live: topo.host().counters().live(),
        enclave_live: topo.enclave_proxy().counters().live(),
        host_fds: topo.host().fd_count(),
        enclave_fds: topo.enclave_proxy().fd_count(),
    }
}

/// Waits until both daemons carry no connection and their descriptor counts are steady, and
/// returns that load: the baseline later loads must return to.
async fn baseline(topo: &Topology) -> Load {
    let deadline = Instant::now() + Duration::from_secs(10);
    let mut last = load(topo);
    loop {
        tokio::time::sleep(Duration::from_millis(300)).await;
        let now = load(topo);
        if now == last && now.host_live == (0, 0) && now.enclave_live == (0, 0) {
            return now;
        }
        assert!(
            Instant::now() < deadline,
            "the daemons did not settle when idle: {now:?}\n{}",
            topo.logs()
        );
        last = now;
    }
}

/// Polls for up to `secs` until the load is back to `base`: the same live connections, and no
/// more descriptors.
async fn back_to(topo: &Topology, base: Load, secs: u64, what: &str) {
    let deadline = Instant::now() + Duration::from_secs(secs);
    loop {
        let now = load(topo);
        if now.host_live == base.host_live
            && now.enclave_live == base.enclave_live
            && now.host_fds <= base.host_fds
            && now.enclave_fds <= base.enclave_fds
        {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "{what}: {secs} s later the daemons still carry more than at the start\n  \
             baseline {base:?}\n  now      {now:?}\n{}",
            topo.logs()
        );
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}

/// A server that reads a one-byte request, sends `data`, optionally waits for a one-byte
/// confirmation that the client has it all, and then resets the connection.
fn serve_then_reset(listener: TcpListener, data: Arc<Vec<u8>>, confirm: bool) {
    tokio::spawn(async move {
        while let Ok((mut s, _)) = listener.accept().await {
            let data = data.clone();
            tokio::spawn(async move {
                let mut b = [0u8; 1];
                if s.read_exact(&mut b).await.is_err() || s.write_all(&data).await.is_err() {
                    return;
                }
                if confirm && s.read_exact(&mut b).await.is_err() {
                    return;
                }
                reset(s);
            });
        }
    });
}

/// The client of [`serve_then_reset`]: with `confirm`, reads all of `data`, confirms, and must
/// then see the reset with nothing more; without, must see at most `data` and then the reset.
async fn download_then_reset(
    topo: &Topology,
    mut s: TcpStream,
    data: &[u8],
    confirm: bool,
    what: &str,
) {
    s.write_all(b"g").await.unwrap();
    if confirm {
        let mut got = vec![0u8; data.len()];
        s.read_exact(&mut got)
            .await
            .unwrap_or_else(|e| panic!("{what}: reading the 1 MiB: {e}\n{}", topo.logs()));
        assert!(got == data, "{what}: the 1 MiB arrived changed");
        s.write_all(b"k").await.unwrap();
        let more = expect_reset(&mut s, Duration::from_secs(2), what, topo).await;
        assert_eq!(more, 0, "{what}: bytes after the 1 MiB");
    } else {
        let n = expect_reset(&mut s, Duration::from_secs(5), what, topo).await;
        assert!(
            n <= data.len() as u64,
            "{what}: {n} bytes from a 1 MiB reply"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn t01_a_reset_arrives_as_a_reset() {
    require_root();
    let topo = Topology::start(&["--publish", "18081:8081"], &[]);
    bounded(60, async {
        let data = Arc::new(payload(1, MIB));
        serve_then_reset(topo.enclave.listen(any(8080)), data.clone(), true);
        serve_then_reset(topo.enclave.listen(any(8081)), data.clone(), false);
        serve_then_reset(topo.internet.listen(any(9000)), data.clone(), true);
        serve_then_reset(topo.internet.listen(any(9001)), data.clone(), false);
        for (confirm, published, port) in [(true, PUBLISHED, 9000), (false, 18081, 9001)] {
            let dst = SocketAddr::from((PARENT_IP, published));
            let s = topo.client.connect(dst).await.unwrap();
            let what = format!("ingress, enclave server resets (confirmed: {confirm})");
            download_then_reset(&topo, s, &data, confirm, &what).await;
            let s = topo.enclave.connect(internet(port)).await.unwrap();
            let what = format!("egress, internet server resets (confirmed: {confirm})");
            download_then_reset(&topo, s, &data, confirm, &what).await;
        }
    })
    .await;
}

/// Checks, until `deadline`, that a download through `dst` from `ns` starts; panics past it.
async fn download_works_by(topo: &Topology, ns: &Netns, dst: SocketAddr, deadline: Instant) {
    loop {
        let attempt = async {
            let mut s = ns.connect(dst).await?;
            read_at_least(&mut s, 256 * 1024).await
        };
        let last = match tokio::time::timeout(Duration::from_secs(1), attempt).await {
            Ok(Ok(())) => return,
            Ok(Err(e)) => e.to_string(),
            Err(_) => "timed out".into(),
        };
        assert!(
            Instant::now() < deadline,
            "no working connection to {dst} by the deadline: {last}\n{}",
            topo.logs()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn t02_a_killed_daemon_resets_its_connections() {
    require_root();
    let mut topo = Topology::start(&[], &[]);
    bounded(60, async {
        serve_stream(topo.enclave.listen(any(ENCLAVE_PORT)));
        serve_stream(topo.internet.listen(any(9000)));

        // enclave-proxy dies during an ingress download.
        let mut s = topo.client.connect(topo.published()).await.unwrap();
        read_at_least(&mut s, 4 * MIB).await.unwrap();
        topo.kill_enclave();
        let what = "ingress download, enclave-proxy killed";
        expect_reset(&mut s, Duration::from_secs(2), what, &topo).await;
        let restarted = Instant::now();
        topo.start_enclave();
        let published = topo.published();
        download_works_by(
            &topo,
            &topo.client,
            published,
            restarted + Duration::from_secs(5),
        )
        .await;

        // host-proxy dies during an egress download.
        let mut s = topo.enclave.connect(internet(9000)).await.unwrap();
        read_at_least(&mut s, 4 * MIB).await.unwrap();
        topo.kill_host();
        let what = "egress download, host-proxy killed";
        expect_reset(&mut s, Duration::from_secs(2), what, &topo).await;
        let restarted = Instant::now();
        topo.start_host();
        download_works_by(
            &topo,
            &topo.enclave,
            internet(9000),
            restarted + Duration::from_secs(5),
        )
        .await;
    })
    .await;
}

/// How long the enclave application waits between its FIN and its RST: none, a little, enough
/// for the FIN to have crossed.
fn fin_rst_gap(i: usize) -> Duration {
    Duration::from_millis([0, 1, 10][i % 3])
}

/// The enclave application's close: FIN (shutdown of writing), then after `gap` a RST.
async fn fin_then_rst(mut s: TcpStream, gap: Duration) {
    let _ = s.shutdown().await;
    if !gap.is_zero() {
        tokio::time::sleep(gap).await;
    }
    reset(s);
}

const CHURN: usize = 1000;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn t03_fin_then_rst_leaks_nothing() {
    require_root();
    raise_nofile(65536);
    let topo = Topology::start(&[], &[]);
    bounded(120, async {
        serve_stream(topo.internet.listen(any(9000)));
        serve_echo(topo.internet.listen(any(9001)));
        echo_works(&topo, &topo.enclave, internet(9001), "warm-up egress").await;
        // Ingress: the enclave server reads a little of what the client keeps sending, then
        // closes FIN-then-RST.
        let listener = topo.enclave.listen(any(ENCLAVE_PORT));
        let warm = {
            let mut s = topo.client.connect(topo.published()).await.unwrap();
            let (mut server, _) = listener.accept().await.unwrap();
            s.write_all(b"w").await.unwrap();
            server.read_exact(&mut [0u8; 1]).await.unwrap();
            drop(server);
            s
        };
        drop(warm);
        let aborted = Arc::new(AtomicUsize::new(0));
        let counted = aborted.clone();
        tokio::spawn(async move {
            let mut i = 0;
            while let Ok((mut s, _)) = listener.accept().await {
                let gap = fin_rst_gap(i);
                i += 1;
                let counted = counted.clone();
                tokio::spawn(async move {
                    let mut buf = [0u8; 4096];
                    if matches!(s.read(&mut buf).await, Ok(n) if n > 0) {
                        fin_then_rst(s, gap).await;
                        counted.fetch_add(1, Ordering::Relaxed);
                    }
                });
            }
        });
        let base = baseline(&topo).await;
        println!("baseline: {base:?}");

        // Egress: the internet server keeps sending; the enclave application reads a little and
        // closes FIN-then-RST.
        let limit = Arc::new(Semaphore::new(100));
        let mut apps = JoinSet::new();
        for (i, socket) in topo
            .enclave
            .sockets(CHURN, None)
            .unwrap()
            .into_iter()
            .enumerate()
        {
            let permit = limit.clone().acquire_owned().await.unwrap();
            apps.spawn(async move {
                let mut s = socket.connect(internet(9000)).await?;
                let mut buf = [0u8; 4096];
                if s.read(&mut buf).await? == 0 {
                    return Err(ErrorKind::UnexpectedEof.into());
                }
                fin_then_rst(s, fin_rst_gap(i)).await;
                drop(permit);
                Ok::<_, std::io::Error>(())
            });
        }
        while let Some(r) = apps.join_next().await {
            r.unwrap()
                .unwrap_or_else(|e| panic!("an egress connection failed: {e}\n{}", topo.logs()));
        }
        back_to(&topo, base, 15, "1,000 egress FIN-then-RST").await;

        // Ingress: the client keeps sending until the connection fails; it is released once the
        // server's FIN or a reset reaches it.
        let reset_seen = Arc::new(AtomicUsize::new(0));
        for socket in topo.client.sockets(CHURN, None).unwrap() {
            let permit = limit.clone().acquire_owned().await.unwrap();
            let s = socket
                .connect(topo.published())
                .await
                .unwrap_or_else(|e| panic!("an ingress connection failed: {e}\n{}", topo.logs()));
            let (mut r, mut w) = s.into_split();
            let reset_seen = reset_seen.clone();
            tokio::spawn(async move {
                let chunk = [7u8; 16 * 1024];
                while w.write_all(&chunk).await.is_ok() {}
                reset_seen.fetch_add(1, Ordering::Relaxed);
            });
            tokio::spawn(async move {
                let _ = drain(&mut r).await;
                drop(permit);
            });
        }
        back_to(&topo, base, 15, "1,000 ingress FIN-then-RST").await;
        assert_eq!(
            aborted.load(Ordering::Relaxed),
            CHURN,
            "not every ingress connection reached the enclave server"
        );
        println!(
            "ingress clients whose writes failed (the reset reached them): {} of {CHURN}",
            reset_seen.load(Ordering::Relaxed)
        );
    })
    .await;
}

const IDLE: usize = 5000;
/// Idle clients come from this many addresses (10.99.0.10 onwards), 200 each: a realistic
/// spread that stays under host-proxy's default per-client cap (256).
const IDLE_CLIENTS: usize = 25;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn t04_five_thousand_idle_connections_are_kept() {
    require_root();
    // This process holds both ends of every connection, and host-proxy two descriptors each.
    let nofile = raise_nofile(65536);
    assert!(
        nofile >= 3 * IDLE as u64,
        "RLIMIT_NOFILE is {nofile}: too low to hold {IDLE} connections"
    );
    let topo = Topology::start(&[], &[]);
    let sources: Vec<IpAddr> = (0..IDLE_CLIENTS)
        .map(|i| IpAddr::V4(Ipv4Addr::new(10, 99, 0, 10 + i as u8)))
        .collect();
    for ip in &sources {
        topo.client
            .ip(&["addr", "add", &format!("{ip}/24"), "dev", "toparent"]);
    }
    bounded(150, async {
        serve_echo(topo.enclave.listen(any(ENCLAVE_PORT)));
        echo_works(&topo, &topo.client, topo.published(), "warm-up").await;
        let base = baseline(&topo).await;
        let (host_rss, enclave_rss) = (topo.host().rss_kib(), topo.enclave_proxy().rss_kib());

        let started = Instant::now();
        let limit = Arc::new(Semaphore::new(200));
        let mut opening = JoinSet::new();
        for ip in &sources {
            for socket in topo.client.sockets(IDLE / IDLE_CLIENTS, Some(*ip)).unwrap() {
                let limit = limit.clone();
                let dst = topo.published();
                opening.spawn(async move {
                    let _permit = limit.acquire_owned().await.unwrap();
                    let mut s = socket.connect(dst).await?;
                    echo_once(&mut s).await?;
                    Ok::<_, std::io::Error>(s)
                });
            }
        }
        let mut idle = Vec::with_capacity(IDLE);
        while let Some(r) = opening.join_next().await {
            idle.push(r.unwrap().unwrap_or_else(|e| {
                panic!(
                    "idle connection {} of {IDLE} failed: {e}\n{}",
                    idle.len(),
                    topo.logs()
                )
            }));
        }
        println!("{IDLE} connections opened in {:?}", started.elapsed());

        tokio::time::sleep(Duration::from_secs(20)).await;
        let host_per = (topo.host().rss_kib().saturating_sub(host_rss)) * 1024 / IDLE as u64;
        let enclave_per =
            (topo.enclave_proxy().rss_kib().saturating_sub(enclave_rss)) * 1024 / IDLE as u64;
        println!(
            "memory per idle connection: host-proxy {host_per} B, enclave-proxy {enclave_per} B \
             (VmRSS growth / {IDLE})"
        );
        let live = load(&topo);
        println!("while {IDLE} are idle: {live:?}");
        assert_eq!(
            (live.host_live.0, live.enclave_live.0),
            (IDLE as u64, IDLE as u64),
            "live ingress connections (host-proxy, enclave-proxy) after 20 s idle"
        );

        // None was dropped: each still carries a byte both ways.
        let mut checks = JoinSet::new();
        for (i, mut s) in idle.into_iter().enumerate() {
            let limit = limit.clone();
            checks.spawn(async move {
                let _permit = limit.acquire_owned().await.unwrap();
                echo_once(&mut s).await.map_err(|e| (i, e))?;
                Ok::<_, (usize, std::io::Error)>(s)
            });
        }
        let mut idle = Vec::with_capacity(IDLE);
        let mut dropped = Vec::new();
        while let Some(r) = checks.join_next().await {
            match r.unwrap() {
                Ok(s) => idle.push(s),
                Err(e) => dropped.push(e),
            }
        }
        assert!(
            dropped.is_empty(),
            "{} of {IDLE} idle connections no longer work after 20 s, e.g. {:?}\n{}",
            dropped.len(),
            &dropped[..dropped.len().min(3)],
            topo.logs()
        );
        echo_works(&topo, &topo.client, topo.published(), "a new connection").await;

        drop(idle);
        back_to(&topo, base, 20, "after closing the idle connections").await;
    })
    .await;
}

const PENDING: usize = 2000;

/// Makes `from` send packets for `ip` into a namespace of their own where they are dropped
/// unanswered: a veth whose far end is up but has no address, and a permanent neighbour entry
/// with a MAC no interface has, so no ARP is needed and the far end discards every frame.
fn black_hole(from: &Netns, ip: IpAddr) -> Netns {
    let hole = Netns::new("h");
    let ip = ip.to_string();
    let link = format!(
        "ip link add hole netns {} type veth peer name sink netns {}",
        from.name(),
        hole.name()
    );
    sh(&link.split_whitespace().collect::<Vec<_>>());
    hole.ip(&["link", "set", "sink", "up"]);
    from.ip(&["link", "set", "hole", "up"]);
    from.ip(&["route", "add", &ip, "dev", "hole"]);
    let neigh = format!("neigh add {ip} lladdr 02:00:5e:00:de:ad dev hole nud permanent");
    from.ip(&neigh.split_whitespace().collect::<Vec<_>>());
    hole
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn t05_a_black_hole_stalls_no_one_else() {
    require_root();
    raise_nofile(65536);
    let topo = Topology::start(&[], &[]);
    let hole = SocketAddr::from(([10, 96, 0, 5], 80));
    let _hole = black_hole(&topo.parent, hole.ip());
    bounded(60, async {
        serve_peer_addr(topo.internet.listen(any(9000)));
        let mut pending = JoinSet::new();
        for socket in topo.enclave.sockets(PENDING, None).unwrap() {
            pending.spawn(async move { socket.connect(hole).await.map(drop) });
        }
        // Let the SYNs reach both daemons.
        tokio::time::sleep(Duration::from_millis(500)).await;
        let mut took_all = Vec::new();
        for probe in 0..3 {
            let socket = topo.enclave.sockets(1, None).unwrap().remove(0);
            let started = Instant::now();
            let s = socket.connect(internet(9000)).await.unwrap_or_else(|e| {
                panic!("egress to a healthy server failed: {e}\n{}", topo.logs())
            });
            let took = started.elapsed();
            assert_eq!(read_all(s).await.unwrap().trim(), PARENT_NET_IP.to_string());
            assert!(
                took < Duration::from_millis(100),
                "probe {probe}: connecting to a healthy server took {took:?} while \
                 {PENDING} connects to a black hole were pending\n{}",
                topo.logs()
            );
            took_all.push(took);
            tokio::time::sleep(Duration::from_millis(300)).await;
        }
        println!("healthy connects while the black hole was pending: {took_all:?}");
        let mut failed_at_once = 0;
        while let Some(r) = pending.try_join_next() {
            failed_at_once += usize::from(r.unwrap().is_err());
        }
        println!(
            "connects to the black hole: {failed_at_once} failed at once (capped), {} still \
             pending",
            pending.len()
        );
        pending.abort_all();
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn t06_the_per_client_cap_turns_away_only_that_client() {
    require_root();
    let topo = Topology::start(&["--max-per-client", "5"], &[]);
    let other = IpAddr::V4(Ipv4Addr::new(10, 99, 0, 3));
    topo.client
        .ip(&["addr", "add", "10.99.0.3/24", "dev", "toparent"]);
    bounded(30, async {
        serve_echo(topo.enclave.listen(any(ENCLAVE_PORT)));
        let mut held = Vec::new();
        for _ in 0..5 {
            let mut s = topo.client.connect(topo.published()).await.unwrap();
            echo_once(&mut s)
                .await
                .unwrap_or_else(|e| panic!("a connection under the cap: {e}\n{}", topo.logs()));
            held.push(s);
        }
        let started = Instant::now();
        match topo.client.connect(topo.published()).await {
            Err(e) => assert!(
                matches!(
                    e.kind(),
                    ErrorKind::ConnectionRefused | ErrorKind::ConnectionReset
                ),
                "the sixth connection failed with {e}, not a refusal"
            ),
            Ok(mut s) => {
                let what = "the sixth connection from one client";
                expect_reset(&mut s, Duration::from_secs(1), what, &topo).await;
            }
        }
        assert!(
            started.elapsed() < Duration::from_secs(1),
            "refusing took {:?}",
            started.elapsed()
        );

        // Another client is not affected.
        let mut s = topo
            .client
            .connect_from(other, topo.published())
            .await
            .unwrap();
        echo_once(&mut s)
            .await
            .unwrap_or_else(|e| panic!("another client: {e}\n{}", topo.logs()));

        // Closing one of the five makes room again.
        held.pop();
        let deadline = Instant::now() + Duration::from_secs(3);
        loop {
            if let Ok(mut s) = topo.client.connect(topo.published()).await {
                if echo_once(&mut s).await.is_ok() {
                    break;
                }
            }
            assert!(
                Instant::now() < deadline,
                "the first client stayed capped after one of its connections closed\n{}",
                topo.logs()
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    })
    .await;
}

const SLOW: usize = 500;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn t07_slow_headers_are_closed_and_service_goes_on() {
    require_root();
    raise_nofile(65536);
    let topo = Topology::start(&["--handshake-timeout", "1"], &["--handshake-timeout", "1"]);
    bounded(60, async {
        serve_echo(topo.enclave.listen(any(ENCLAVE_PORT)));
        serve_echo(topo.internet.listen(any(9000)));
        let header = Header {
            kind: Kind::TcpEgress,
            src: "10.240.0.2:1234".parse().unwrap(),
            dst: "10.98.0.2:9000".parse().unwrap(),
        };
        let (bytes, _) = header.encode();
        let mut slow = JoinSet::new();
        for path in [topo.host_link(), topo.enclave_link()] {
            let opened = tokio::task::spawn_blocking({
                let path = path.clone();
                move || {
                    (0..SLOW)
                        .map(|_| {
                            let mut s = UnixStream::connect(&path)?;
                            s.write_all(&bytes[..3])?;
                            s.set_nonblocking(true)?;
                            Ok((tokio::net::UnixStream::from_std(s)?, Instant::now()))
                        })
                        .collect::<std::io::Result<Vec<_>>>()
                }
            })
            .await
            .unwrap()
            .unwrap_or_else(|e| panic!("connecting to {path:?}: {e}"));
            for (mut s, at) in opened {
                let path = path.clone();
                slow.spawn(async move {
                    let mut answer = Vec::new();
                    let read = s.read_to_end(&mut answer);
                    let closed = tokio::time::timeout(Duration::from_secs(5), read).await;
                    (path, closed.is_ok(), at.elapsed(), answer)
                });
            }
        }
        // Service goes on while they wait.
        echo_works(&topo, &topo.client, topo.published(), "ingress, meanwhile").await;
        echo_works(&topo, &topo.enclave, internet(9000), "egress, meanwhile").await;

        let (mut first, mut last) = (Duration::MAX, Duration::ZERO);
        while let Some(r) = slow.join_next().await {
            let (path, closed, after, answer) = r.unwrap();
            assert!(
                closed,
                "a 3-byte header at {path:?} was still open 5 s later\n{}",
                topo.logs()
            );
            let status = Status::decode(&answer);
            assert!(
                answer.is_empty() || status.is_ok_and(|s| s != Status::Ok),
                "a 3-byte header at {path:?} was answered {answer:?}"
            );
            first = first.min(after);
            last = last.max(after);
        }
        println!(
            "the {} slow streams were closed after {first:?} to {last:?}",
            2 * SLOW
        );

        echo_works(&topo, &topo.client, topo.published(), "ingress, afterwards").await;
        echo_works(&topo, &topo.enclave, internet(9000), "egress, afterwards").await;
        assert!(
            topo.host().pid().is_some() && topo.enclave_proxy().pid().is_some(),
            "a daemon is gone"
        );
    })
    .await;
}

/// What enclave-proxy did with an ingress stream made by hand.
#[derive(Debug)]
struct HandMade {
    status: Status,
    /// With an `ok` status: the server's bytes, and how its direction ended.
    reply: String,
    end: End,
}

/// Plays host-proxy: sends enclave-proxy an ingress header for `src` -> enclave `port`, reads the
/// status and, if `ok`, the server's reply to its FIN or RST. Every read is bounded to 5 s, so a
/// stream that hangs is an error.
fn ingress_by_hand(link: &Path, src: SocketAddr, port: u16) -> Result<HandMade, String> {
    let mut s = UnixStream::connect(link).map_err(|e| format!("connect: {e}"))?;
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    s.set_write_timeout(Some(Duration::from_secs(5))).unwrap();
    let header = Header {
        kind: Kind::TcpIngress,
        src,
        dst: SocketAddr::from((PARENT_IP, port)),
    };
    let (bytes, len) = header.encode();
    s.write_all(&bytes[..len])
        .map_err(|e| format!("header: {e}"))?;
    let mut status = [0u8; STATUS_LEN];
    s.read_exact(&mut status)
        .map_err(|e| format!("no status within 5 s: {e}"))?;
    let status = Status::decode(&status).map_err(|e| format!("bad status: {e}"))?;
    let mut made = HandMade {
        status,
        reply: String::new(),
        end: End::Open,
    };
    if status != Status::Ok {
        return Ok(made);
    }
    let mut deframer = Deframer::new();
    let mut reply = Vec::new();
    let mut buf = [0u8; 4096];
    while made.end == End::Open {
        let n = s
            .read(&mut buf)
            .map_err(|e| format!("no reply within 5 s after ok: {e}"))?;
        if n == 0 {
            return Err(format!(
                "the stream ended without FIN or RST after {:?}",
                String::from_utf8_lossy(&reply)
            ));
        }
        let mut at = 0;
        while at < n {
            let (used, chunk) = deframer
                .decode(&buf[at..n])
                .map_err(|e| format!("bad frame: {e}"))?;
            match chunk {
                Some(Chunk::Data(k)) => reply.extend_from_slice(&buf[at + used - k..at + used]),
                Some(Chunk::Fin) => made.end = End::Fin,
                Some(Chunk::Rst) => made.end = End::Rst,
                // The stream sends nothing, so there is no window to reopen.
                Some(Chunk::Credit(_) | Chunk::Datagram { .. }) | None => {}
            }
            at += used;
        }
    }
    let _ = s.write_all(&FIN);
    made.reply = String::from_utf8_lossy(&reply).trim().to_string();
    Ok(made)
}

async fn by_hand(topo: &Topology, src: SocketAddr, port: u16) -> Result<HandMade, String> {
    let link = topo.enclave_link();
    tokio::task::spawn_blocking(move || ingress_by_hand(&link, src, port))
        .await
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn t08_the_enclave_decides_the_ingress_source() {
    require_root();
    let topo = Topology::start(&[], &[]);
    // A bridge with a subnet of Docker's default pool, like docker0 with no container yet.
    topo.enclave
        .ip(&["link", "add", "br-test", "type", "bridge"]);
    topo.enclave
        .ip(&["addr", "add", "172.17.0.1/16", "dev", "br-test"]);
    topo.enclave.ip(&["link", "set", "br-test", "up"]);
    bounded(60, async {
        serve_peer_addr(topo.enclave.listen(any(ENCLAVE_PORT)));
        // The control: a client routed out of the TAP keeps its address.
        let client = SocketAddr::from((CLIENT_IP, 40000));
        let made = by_hand(&topo, client, ENCLAVE_PORT)
            .await
            .unwrap_or_else(|e| panic!("a routable client: {e}\n{}", topo.logs()));
        assert_eq!(made.status, Status::Ok, "a routable client");
        assert_eq!(made.reply, CLIENT_IP.to_string(), "a routable client");
        assert_eq!(made.end, End::Fin, "a routable client");

        for (i, claim) in [
            ENCLAVE_IP,
            Ipv4Addr::LOCALHOST,
            Ipv4Addr::new(172, 17, 0, 5),
        ]
        .into_iter()
        .enumerate()
        {
            let src = SocketAddr::from((claim, 40001 + i as u16));
            let started = Instant::now();
            let made = by_hand(&topo, src, ENCLAVE_PORT)
                .await
                .unwrap_or_else(|e| panic!("a header claiming {src}: {e}\n{}", topo.logs()));
            if made.status == Status::Ok {
                assert_eq!(
                    made.reply,
                    GATEWAY.to_string(),
                    "a header claiming {src}: the server saw {:?}",
                    made.reply
                );
                assert_eq!(made.end, End::Fin, "a header claiming {src}");
            }
            println!(
                "claiming {src}: {} ({:?}) in {:?}",
                made.status,
                made.reply,
                started.elapsed()
            );
        }
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn t09_expose_denies_other_ports_end_to_end() {
    require_root();
    let topo = Topology::start(&["--publish", "18081:9090"], &["--expose", "8080"]);
    bounded(30, async {
        // Servers listen on both ports, so only --expose can stop the second.
        serve_peer_addr(topo.enclave.listen(any(ENCLAVE_PORT)));
        serve_peer_addr(topo.enclave.listen(any(9090)));
        let client = SocketAddr::from((CLIENT_IP, 40000));
        let made = by_hand(&topo, client, 9090)
            .await
            .unwrap_or_else(|e| panic!("a stream for port 9090: {e}\n{}", topo.logs()));
        assert_eq!(made.status, Status::Denied, "a stream for port 9090");
        let made = by_hand(&topo, client, ENCLAVE_PORT)
            .await
            .unwrap_or_else(|e| panic!("a stream for port 8080: {e}\n{}", topo.logs()));
        assert_eq!(made.status, Status::Ok, "a stream for port 8080");
        assert_eq!(made.reply, CLIENT_IP.to_string());

        // A real client of a port published onto port 9090 is reset, promptly.
        let started = Instant::now();
        match topo
            .client
            .connect(SocketAddr::from((PARENT_IP, 18081)))
            .await
        {
            Err(e) => assert_eq!(e.kind(), ErrorKind::ConnectionReset, "{e}"),
            Ok(mut s) => {
                let what = "a client of a published port mapped to a port not exposed";
                expect_reset(&mut s, Duration::from_secs(1), what, &topo).await;
            }
        }
        assert!(
            started.elapsed() < Duration::from_secs(1),
            "the reset took {:?}",
            started.elapsed()
        );
        let said = read_all(topo.client.connect(topo.published()).await.unwrap())
            .await
            .unwrap();
        assert_eq!(said.trim(), CLIENT_IP.to_string(), "the exposed port");
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn t10_egress_policy_cannot_be_bypassed() {
    require_root();
    let allowed = Ipv4Addr::new(10, 72, 0, 9);
    {
        let topo = Topology::start(
            &["--allow", "[::ffff:10.72.0.9]:80", "--deny", "0.0.0.0/0"],
            &[],
        );
        topo.internet
            .ip(&["addr", "add", "10.72.0.9/32", "dev", "lo"]);
        bounded(30, async {
            let open = [
                SocketAddr::from((allowed, 80)),
                SocketAddr::from((allowed, 81)),
                SocketAddr::from((INTERNET_IP, 80)),
                SocketAddr::from((METADATA_IP, 80)),
            ];
            for dst in open {
                serve_peer_addr(topo.internet.listen(dst));
            }
            let s = topo
                .enclave
                .connect(open[0])
                .await
                .unwrap_or_else(|e| panic!("the allowed {}: {e}\n{}", open[0], topo.logs()));
            assert_eq!(read_all(s).await.unwrap().trim(), PARENT_NET_IP.to_string());
            for dst in &open[1..] {
                egress_denied(&topo, *dst).await;
            }
            // The servers were there: from the parent itself they answer.
            for dst in open {
                assert!(
                    topo.parent.connect(dst).await.is_ok(),
                    "{dst} from the parent"
                );
            }
        })
        .await;
    }
    // With the default policy, the parent's own addresses are closed to the enclave.
    let topo = Topology::start(&[], &[]);
    bounded(30, async {
        serve_peer_addr(topo.parent.listen(any(9000)));
        serve_peer_addr(topo.internet.listen(any(9000)));
        let s = topo.enclave.connect(internet(9000)).await.unwrap();
        assert_eq!(read_all(s).await.unwrap().trim(), PARENT_NET_IP.to_string());
        for ip in [PARENT_NET_IP, PARENT_IP] {
            let dst = SocketAddr::from((ip, 9000));
            egress_denied(&topo, dst).await;
            assert!(
                topo.parent.connect(dst).await.is_ok(),
                "{dst} from the parent"
            );
        }
    })
    .await;
}
