//! End-to-end tests of the dataplane pair in network namespaces (issue: "The dataplane pair").
//!
//! Run as root. Each test builds its own client / parent / enclave / internet namespaces and
//! removes them afterwards, even when it fails.
// These tests time real processes across namespaces, so wall-clock `std::time::Instant` is right here.
#![allow(clippy::unwrap_used, missing_docs, clippy::disallowed_types)]

use std::io::{ErrorKind, Read, Write};
use std::net::SocketAddr;
use std::os::unix::net::UnixStream;
use std::time::{Duration, Instant};

use enclave_net_tests::topology::*;
use enclave_net_tests::traffic::*;
use enclave_net_tests::{bounded, internet, require_root};

/// Test 3's check, reused after garbage and restarts: the enclave reaches the internet.
async fn egress_works(topo: &Topology, port: u16) {
    let listener = topo.internet.listen(any(port));
    serve_peer_addr(listener);
    let stream = topo
        .enclave
        .connect(internet(port))
        .await
        .unwrap_or_else(|e| panic!("egress connect failed: {e}\n{}", topo.logs()));
    let said = read_all(stream).await.unwrap();
    // The internet sees the parent, as for any connection the parent makes.
    assert_eq!(said.trim(), "10.98.0.1");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn t1_ingress_keeps_the_client_ip() {
    require_root();
    let topo = Topology::start(&[], &[]);
    bounded(30, async {
        serve_peer_addr(topo.enclave.listen(any(ENCLAVE_PORT)));
        let stream = topo.client.connect(topo.published()).await.unwrap();
        let said = read_all(stream).await.unwrap();
        assert_eq!(said.trim(), CLIENT_IP.to_string(), "{}", topo.logs());
        // A client on the parent's own loopback cannot be a source on the TAP: the enclave sees
        // the gateway instead.
        let local = SocketAddr::from(([127, 0, 0, 1], PUBLISHED));
        let said = read_all(topo.parent.connect(local).await.unwrap())
            .await
            .unwrap();
        assert_eq!(said.trim(), "10.240.0.1", "{}", topo.logs());
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn t2_closed_enclave_port_is_refused_quickly() {
    require_root();
    let topo = Topology::start(&[], &[]);
    bounded(30, async {
        let started = Instant::now();
        // The reset can come so fast that it is reported by connect() itself.
        let r = match topo.client.connect(topo.published()).await {
            Ok(mut stream) => {
                let mut buf = [0u8; 16];
                tokio::io::AsyncReadExt::read(&mut stream, &mut buf).await
            }
            Err(e) => Err(e),
        };
        let took = started.elapsed();
        match r {
            Err(e) => assert_eq!(e.kind(), ErrorKind::ConnectionReset, "{e}"),
            Ok(n) => panic!("read {n} bytes from a closed enclave port instead of a reset"),
        }
        assert!(took < Duration::from_secs(1), "refusal took {took:?}");
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn t3_egress_reaches_the_internet() {
    require_root();
    let topo = Topology::start(&[], &[]);
    bounded(30, egress_works(&topo, 9000)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn t4_egress_failures_fail_at_connect() {
    require_root();
    let topo = Topology::start(&["--deny", "10.97.0.0/16"], &[]);
    bounded(30, async {
        // A closed port: ECONNREFUSED, like a direct connect.
        let e = topo.enclave.connect(internet(9)).await.unwrap_err();
        assert_eq!(e.kind(), ErrorKind::ConnectionRefused, "{e}");

        // Servers exist at the denied addresses, so only policy can stop these.
        let _denied = topo.internet.listen(SocketAddr::from((DENIED_IP, 9000)));
        let _metadata = topo.internet.listen(SocketAddr::from((METADATA_IP, 80)));
        for dst in [
            SocketAddr::from((DENIED_IP, 9000)),
            SocketAddr::from((METADATA_IP, 80)),
        ] {
            let started = Instant::now();
            let r = topo.enclave.connect(dst).await;
            let e = r.expect_err(&format!("connect to {dst} should fail"));
            assert_eq!(e.raw_os_error(), Some(libc::EHOSTUNREACH), "{dst}: {e}");
            assert!(
                started.elapsed() < Duration::from_secs(2),
                "{dst} took {:?}",
                started.elapsed()
            );
        }
        // The same destinations from the parent itself are reachable: it was the policy.
        let direct = topo
            .parent
            .connect(SocketAddr::from((METADATA_IP, 80)))
            .await;
        assert!(
            direct.is_ok(),
            "metadata server not reachable from the parent"
        );
    })
    .await;
}

const BIG: usize = 64 * 1024 * 1024;

async fn check_exchange(
    connect: impl std::future::Future<Output = std::io::Result<tokio::net::TcpStream>>,
    results: &mut tokio::sync::mpsc::UnboundedReceiver<(u64, Hash, usize)>,
    seed: u64,
    len: usize,
    reply_len: usize,
) {
    let data = client_payload(seed, len);
    let stream = connect.await.unwrap();
    let (got_hash, got_len) = exchange(stream, &data).await.unwrap();
    assert_eq!(got_len, reply_len, "reply length, seed {seed}");
    assert_eq!(
        got_hash,
        sha(&payload(reply_seed(seed), reply_len)),
        "reply bytes, seed {seed}"
    );
    let (server_seed, server_hash, server_len) = results.recv().await.unwrap();
    assert_eq!(server_seed, seed);
    assert_eq!(server_len, len);
    assert_eq!(server_hash, sha(&data), "request bytes, seed {seed}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn t5_nothing_is_lost_64mib_each_way() {
    require_root();
    let topo = Topology::start(&[], &[]);
    bounded(240, async {
        let mut ingress = serve_exchange(topo.enclave.listen(any(ENCLAVE_PORT)), BIG);
        check_exchange(
            topo.client.connect(topo.published()),
            &mut ingress,
            1,
            BIG,
            BIG,
        )
        .await;
        let mut egress = serve_exchange(topo.internet.listen(any(9000)), BIG);
        check_exchange(
            topo.enclave.connect(internet(9000)),
            &mut egress,
            2,
            BIG,
            BIG,
        )
        .await;
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn t6_half_close_works_both_ways() {
    require_root();
    let topo = Topology::start(&[], &[]);
    bounded(60, async {
        serve_after_eof(topo.enclave.listen(any(ENCLAVE_PORT)));
        serve_after_eof(topo.internet.listen(any(9000)));
        let data = payload(6, 300_000);
        let reply = send_then_read(topo.client.connect(topo.published()).await.unwrap(), &data)
            .await
            .unwrap();
        assert_eq!(reply, after_eof_reply(&data), "ingress");
        let reply = send_then_read(topo.enclave.connect(internet(9000)).await.unwrap(), &data)
            .await
            .unwrap();
        assert_eq!(reply, after_eof_reply(&data), "egress");
        // An empty request: the FIN alone must cross.
        let reply = send_then_read(topo.client.connect(topo.published()).await.unwrap(), b"")
            .await
            .unwrap();
        assert_eq!(reply, after_eof_reply(b""), "ingress, FIN only");
    })
    .await;
}

const MIB: usize = 1024 * 1024;

async fn many(
    topo: &Topology,
    ns: &enclave_net_tests::netns::Netns,
    dst: SocketAddr,
    results: tokio::sync::mpsc::UnboundedReceiver<(u64, Hash, usize)>,
    base: u64,
) {
    let mut tasks = tokio::task::JoinSet::new();
    for i in 0..200u64 {
        let socket = ns.run(tokio::net::TcpSocket::new_v4).unwrap();
        tasks.spawn(async move {
            let seed = base + i;
            let data = client_payload(seed, MIB);
            let stream = socket.connect(dst).await?;
            let (h, n) = exchange(stream, &data).await?;
            assert_eq!(n, MIB, "seed {seed}");
            assert_eq!(h, sha(&payload(reply_seed(seed), MIB)), "seed {seed}");
            Ok::<_, std::io::Error>((seed, sha(&data)))
        });
    }
    let mut sent = std::collections::HashMap::new();
    while let Some(r) = tasks.join_next().await {
        let (seed, hash) = r
            .unwrap()
            .unwrap_or_else(|e| panic!("a connection failed: {e}\n{}", topo.logs()));
        sent.insert(seed, hash);
    }
    let mut results = results;
    for _ in 0..200 {
        let (seed, hash, len) = results.recv().await.unwrap();
        assert_eq!(len, MIB);
        assert_eq!(
            sent.get(&seed),
            Some(&hash),
            "server saw other bytes for seed {seed}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn t7_two_hundred_concurrent_connections() {
    require_root();
    let topo = Topology::start(&[], &[]);
    bounded(240, async {
        let ingress = serve_exchange(topo.enclave.listen(any(ENCLAVE_PORT)), MIB);
        many(&topo, &topo.client, topo.published(), ingress, 1000).await;
        let egress = serve_exchange(topo.internet.listen(any(9000)), MIB);
        many(&topo, &topo.enclave, internet(9000), egress, 2000).await;
    })
    .await;
}

/// Sends raw bytes at a daemon's link socket and reads whatever it answers.
fn poke(path: &std::path::Path, bytes: &[u8], close_write: bool) -> Vec<u8> {
    let mut s = UnixStream::connect(path).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let _ = s.write_all(bytes);
    if close_write {
        let _ = s.shutdown(std::net::Shutdown::Write);
    }
    let mut out = Vec::new();
    let _ = s.read_to_end(&mut out);
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn t8_garbage_is_survived() {
    require_root();
    let mut topo = Topology::start(&["--handshake-timeout", "1"], &["--handshake-timeout", "1"]);
    let bad_request = common::wire::Status::BadRequest.encode().to_vec();
    let valid = common::wire::Header {
        kind: common::wire::Kind::TcpEgress,
        src: "10.240.0.2:1234".parse().unwrap(),
        dst: "10.98.0.2:9000".parse().unwrap(),
    };
    let (header, len) = valid.encode();
    let mut wrong_version = header[..len].to_vec();
    wrong_version[4] = 99;
    let garbage = payload(8, 4096);
    for path in [topo.host_link(), topo.enclave_link()] {
        // Random bytes, an unknown version and a wrong kind are answered "bad request".
        assert_eq!(
            poke(&path, &garbage, false),
            bad_request,
            "garbage at {path:?}"
        );
        assert_eq!(
            poke(&path, &wrong_version, false),
            bad_request,
            "version at {path:?}"
        );
        // A truncated header then EOF, and a silent peer, are closed.
        let answer = poke(&path, &header[..len - 3], true);
        assert!(
            answer.is_empty() || answer == bad_request,
            "truncated at {path:?}"
        );
        let started = Instant::now();
        let answer = poke(&path, &header[..5], false);
        assert!(
            answer.is_empty() || answer == bad_request,
            "slow at {path:?}"
        );
        assert!(
            started.elapsed() < Duration::from_secs(5),
            "a silent peer was held"
        );
        // Many at once.
        let threads: Vec<_> = (0..50)
            .map(|i| {
                let path = path.clone();
                std::thread::spawn(move || poke(&path, &payload(i, 100), true))
            })
            .collect();
        for t in threads {
            t.join().unwrap();
        }
    }
    // The enclave-proxy rejects an egress header sent to its ingress socket.
    let mut wrong_kind = header[..len].to_vec();
    wrong_kind[5] = 1;
    assert_eq!(poke(&topo.enclave_link(), &wrong_kind, false), bad_request);
    assert!(topo.host.as_mut().unwrap().alive(), "host-proxy died");
    assert!(
        topo.enclave_proxy.as_mut().unwrap().alive(),
        "enclave-proxy died"
    );
    bounded(30, egress_works(&topo, 9000)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn t9_host_proxy_can_restart() {
    require_root();
    let mut topo = Topology::start(&[], &[]);
    bounded(30, egress_works(&topo, 9000)).await;
    assert!(
        topo.stop_host(),
        "host-proxy did not exit cleanly on SIGTERM"
    );
    // While host-proxy is down, egress fails at connect instead of hanging.
    let e = topo.enclave.connect(internet(9000)).await.unwrap_err();
    assert_eq!(e.raw_os_error(), Some(libc::EHOSTUNREACH), "{e}");
    topo.start_host();
    bounded(30, egress_works(&topo, 9001)).await;
    bounded(30, async {
        serve_peer_addr(topo.enclave.listen(any(ENCLAVE_PORT)));
        let said = read_all(topo.client.connect(topo.published()).await.unwrap())
            .await
            .unwrap();
        assert_eq!(said.trim(), CLIENT_IP.to_string());
    })
    .await;
}
