//! Docker, unmodified, inside the emulated enclave (issue: "Docker, unmodified, inside the
//! emulated enclave"). Each test runs a real dockerd with its default bridge networking and
//! iptables-legacy, real containers, and the proxy pair. Run as root.
// These tests time real processes across namespaces, so wall-clock `std::time::Instant` is right here.
#![allow(clippy::unwrap_used, missing_docs, clippy::disallowed_types)]

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use enclave_net_tests::docker::{BUSYBOX_IMAGE, MEMCACHED_IMAGE};
use enclave_net_tests::lab::Lab;
use enclave_net_tests::netns::Netns;
use enclave_net_tests::require_root;
use enclave_net_tests::topology::*;
use enclave_net_tests::traffic::*;

fn published(port: u16) -> SocketAddr {
    SocketAddr::from((PARENT_IP, port))
}

/// Connects to memcached through `addr` from `ns`, retrying while the container starts.
async fn memcached_at(ns: &Netns, addr: SocketAddr) -> tokio::net::TcpStream {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        if let Ok(mut s) = ns.connect(addr).await {
            if let Ok(Ok(v)) = tokio::time::timeout(
                Duration::from_secs(2),
                memcached(&mut s, "version\r\n", "\r\n"),
            )
            .await
            {
                if v.starts_with("VERSION") {
                    return s;
                }
            }
        }
        assert!(
            Instant::now() < deadline,
            "memcached at {addr} never answered"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

async fn set(s: &mut tokio::net::TcpStream, key: &str, value: &str) {
    let r = memcached(
        s,
        &format!("set {key} 0 0 {}\r\n{value}\r\n", value.len()),
        "\r\n",
    )
    .await
    .unwrap();
    assert_eq!(r, "STORED\r\n");
}

async fn get(s: &mut tokio::net::TcpStream, key: &str) -> Option<String> {
    let r = memcached(s, &format!("get {key}\r\n"), "END\r\n")
        .await
        .unwrap();
    r.strip_prefix("VALUE ")
        .and_then(|rest| rest.split("\r\n").nth(1))
        .map(str::to_string)
}

fn run_memcached(lab: &Lab, port: u16, extra: &[&str]) -> String {
    let mapping = format!("{port}:11211");
    let mut args = vec!["run", "-d", "-p", &mapping];
    args.extend_from_slice(extra);
    args.push(MEMCACHED_IMAGE);
    lab.docker.cli(&args).trim().to_string()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn d1_double_remap() {
    require_root();
    let lab = Lab::start(&[], &[]);
    run_memcached(&lab, 8080, &[]);
    let mut s = memcached_at(&lab.topo.client, published(PUBLISHED)).await;
    set(&mut s, "greeting", "hello-enclave").await;
    assert_eq!(
        get(&mut s, "greeting").await.as_deref(),
        Some("hello-enclave")
    );
    // A fresh connection sees the same server.
    let mut s2 = memcached_at(&lab.topo.client, published(PUBLISHED)).await;
    assert_eq!(
        get(&mut s2, "greeting").await.as_deref(),
        Some("hello-enclave")
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn d2_two_containers_share_an_internal_port() {
    require_root();
    let lab = Lab::start(&["--publish", "18081:8081"], &[]);
    run_memcached(&lab, 8080, &[]);
    run_memcached(&lab, 8081, &[]);
    let mut a = memcached_at(&lab.topo.client, published(18080)).await;
    let mut b = memcached_at(&lab.topo.client, published(18081)).await;
    set(&mut a, "only-in-a", "1").await;
    set(&mut b, "only-in-b", "2").await;
    assert_eq!(get(&mut a, "only-in-a").await.as_deref(), Some("1"));
    assert_eq!(get(&mut b, "only-in-b").await.as_deref(), Some("2"));
    assert_eq!(
        get(&mut b, "only-in-a").await,
        None,
        "a key set through one is absent from the other"
    );
    assert_eq!(get(&mut a, "only-in-b").await, None);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn d3_a_container_sees_the_real_client_ip() {
    require_root();
    let lab = Lab::start(&[], &[]);
    lab.docker.cli(&[
        "run",
        "-d",
        "-p",
        "8080:80",
        BUSYBOX_IMAGE,
        "httpd",
        "-f",
        "-p",
        "80",
        "-h",
        "/www",
    ]);
    let deadline = Instant::now() + Duration::from_secs(20);
    let body = loop {
        if let Ok(mut s) = lab.topo.client.connect(published(PUBLISHED)).await {
            use tokio::io::AsyncWriteExt;
            s.write_all(b"GET /cgi-bin/ip HTTP/1.0\r\n\r\n")
                .await
                .unwrap();
            if let Ok(r) = read_all(s).await {
                if r.starts_with("HTTP/1.") && r.contains(" 200 ") {
                    break r;
                }
            }
        }
        assert!(
            Instant::now() < deadline,
            "httpd never answered\n{}",
            lab.topo.logs()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    // The CGI's own output ends the response; its last line is the address httpd saw.
    let remote = body
        .lines()
        .rev()
        .find(|l| !l.trim().is_empty())
        .unwrap_or_default()
        .trim();
    // busybox httpd listens dual-stack, so it writes IPv4 peers as [::ffff:a.b.c.d].
    let remote = remote
        .trim_matches(|c| c == '[' || c == ']')
        .trim_start_matches("::ffff:");
    assert_eq!(remote, CLIENT_IP.to_string(), "full response: {body}");
}

/// A container (bridge network by default) reaches the internet namespace and gets back the
/// address the internet saw.
fn container_reaches_out(lab: &Lab, network: &[&str]) -> String {
    let mut args = vec!["run", "--rm"];
    args.extend_from_slice(network);
    args.extend([BUSYBOX_IMAGE, "sh", "-c", "nc 10.98.0.2 9000 </dev/null"]);
    lab.docker.cli(&args)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn d4_containers_reach_out() {
    require_root();
    let lab = Lab::start(&[], &[]);
    serve_peer_addr(lab.topo.internet.listen(any(9000)));
    let said = tokio::task::block_in_place(|| container_reaches_out(&lab, &[]));
    assert_eq!(said.trim(), "10.98.0.1", "{}", lab.topo.logs());
}

fn iptables_save(ns: &Netns) -> String {
    let out = ns.command("iptables-legacy-save").output().unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn rules(dump: &str) -> Vec<&str> {
    dump.lines().filter(|l| l.starts_with("-A ")).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn d5_dockers_rules_are_dockers_own() {
    require_root();
    let topo = Topology::start(&[], &[]);
    // With enclave-proxy up and no dockerd yet, the enclave has no netfilter rules at all.
    assert_eq!(rules(&iptables_save(&topo.enclave)), Vec::<&str>::new());
    let nft = topo
        .enclave
        .command("nft")
        .args(["list", "ruleset"])
        .output()
        .unwrap();
    assert_eq!(
        String::from_utf8_lossy(&nft.stdout).trim(),
        "",
        "enclave-proxy made nft rules"
    );
    let docker = enclave_net_tests::docker::Docker::start(&topo.enclave);
    let lab = Lab { docker, topo };
    lab.docker
        .cli(&["run", "-d", "-p", "8080:11211", MEMCACHED_IMAGE]);
    let dump = iptables_save(&lab.topo.enclave);
    let rules = rules(&dump);
    assert!(
        rules.iter().any(|r| r.contains("DNAT")),
        "Docker's DNAT for -p is there:\n{dump}"
    );
    for rule in &rules {
        // Docker's chains, its bridge, or its containers' addresses (hairpin MASQUERADE).
        assert!(
            rule.contains("DOCKER") || rule.contains("docker0") || rule.contains("172.17."),
            "a rule that is not Docker's: {rule}\n{dump}"
        );
    }
    // Host networking still works: the container uses the enclave's own stack and tap0.
    serve_peer_addr(lab.topo.internet.listen(any(9000)));
    let said = tokio::task::block_in_place(|| container_reaches_out(&lab, &["--network", "host"]));
    assert_eq!(said.trim(), "10.98.0.1");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn d6_restarting_dockerd_needs_nothing_from_the_pair() {
    require_root();
    let mut lab = Lab::start(&[], &[]);
    run_memcached(&lab, 8080, &["--restart", "always"]);
    let mut s = memcached_at(&lab.topo.client, published(PUBLISHED)).await;
    set(&mut s, "before", "restart").await;
    drop(s);
    tokio::task::block_in_place(|| lab.docker.restart());
    // The container comes back (empty: memcached keeps nothing), and the path works again.
    let mut s = memcached_at(&lab.topo.client, published(PUBLISHED)).await;
    set(&mut s, "after", "restart").await;
    assert_eq!(get(&mut s, "after").await.as_deref(), Some("restart"));
    assert!(lab.topo.enclave_proxy.as_mut().unwrap().alive());
}
