//! The enclave's resolver, end to end (issue: "DNS, UDP and `docker pull` inside the enclave").
//!
//! Run as root. Each test builds its own namespaces, with a real DNS server (dnsmasq, Debian's
//! `dnsmasq-base`) in the "internet" namespace serving the zone `enclave.test`, and host-proxy
//! pointed at it with `--dns-upstream`. Nothing is sent outside the namespaces.
#![allow(clippy::unwrap_used, missing_docs, clippy::disallowed_types)]

use std::net::{Ipv4Addr, SocketAddr};
use std::path::Path;
use std::time::{Duration, Instant};

use enclave_net_tests::dns::query;
use enclave_net_tests::docker::{Docker, BUSYBOX_IMAGE};
use enclave_net_tests::process::Daemon;
use enclave_net_tests::topology::*;
use enclave_net_tests::traffic::*;
use enclave_net_tests::{bounded, internet, require_root};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// The enclave's resolver: the gateway.
const GATEWAY: Ipv4Addr = Ipv4Addr::new(10, 240, 0, 1);
/// A name in the test zone, and its address (the "internet" namespace itself).
const WEB: &str = "web.enclave.test";
/// A name whose TXT answer is larger than 512 bytes.
const BIG: &str = "big.enclave.test";
/// The registry's name in the test zone.
const REGISTRY: &str = "registry.enclave.test";
/// The TTL dnsmasq gives its records, which must reach the enclave unchanged.
const TTL: u32 = 4242;
/// One of the TXT strings of `BIG`.
fn big_string(i: usize) -> String {
    format!("{i}{}", "x".repeat(199))
}

/// dnsmasq in the "internet" namespace, answering for `enclave.test` only.
fn dnsmasq(topo: &Topology) -> Daemon {
    let txt = (0..4).map(big_string).collect::<Vec<_>>().join(",");
    enclave_net_tests::dns::dnsmasq(
        &topo.internet,
        INTERNET_IP,
        &topo.dir.0,
        TTL,
        &[
            format!("--host-record={WEB},{INTERNET_IP}"),
            format!("--host-record={REGISTRY},{INTERNET_IP}"),
            format!("--txt-record={BIG},{txt}"),
        ],
    )
}

/// A topology whose host-proxy asks dnsmasq, and whose enclave-proxy writes its resolv.conf to
/// `resolv`.
fn start(resolv: &Path, host_extra: &[&str]) -> Topology {
    let upstream = format!("{INTERNET_IP}:53");
    let mut host = vec!["--dns-upstream", &upstream];
    host.extend_from_slice(host_extra);
    Topology::start(&host, &["--resolv-conf", resolv.to_str().unwrap()])
}

/// The parts of an answer the tests look at.
#[derive(Debug)]
struct Answer {
    id: u16,
    truncated: bool,
    rcode: u8,
    answers: u16,
    len: usize,
    bytes: Vec<u8>,
}

fn answer(bytes: &[u8]) -> Answer {
    assert!(bytes.len() >= 12, "short answer {bytes:?}");
    assert_eq!(bytes[2] & 0x80, 0x80, "not an answer");
    Answer {
        id: u16::from_be_bytes([bytes[0], bytes[1]]),
        truncated: bytes[2] & 0x02 != 0,
        rcode: bytes[3] & 0x0f,
        answers: u16::from_be_bytes([bytes[6], bytes[7]]),
        len: bytes.len(),
        bytes: bytes.to_vec(),
    }
}

/// Sends `q` over UDP from the enclave namespace to the gateway; the answer, or `None` after
/// `wait`.
async fn ask_udp(topo: &Topology, q: &[u8], wait: Duration) -> Option<Answer> {
    exchange_udp(udp_socket(topo), q.to_vec(), wait).await
}

/// A UDP socket in the enclave namespace.
fn udp_socket(topo: &Topology) -> tokio::net::UdpSocket {
    let std = topo
        .enclave
        .run(|| std::net::UdpSocket::bind("0.0.0.0:0"))
        .unwrap();
    std.set_nonblocking(true).unwrap();
    tokio::net::UdpSocket::from_std(std).unwrap()
}

/// Sends `q` to the gateway from `socket`; the answer, or `None` after `wait`.
async fn exchange_udp(socket: tokio::net::UdpSocket, q: Vec<u8>, wait: Duration) -> Option<Answer> {
    socket.connect((GATEWAY, 53)).await.unwrap();
    socket.send(&q).await.unwrap();
    let mut buf = vec![0u8; 65536];
    let n = tokio::time::timeout(wait, socket.recv(&mut buf))
        .await
        .ok()?
        .unwrap();
    Some(answer(&buf[..n]))
}

