//! UDP egress through the pair, end to end (issue: "DNS, UDP and `docker pull` inside the
//! enclave").
//!
//! Run as root. Each test builds its own namespaces; UDP echo servers run in the "internet"
//! namespace, clients in the enclave namespace. Nothing is sent outside the namespaces.
#![allow(clippy::unwrap_used, missing_docs, clippy::disallowed_types)]

use std::net::{Ipv4Addr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use enclave_net_tests::topology::*;
use enclave_net_tests::{bounded, require_root};
use tokio::net::UdpSocket;

/// A UDP socket bound to `addr` inside `ns`.
fn socket_in(ns: &enclave_net_tests::netns::Netns, addr: SocketAddr) -> UdpSocket {
    let std = ns.run(move || std::net::UdpSocket::bind(addr)).unwrap();
    std.set_nonblocking(true).unwrap();
    UdpSocket::from_std(std).unwrap()
}

/// Echoes every datagram back to its sender, until the test ends; `whoami` is answered with the
/// sender's address instead.
fn echo_server(ns: &enclave_net_tests::netns::Netns, addr: SocketAddr) {
    let socket = socket_in(ns, addr);
    tokio::spawn(async move {
        let mut buf = vec![0u8; 65536];
        while let Ok((n, from)) = socket.recv_from(&mut buf).await {
            if &buf[..n] == b"whoami" {
                let _ = socket.send_to(from.ip().to_string().as_bytes(), from).await;
            } else {
                let _ = socket.send_to(&buf[..n], from).await;
            }
        }
    });
}

/// A client socket in the enclave namespace, connected to `dst`.
async fn client(topo: &Topology, dst: SocketAddr) -> UdpSocket {
    client_in(&topo.enclave, dst).await
}

/// A client socket in `ns`, connected to `dst`.
async fn client_in(ns: &enclave_net_tests::netns::Netns, dst: SocketAddr) -> UdpSocket {
    let s = socket_in(ns, SocketAddr::from(([0, 0, 0, 0], 0)));
    s.connect(dst).await.unwrap();
    s
}

/// Datagram `i` of a run: its size cycles through small, MTU-sized, multi-frame and nearly the
/// largest, and its bytes say which datagram it is.
fn datagram(i: u32) -> Vec<u8> {
    const SIZES: [usize; 8] = [1, 200, 1400, 9000, 32_765, 65_000, 512, 3];
    let size = SIZES[i as usize % SIZES.len()];
    let tag = i.to_be_bytes();
    (0..size).map(|k| tag[k % 4] ^ (k as u8)).collect()
}

/// Sends `count` datagrams through `socket` with at most `window` unanswered, checking that
/// every echo comes back intact and in order.
async fn echo_run(socket: &UdpSocket, count: u32, window: u32) {
    let mut buf = vec![0u8; 65536];
    let mut next_reply = 0;
    for i in 0..count + window {
        if i < count {
            socket.send(&datagram(i)).await.unwrap();
        }
        if i + 1 >= window && next_reply < count {
            let n = tokio::time::timeout(Duration::from_secs(5), socket.recv(&mut buf))
                .await
                .unwrap_or_else(|_| panic!("echo {next_reply} of {count} lost"))
                .unwrap();
            assert!(
                buf[..n] == datagram(next_reply)[..],
                "echo {next_reply}: {n} bytes, not the datagram sent (out of order or damaged)"
            );
            next_reply += 1;
        }
    }
    assert_eq!(next_reply, count);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn t6_udp_egress_echo_of_every_size_arrives_intact_and_in_order() {
    require_root();
    let topo = Topology::start(&[], &[]);
    bounded(120, async {
        let dst = SocketAddr::from((INTERNET_IP, 7000));
        echo_server(&topo.internet, dst);
        let socket = client(&topo, dst).await;
        echo_run(&socket, 10_000, 4).await;
        let host = topo.host().counters();
        assert_eq!(host.get("udp.flows"), 1, "one flow for one socket");
        assert_eq!(host.get("udp.dropped"), 0);
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn t6_udp_ingress_echo_keeps_the_client_ip_and_every_datagram() {
    require_root();
    let topo = Topology::start(&["--publish-udp", "17100:7100"], &[]);
    bounded(120, async {
        echo_server(&topo.enclave, SocketAddr::from(([0, 0, 0, 0], 7100)));
        let published = SocketAddr::from((PARENT_IP, 17100));
        let socket = client_in(&topo.client, published).await;
        // The server in the enclave sees the real client's address.
        socket.send(b"whoami").await.unwrap();
        let mut buf = vec![0u8; 64];
        let n = tokio::time::timeout(Duration::from_secs(5), socket.recv(&mut buf))
            .await
            .unwrap_or_else(|_| panic!("no answer through --publish-udp\n{}", topo.logs()))
            .unwrap();
        assert_eq!(
            std::str::from_utf8(&buf[..n]).unwrap(),
            CLIENT_IP.to_string()
        );
        echo_run(&socket, 10_000, 4).await;
        // A second client is a flow of its own and gets only its own replies.
        let other = client_in(&topo.client, published).await;
        let (a, b) = tokio::join!(echo_run(&socket, 500, 1), echo_run(&other, 500, 1));
        let ((), ()) = (a, b);
        let c = topo.host().counters();
        assert_eq!((c.get("udp.flows"), c.get("udp.dropped")), (2, 0));
    })
    .await;
}

/// With a TAP MTU of 1,500 (`--mtu`), every datagram over 1,472 bytes crosses the TAP in IPv4
/// fragments: the enclave kernel cuts what it sends and enclave-proxy joins it, enclave-proxy cuts
/// what comes back and the kernel joins it. Egress and ingress, every size up to 65,000 bytes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn t6_a_small_tap_mtu_is_crossed_in_fragments_both_ways() {
    require_root();
    let topo = Topology::start(&["--publish-udp", "17200:7200"], &["--mtu", "1500"]);
    bounded(120, async {
        let dst = SocketAddr::from((INTERNET_IP, 7000));
        echo_server(&topo.internet, dst);
        let socket = client(&topo, dst).await;
        echo_run(&socket, 2_000, 4).await;
        echo_server(&topo.enclave, SocketAddr::from(([0, 0, 0, 0], 7200)));
        let socket = client_in(&topo.client, SocketAddr::from((PARENT_IP, 17200))).await;
        echo_run(&socket, 2_000, 4).await;
        let c = topo.enclave_proxy().counters();
        // Sizes 9,000, 32,765 and 65,000 are 3 of every 8 datagrams, each way.
        let large = 2 * 2_000 * 3 / 8;
        assert_eq!(
            (c.get("udp.reassembled"), c.get("udp.fragmented")),
            (large, large),
            "every large datagram crossed the TAP in fragments"
        );
        assert_eq!(c.get("udp.dropped"), 0);
        assert_eq!(topo.host().counters().get("udp.dropped"), 0);
    })
    .await;
}

/// A container behind Docker's UDP `-p`: its bridge has MTU 1,500, so every large datagram is
/// cut into IPv4 fragments and joined again by the kernels on the way, both ways.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn t6_udp_to_a_container_behind_p_fragments_and_all() {
    require_root();
    let lab = enclave_net_tests::lab::Lab::start(&["--publish-udp", "17300:7300"], &[]);
    lab.docker.import_udp_echo_image();
    let topo = &lab.topo;
    lab.docker.cli(&[
        "run",
        "-d",
        "-p",
        "7300:7200/udp",
        enclave_net_tests::docker::UDP_ECHO_IMAGE,
        "7200",
    ]);
    bounded(120, async {
        let published = SocketAddr::from((PARENT_IP, 17300));
        let socket = client_in(&topo.client, published).await;
        // The container may still be starting: ask until it answers.
        let mut buf = vec![0u8; 65536];
        let mut answered = None;
        for _ in 0..50 {
            socket.send(b"whoami").await.unwrap();
            if let Ok(r) =
                tokio::time::timeout(Duration::from_millis(200), socket.recv(&mut buf)).await
            {
                answered = Some(r.unwrap());
                break;
            }
        }
        let n = answered.unwrap_or_else(|| panic!("the container never answered\n{}", topo.logs()));
        assert_eq!(
            std::str::from_utf8(&buf[..n]).unwrap(),
            CLIENT_IP.to_string()
        );
        echo_run(&socket, 2_000, 2).await;
        // And out of the enclave: a container's datagrams to the internet, fragments and all.
        echo_server(&topo.internet, SocketAddr::from((INTERNET_IP, 7301)));
        for size in ["1", "1473", "65000"] {
            let out = lab.docker.try_cli(&[
                "run",
                "--rm",
                enclave_net_tests::docker::UDP_ECHO_IMAGE,
                "10.98.0.2:7301",
                size,
            ]);
            let said = String::from_utf8_lossy(&out.stdout);
            assert!(
                out.status.success() && said.trim() == format!("echoed {size}"),
                "a container's {size}-byte datagram out and back: {said}{}\n{}",
                String::from_utf8_lossy(&out.stderr),
                topo.logs()
            );
        }
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn t7_concurrent_flows_stay_apart() {
    require_root();
    let topo = Topology::start(&[], &[]);
    bounded(60, async {
        let dst = SocketAddr::from((INTERNET_IP, 7001));
        echo_server(&topo.internet, dst);
        let a = Arc::new(client(&topo, dst).await);
        let b = Arc::new(client(&topo, dst).await);
        // Both send at once, each its own tag; each must get back only its own.
        let run = |socket: Arc<UdpSocket>, tag: u8| async move {
            let mut buf = [0u8; 64];
            for i in 0..500u16 {
                let mut msg = vec![tag];
                msg.extend_from_slice(&i.to_be_bytes());
                socket.send(&msg).await.unwrap();
                let n = tokio::time::timeout(Duration::from_secs(5), socket.recv(&mut buf))
                    .await
                    .expect("reply")
                    .unwrap();
                assert_eq!(&buf[..n], &msg[..], "flow {tag} got another flow's reply");
            }
        };
        let (ra, rb) = tokio::join!(
            tokio::spawn(run(a.clone(), b'a')),
            tokio::spawn(run(b.clone(), b'b'))
        );
        ra.unwrap();
        rb.unwrap();
        assert_eq!(topo.host().counters().get("udp.flows"), 2);
    })
    .await;
}

/// A flood on one flow never blocks another: while one socket sends 8,000-byte datagrams as fast
/// as it can for 3 s (far more than the pair carries, so its excess is dropped), another flow's
/// echoes keep coming back. A datagram of the second flow may be lost in the enclave kernel's
/// own queues, which the flood fills too, so each echo may be retried; none may stall.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn t7_a_flood_on_one_flow_does_not_block_another() {
    require_root();
    let topo = Topology::start(&[], &[]);
    bounded(60, async {
        let sink = SocketAddr::from((INTERNET_IP, 7002));
        let sink_socket = socket_in(&topo.internet, sink);
        let sunk = Arc::new(std::sync::atomic::AtomicU64::new(0));
        let counted = sunk.clone();
        tokio::spawn(async move {
            let mut buf = vec![0u8; 65536];
            while sink_socket.recv(&mut buf).await.is_ok() {
                counted.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            }
        });
        let dst = SocketAddr::from((INTERNET_IP, 7003));
        echo_server(&topo.internet, dst);
        let flood = client(&topo, sink).await;
        let quiet = client(&topo, dst).await;
        let flooding = tokio::spawn(async move {
            let until = tokio::time::Instant::now() + Duration::from_secs(3);
            let datagram = vec![0x5au8; 8000];
            let mut sent = 0u64;
            while tokio::time::Instant::now() < until {
                // A full socket buffer (ENOBUFS) is the kernel's drop, not a failure.
                if flood.send(&datagram).await.is_ok() {
                    sent += 1;
                }
            }
            sent
        });
        tokio::time::sleep(Duration::from_millis(300)).await;
        let mut buf = [0u8; 64];
        let mut slowest = Duration::ZERO;
        for i in 0..200u16 {
            let msg = i.to_be_bytes();
            let started = tokio::time::Instant::now();
            let mut answered = false;
            for _ in 0..10 {
                quiet.send(&msg).await.unwrap();
                let wait = tokio::time::timeout(Duration::from_millis(300), async {
                    loop {
                        let n = quiet.recv(&mut buf).await.unwrap();
                        if buf[..n] == msg {
                            return;
                        }
                    }
                });
                if wait.await.is_ok() {
                    answered = true;
                    break;
                }
            }
            assert!(
                answered,
                "echo {i} got no answer in 10 tries during the flood\n{}",
                topo.logs()
            );
            slowest = slowest.max(started.elapsed());
        }
        let sent = flooding.await.unwrap();
        let received = sunk.load(std::sync::atomic::Ordering::Relaxed);
        let dropped = topo.enclave_proxy().counters().get("udp.dropped");
        eprintln!(
            "flood: {sent} sent, {received} reached the sink, {dropped} dropped by enclave-proxy; \
             slowest echo {slowest:?}"
        );
        assert_eq!(topo.host().counters().get("udp.flows"), 2);
    })
    .await;
}

/// One client address cannot take every UDP ingress flow: past `--max-per-client` its new flows
/// are dropped and counted, while another client still gets in.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn t7_udp_ingress_flows_are_capped_per_client() {
    require_root();
    let topo = Topology::start(
        &["--publish-udp", "17400:7400", "--max-per-client", "2"],
        &[],
    );
    bounded(60, async {
        echo_server(&topo.enclave, SocketAddr::from(([0, 0, 0, 0], 7400)));
        let published = SocketAddr::from((PARENT_IP, 17400));
        let mut buf = [0u8; 64];
        let mut sockets = Vec::new();
        for i in 0..3u8 {
            let s = client_in(&topo.client, published).await;
            s.send(&[i]).await.unwrap();
            let got = tokio::time::timeout(Duration::from_secs(2), s.recv(&mut buf)).await;
            assert_eq!(
                got.is_ok(),
                i < 2,
                "flow {i} of one client, at most 2 allowed"
            );
            sockets.push(s);
        }
        assert_eq!(topo.host().counters().get("capped"), 1);
        // Another client address is not held back by the first one's flows.
        topo.client
            .ip(&["addr", "add", "10.99.0.3/24", "dev", "toparent"]);
        let other = topo
            .client
            .run(|| std::net::UdpSocket::bind("10.99.0.3:0"))
            .unwrap();
        other.set_nonblocking(true).unwrap();
        let other = UdpSocket::from_std(other).unwrap();
        other.connect(published).await.unwrap();
        other.send(b"x").await.unwrap();
        tokio::time::timeout(Duration::from_secs(2), other.recv(&mut buf))
            .await
            .expect("another client gets a flow")
            .unwrap();
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn t8_idle_flows_expire_and_a_new_datagram_opens_a_fresh_one() {
    require_root();
    let topo = Topology::start(&["--udp-idle-timeout", "1"], &["--udp-idle-timeout", "1"]);
    bounded(60, async {
        let dst = SocketAddr::from((INTERNET_IP, 7002));
        echo_server(&topo.internet, dst);
        let socket = client(&topo, dst).await;
        echo_run(&socket, 10, 1).await;
        let c = topo.host().counters();
        assert_eq!((c.get("udp.flows"), c.get("live.udp")), (1, 1));
        // Idle past the timeout: the flow's state is gone on both sides.
        let mut gone = false;
        for _ in 0..40 {
            tokio::time::sleep(Duration::from_millis(100)).await;
            let (h, e) = (topo.host().counters(), topo.enclave_proxy().counters());
            if h.get("live.udp") == 0 && e.get("live.udp") == 0 {
                gone = true;
                break;
            }
        }
        assert!(gone, "the idle flow is still there\n{}", topo.logs());
        // The same socket speaks again: a fresh flow carries it.
        echo_run(&socket, 10, 1).await;
        let c = topo.host().counters();
        assert_eq!((c.get("udp.flows"), c.get("live.udp")), (2, 1));
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn t9_time_sync_is_reachable_and_the_metadata_service_is_not() {
    require_root();
    let topo = Topology::start(&[], &[]);
    let time_sync = Ipv4Addr::new(169, 254, 169, 123);
    topo.internet
        .ip(&["addr", "add", "169.254.169.123/32", "dev", "lo"]);
    bounded(60, async {
        // A stand-in for the Amazon Time Sync Service answers on UDP 123.
        echo_server(&topo.internet, SocketAddr::from((time_sync, 123)));
        let ntp = client(&topo, SocketAddr::from((time_sync, 123))).await;
        echo_run(&ntp, 5, 1).await;
        // The metadata service, answering on UDP too, is not reachable, and neither are other
        // ports of the time service's address.
        for dst in [
            SocketAddr::from((METADATA_IP, 123)),
            SocketAddr::from((METADATA_IP, 53)),
            SocketAddr::from((time_sync, 124)),
        ] {
            echo_server(&topo.internet, dst);
            let s = client(&topo, dst).await;
            s.send(b"anyone?").await.unwrap();
            let mut buf = [0u8; 16];
            let got = tokio::time::timeout(Duration::from_millis(700), s.recv(&mut buf)).await;
            assert!(got.is_err(), "UDP to {dst} was answered");
        }
        assert_eq!(topo.host().counters().get("denied"), 3);
        // TCP to the metadata service stays denied too.
        let tcp = topo
            .enclave
            .connect(SocketAddr::from((METADATA_IP, 80)))
            .await;
        assert!(tcp.is_err(), "TCP to the metadata service connected");
    })
    .await;
}
