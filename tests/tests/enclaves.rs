//! One host-proxy, two enclaves (issue: "Running it for real on the parent", test 4): each
//! enclave gets only its own published ports, and each one's egress obeys its own policy,
//! attributed by the Unix socket it arrives on (the stand-in for the vsock peer's CID).
//!
//! Run as root. Everything stays inside the test's namespaces.
#![allow(clippy::unwrap_used, missing_docs, clippy::disallowed_types)]

use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use enclave_net_tests::netns::Netns;
use enclave_net_tests::process::{bin, Daemon};
use enclave_net_tests::scrape::{http, sample};
use enclave_net_tests::topology::*;
use enclave_net_tests::traffic::*;
use enclave_net_tests::{bounded, internet, require_root};
use tokio::io::AsyncWriteExt;

const METRICS: &str = "127.0.0.1:9464";

/// Answers every connection with `tag`; counts them.
fn serve_tag(listener: tokio::net::TcpListener, tag: &'static str) -> Arc<AtomicUsize> {
    let seen = Arc::new(AtomicUsize::new(0));
    let count = seen.clone();
    tokio::spawn(async move {
        while let Ok((mut s, _)) = listener.accept().await {
            count.fetch_add(1, Ordering::Relaxed);
            let _ = s.write_all(tag.as_bytes()).await;
            let _ = s.shutdown().await;
        }
    });
    seen
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_enclaves_stay_apart() {
    require_root();
    // Enclave "a" is the topology's own; enclave "b" a second namespace with its own
    // enclave-proxy and sockets.
    let mut topo = Topology::start(&[], &[]);
    topo.kill_host();
    let b = Netns::new("e2");
    let sock = |name: &str| topo.dir.0.join(name);
    let mut cmd = b.command(bin("enclave-proxy").to_str().unwrap());
    cmd.arg("--host")
        .arg(format!("unix:{}", sock("host-b.sock").display()))
        .arg("--listen")
        .arg(format!("unix:{}", sock("enclave-b.sock").display()));
    let enclave_b = Daemon::start("enclave-proxy", cmd, sock("enclave-proxy-b.log"));
    let config = sock("two.toml");
    let write = |a: &str, b: &str| {
        std::fs::write(
            &config,
            format!(
                "metrics = \"{METRICS}\"\n\n\
                 [[enclaves]]\nname = \"a\"\nenclave = \"unix:{}\"\nlisten = \"unix:{}\"\n\
                 publish = [{a}]\ndeny = [\"10.98.0.2/32:9100\"]\n\n\
                 [[enclaves]]\nname = \"b\"\nenclave = \"unix:{}\"\nlisten = \"unix:{}\"\n\
                 publish = [{b}]\n",
                sock("enclave.sock").display(),
                sock("host.sock").display(),
                sock("enclave-b.sock").display(),
                sock("host-b.sock").display(),
            ),
        )
        .unwrap();
    };
    write("\"18080:8080\"", "\"18081:8080\"");
    let mut cmd = topo.parent.command(bin("host-proxy").to_str().unwrap());
    cmd.arg("--config").arg(&config);
    let host = Daemon::start("host-proxy", cmd, sock("host-proxy-two.log"));
    let logs = || format!("{}{}{}", host.log_text(), topo.logs(), enclave_b.log_text());
    bounded(60, async {
        // The same port in both enclaves, each server saying which it is.
        let seen_a = serve_tag(topo.enclave.listen(any(ENCLAVE_PORT)), "a");
        let seen_b = serve_tag(b.listen(any(ENCLAVE_PORT)), "b");
        let published = |port: u16| SocketAddr::from((PARENT_IP, port));
        for _ in 0..3 {
            for (port, want) in [(18080, "a"), (18081, "b")] {
                let s = topo.client.connect(published(port)).await.unwrap();
                assert_eq!(read_all(s).await.unwrap(), want, "port {port}\n{}", logs());
            }
        }
        assert_eq!(
            seen_a.load(Ordering::Relaxed),
            3,
            "a saw only its own clients"
        );
        assert_eq!(
            seen_b.load(Ordering::Relaxed),
            3,
            "b saw only its own clients"
        );

        // The internet server on 9100: a's policy denies it, b's allows it.
        serve_peer_addr(topo.internet.listen(any(9100)));
        let denied = topo.enclave.connect(internet(9100)).await.unwrap_err();
        assert_eq!(
            denied.raw_os_error(),
            Some(libc::EHOSTUNREACH),
            "a: {denied}"
        );
        let s = b.connect(internet(9100)).await.unwrap();
        assert_eq!(
            read_all(s).await.unwrap().trim(),
            "10.98.0.1",
            "b reaches it"
        );

        // Each stream was counted against its own enclave.
        let (status, text) = http(
            &topo.parent,
            METRICS.parse().unwrap(),
            "GET /metrics HTTP/1.1",
        )
        .await;
        assert_eq!(status, 200);
        let get = |enclave: &str, name: &str, direction: &str| {
            let series =
                format!("enclave_net_{name}{{enclave=\"{enclave}\",direction=\"{direction}\"}}");
            sample(&text, &series).unwrap_or_else(|| panic!("no {series} in:\n{text}"))
        };
        assert_eq!(get("a", "connections_opened_total", "ingress"), 3.0);
        assert_eq!(get("b", "connections_opened_total", "ingress"), 3.0);
        assert_eq!(get("a", "connections_denied_total", "egress"), 1.0);
        assert_eq!(get("b", "connections_denied_total", "egress"), 0.0);
        assert_eq!(get("b", "connections_opened_total", "egress"), 1.0);
        assert_eq!(get("a", "connections_opened_total", "egress"), 0.0);

        // A reload moves 18081 from b to a: b lets go of it before a binds it.
        write("\"18080:8080\", \"18081:8080\"", "\"18082:8080\"");
        host.signal(nix::sys::signal::Signal::SIGHUP);
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
        while host
            .log_text()
            .matches("SIGHUP: configuration reloaded")
            .count()
            < 2
        {
            assert!(std::time::Instant::now() < deadline, "{}", logs());
            tokio::time::sleep(std::time::Duration::from_millis(50)).await;
        }
        for (port, want) in [(18080, "a"), (18081, "a"), (18082, "b")] {
            let s = topo.client.connect(published(port)).await.unwrap();
            assert_eq!(read_all(s).await.unwrap(), want, "port {port}\n{}", logs());
        }
        assert!(!host.log_text().contains("cannot listen"), "{}", logs());
    })
    .await;
    drop(host);
    drop(enclave_b);
}