/// Sends `q` over DNS over TCP from the enclave namespace to the gateway.
async fn ask_tcp(topo: &Topology, q: &[u8]) -> Answer {
    let mut s = topo
        .enclave
        .connect(SocketAddr::from((GATEWAY, 53)))
        .await
        .unwrap_or_else(|e| panic!("DNS over TCP: {e}\n{}", topo.logs()));
    let mut msg = (q.len() as u16).to_be_bytes().to_vec();
    msg.extend_from_slice(q);
    s.write_all(&msg).await.unwrap();
    let len = s.read_u16().await.unwrap();
    let mut buf = vec![0u8; usize::from(len)];
    s.read_exact(&mut buf).await.unwrap();
    answer(&buf)
}

/// The TTL of the first answer record of an answer to a one-question query `q`.
fn first_ttl(a: &Answer, q: &[u8]) -> u32 {
    // The question is echoed; the record's name is a 2-byte pointer, then type, class, TTL.
    let question_end = q.len() - if q[11] == 1 { 11 } else { 0 };
    let at = question_end + 2 + 4;
    u32::from_be_bytes(a.bytes[at..at + 4].try_into().unwrap())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn t1_names_resolve_and_are_usable() {
    require_root();
    let dir = TempDir::new("dns1");
    let resolv = dir.0.join("resolv.conf");
    let topo = start(&resolv, &[]);
    let _dns = dnsmasq(&topo);
    // enclave-proxy wrote a resolv.conf naming its gateway.
    let text = std::fs::read_to_string(&resolv).unwrap();
    assert!(text.contains(&format!("nameserver {GATEWAY}\n")), "{text}");
    // Installed where `ip netns exec` makes it the enclave namespace's /etc/resolv.conf.
    let etc = NetnsEtc::new(topo.enclave.name(), &text);
    bounded(30, async {
        let out = topo
            .enclave
            .command("getent")
            .args(["hosts", WEB])
            .output()
            .unwrap();
        let said = String::from_utf8_lossy(&out.stdout);
        assert!(
            out.status.success() && said.starts_with(&format!("{INTERNET_IP} ")),
            "getent hosts {WEB}: {said}{}\n{}",
            String::from_utf8_lossy(&out.stderr),
            topo.logs()
        );
        // The name is usable: a TCP connection to it crosses the pair.
        let ip: Ipv4Addr = said.split_whitespace().next().unwrap().parse().unwrap();
        serve_peer_addr(topo.internet.listen(any(9100)));
        let stream = topo
            .enclave
            .connect(SocketAddr::from((ip, 9100)))
            .await
            .unwrap();
        assert_eq!(read_all(stream).await.unwrap().trim(), "10.98.0.1");
        // The id and the TTL pass through unchanged.
        let q = query(0x5eed, WEB, 1, None);
        let a = ask_udp(&topo, &q, Duration::from_secs(5)).await.unwrap();
        assert_eq!((a.id, a.rcode, a.answers), (0x5eed, 0, 1), "{a:?}");
        assert_eq!(first_ttl(&a, &q), TTL);
    })
    .await;
    drop(etc);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn t2_dns_works_in_containers() {
    require_root();
    let dir = TempDir::new("dns2");
    let resolv = dir.0.join("resolv.conf");
    let topo = start(&resolv, &[]);
    let _dns = dnsmasq(&topo);
    // dockerd reads the resolv.conf enclave-proxy wrote, as /etc/resolv.conf in an enclave.
    let docker = Docker::start_with(&topo.enclave, Some(&resolv), &[]);
    // A container on the default bridge, with no Docker flags and no resolv.conf of its own.
    let conf = docker.cli(&["run", "--rm", BUSYBOX_IMAGE, "cat", "/etc/resolv.conf"]);
    assert!(conf.contains(&format!("nameserver {GATEWAY}")), "{conf}");
    let out = docker.try_cli(&["run", "--rm", BUSYBOX_IMAGE, "busybox", "nslookup", WEB]);
    let said = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success() && said.contains(&INTERNET_IP.to_string()),
        "nslookup {WEB} in a container: {said}{}\n{}",
        String::from_utf8_lossy(&out.stderr),
        topo.logs()
    );
}

/// Debian's docker-registry in the "internet" namespace, storing in `dir`.
fn registry(topo: &Topology, dir: &Path) -> Daemon {
    let config = dir.join("registry.yml");
    std::fs::write(
        &config,
        format!(
            "version: 0.1\nlog:\n  level: info\nstorage:\n  filesystem:\n    rootdirectory: {}\n\
             http:\n  addr: {INTERNET_IP}:5000\n",
            dir.join("registry").display()
        ),
    )
    .unwrap();
    let mut cmd = topo.internet.command("docker-registry");
    cmd.args(["serve", config.to_str().unwrap()]);
    Daemon::start_with(
        "docker-registry",
        cmd,
        dir.join("registry.log"),
        "listening on",
        Duration::from_secs(5),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn t3_docker_push_and_pull_by_name_through_the_pair() {
    require_root();
    let dir = TempDir::new("dns3");
    let resolv = dir.0.join("resolv.conf");
    let topo = start(&resolv, &[]);
    let _dns = dnsmasq(&topo);
    let _registry = registry(&topo, &dir.0);
    let registry_addr = format!("{REGISTRY}:5000");
    let docker = Docker::start_with(
        &topo.enclave,
        Some(&resolv),
        &["--insecure-registry", &registry_addr],
    );
    let image = format!("{registry_addr}/busybox:pulled");
    docker.cli(&["tag", BUSYBOX_IMAGE, &image]);
    let push = docker.try_cli(&["push", &image]);
    assert!(
        push.status.success(),
        "docker push: {}{}\n{}",
        String::from_utf8_lossy(&push.stdout),
        String::from_utf8_lossy(&push.stderr),
        topo.logs()
    );
    // Gone locally (both names), then back by name from the registry, and it runs.
    docker.cli(&["rmi", &image, BUSYBOX_IMAGE]);
    assert!(!docker
        .try_cli(&["image", "inspect", &image])
        .status
        .success());
    let pull = docker.try_cli(&["pull", &image]);
    assert!(
        pull.status.success(),
        "docker pull: {}{}\n{}",
        String::from_utf8_lossy(&pull.stdout),
        String::from_utf8_lossy(&pull.stderr),
        topo.logs()
    );
    let said = docker.cli(&[
        "run",
        "--rm",
        &image,
        "busybox",
        "echo",
        "pulled and running",
    ]);
    assert_eq!(said.trim(), "pulled and running");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn t4_large_answers_over_udp_and_tcp() {
    require_root();
    let dir = TempDir::new("dns4");
    let topo = start(&dir.0.join("resolv.conf"), &[]);
    let _dns = dnsmasq(&topo);
    bounded(30, async {
        // Classic DNS over UDP: 512 bytes, so the answer comes back truncated (TC set).
        let q = query(0x0b16, BIG, 16, None);
        let a = ask_udp(&topo, &q, Duration::from_secs(5)).await.unwrap();
        assert_eq!(a.id, 0x0b16);
        assert!(a.truncated && a.len <= 512, "{a:?}");
        // The retry over TCP gets it whole.
        let a = ask_tcp(&topo, &q).await;
        assert!(!a.truncated && a.answers == 1 && a.len > 800, "{a:?}");
        let text = String::from_utf8_lossy(&a.bytes);
        for i in 0..4 {
            assert!(text.contains(&big_string(i)), "TXT string {i} missing");
        }
        // With EDNS offering 4096 bytes, UDP carries it whole too.
        let q = query(0x0b17, BIG, 16, Some(4096));
        let a = ask_udp(&topo, &q, Duration::from_secs(5)).await.unwrap();
        assert!(!a.truncated && a.answers == 1 && a.len > 800, "{a:?}");
        // Many lookups at once, each on its own socket (its own flow and stream).
        let mut tasks = tokio::task::JoinSet::new();
        for id in 0..100u16 {
            let a = exchange_udp(
                udp_socket(&topo),
                query(id, WEB, 1, None),
                Duration::from_secs(10),
            );
            tasks.spawn(async move { (id, a.await.map(|a| (a.id, a.answers))) });
        }
        while let Some(r) = tasks.join_next().await {
            let (id, got) = r.unwrap();
            assert_eq!(got, Some((id, 1)), "lookup {id}\n{}", topo.logs());
        }
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn t5_no_upstream_gives_servfail_fast_and_the_pair_keeps_serving() {
    require_root();
    let dir = TempDir::new("dns5");
    // The only resolver swallows queries: a UDP socket that never answers.
    let hole = HOLE_PORT;
    let upstream = format!("{INTERNET_IP}:{hole}");
    let topo = Topology::start(
        &["--dns-upstream", &upstream, "--dns-timeout", "1"],
        &["--resolv-conf", dir.0.join("resolv.conf").to_str().unwrap()],
    );
    let swallow = topo
        .internet
        .run(move || std::net::UdpSocket::bind((INTERNET_IP, hole)))
        .unwrap();
    bounded(30, async {
        let started = Instant::now();
        let q = query(0x0dea, WEB, 1, None);
        let a = ask_udp(&topo, &q, Duration::from_secs(5))
            .await
            .unwrap_or_else(|| panic!("no answer at all\n{}", topo.logs()));
        let took = started.elapsed();
        assert_eq!(
            (a.id, a.rcode, a.answers),
            (0x0dea, 2, 0),
            "SERVFAIL: {a:?}"
        );
        assert!(
            took >= Duration::from_millis(900) && took < Duration::from_secs(3),
            "SERVFAIL after {took:?}, with a 1 s timeout"
        );
        assert!(
            topo.host().log_text().contains("answered SERVFAIL"),
            "{}",
            topo.logs()
        );
        // Both daemons keep serving: egress still works.
        serve_peer_addr(topo.internet.listen(any(9101)));
        let stream = topo.enclave.connect(internet(9101)).await.unwrap();
        assert_eq!(read_all(stream).await.unwrap().trim(), "10.98.0.1");
    })
    .await;
    drop(swallow);
}

/// A stub resolver asks for A and AAAA at once from one socket: the query the resolver never
/// answers must not hold up the one it answers.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn t5_a_query_left_unanswered_does_not_hold_up_the_next() {
    require_root();
    let dir = TempDir::new("dns5b");
    // A resolver that answers every query except those with id 1, echoing each back as an
    // answer.
    let upstream = format!("{INTERNET_IP}:{HOLE_PORT}");
    let topo = Topology::start(
        &["--dns-upstream", &upstream, "--dns-timeout", "3"],
        &["--resolv-conf", dir.0.join("resolv.conf").to_str().unwrap()],
    );
    let resolver = topo
        .internet
        .run(|| std::net::UdpSocket::bind((INTERNET_IP, HOLE_PORT)))
        .unwrap();
    std::thread::spawn(move || {
        let mut buf = [0u8; 512];
        while let Ok((n, from)) = resolver.recv_from(&mut buf) {
            if n >= 12 && buf[..2] != [0, 1] {
                buf[2] |= 0x80;
                let _ = resolver.send_to(&buf[..n], from);
            }
        }
    });
    bounded(30, async {
        let socket = udp_socket(&topo);
        socket.connect((GATEWAY, 53)).await.unwrap();
        let started = Instant::now();
        socket.send(&query(1, WEB, 1, None)).await.unwrap();
        socket.send(&query(2, WEB, 28, None)).await.unwrap();
        let mut buf = vec![0u8; 512];
        let n = tokio::time::timeout(Duration::from_secs(2), socket.recv(&mut buf))
            .await
            .unwrap_or_else(|_| panic!("no answer within 2 s\n{}", topo.logs()))
            .unwrap();
        assert_eq!(answer(&buf[..n]).id, 2, "the answered query comes first");
        assert!(
            started.elapsed() < Duration::from_secs(1),
            "{:?}",
            started.elapsed()
        );
        // The other is answered SERVFAIL once the 3 s are up.
        let n = tokio::time::timeout(Duration::from_secs(5), socket.recv(&mut buf))
            .await
            .unwrap_or_else(|_| panic!("no SERVFAIL\n{}", topo.logs()))
            .unwrap();
        let a = answer(&buf[..n]);
        assert_eq!((a.id, a.rcode), (1, 2));
    })
    .await;
}

/// The black-hole resolver's UDP port.
const HOLE_PORT: u16 = 5399;

/// `/etc/netns/NAME/resolv.conf`, which `ip netns exec NAME` mounts over /etc/resolv.conf;
/// removed on drop (and /etc/netns too, if this made it).
struct NetnsEtc {
    dir: std::path::PathBuf,
    made_parent: bool,
}

impl NetnsEtc {
    fn new(ns: &str, resolv: &str) -> NetnsEtc {
        let parent = Path::new("/etc/netns");
        let made_parent = !parent.exists();
        let dir = parent.join(ns);
        std::fs::create_dir_all(&dir).unwrap();
        enclave_net_tests::cleanup::register(enclave_net_tests::cleanup::Item::Dir(dir.clone()));
        std::fs::write(dir.join("resolv.conf"), resolv).unwrap();
        NetnsEtc { dir, made_parent }
    }
}

impl Drop for NetnsEtc {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
        enclave_net_tests::cleanup::forget(&enclave_net_tests::cleanup::Item::Dir(
            self.dir.clone(),
        ));
        if self.made_parent {
            let _ = std::fs::remove_dir(Path::new("/etc/netns"));
        }
    }
}
