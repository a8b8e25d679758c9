//! `--publish-transparent` (issue: "Running it for real on the parent", tests 1 and 2): every
//! port of a range reaches the same port in the enclave through one listener and an nftables
//! table of host-proxy's own; other ports stay the parent's; other tables are never touched; a
//! table left by `kill -9` is replaced at the next start and removed at a clean exit.
//!
//! Run as root (namespaces, nftables inside the parent namespace). Nothing is sent outside the
//! namespaces.
#![allow(clippy::unwrap_used, missing_docs, clippy::disallowed_types)]

use std::net::SocketAddr;
use std::time::Duration;

use enclave_net_tests::netns::Netns;
use enclave_net_tests::process::{bin, Daemon};
use enclave_net_tests::topology::*;
use enclave_net_tests::traffic::*;
use enclave_net_tests::{bounded, require_root};
use tokio::io::AsyncWriteExt;

/// A table shaped like Docker's, installed in the parent before host-proxy starts.
const DOCKER_LIKE: &str = "table ip docker_like {
    chain prerouting {
        type nat hook prerouting priority dstnat; policy accept;
        fib daddr type local tcp dport 9999 counter dnat to 10.99.0.1:80
    }
    chain forward {
        type filter hook forward priority filter; policy accept;
        iifname \"toclient\" counter accept
    }
}
";

fn nft(ns: &Netns, args: &[&str], stdin: Option<&str>) -> String {
    let mut cmd = ns.command("nft");
    cmd.args(args);
    let out = enclave_net_tests::process::run_with_input(
        &mut cmd,
        stdin.unwrap_or_default(),
        "nft (Debian's nftables)",
    );
    assert!(
        out.status.success(),
        "nft {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// host-proxy with the transparent range (or, given `config`, the file's), in the parent
/// namespace of `topo`.
fn start_host(topo: &Topology, log: &str, config: Option<&std::path::Path>) -> Daemon {
    let mut cmd = topo.parent.command(bin("host-proxy").to_str().unwrap());
    let link = |name: &str| format!("unix:{}", topo.dir.0.join(name).display());
    cmd.args([
        "--enclave",
        &link("enclave.sock"),
        "--listen",
        &link("host.sock"),
    ]);
    match config {
        Some(path) => cmd.arg("--config").arg(path),
        None => cmd.args(["--publish-transparent", "toclient:1024-61439"]),
    };
    Daemon::start_with(
        "host-proxy",
        cmd,
        topo.dir.0.join(log),
        "ready",
        Duration::from_secs(5),
    )
}

/// Five ports spread over the range, different on each run.
fn ports() -> Vec<u16> {
    let seed = u64::from(std::process::id());
    (0..5u64)
        .map(|i| {
            let x = (seed
                .wrapping_mul(6364136223846793005)
                .wrapping_add(i * 1442695040888963407))
                >> 33;
            1024 + (x % (61439 - 1024)) as u16
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn transparent_ranges_forward_every_port_and_leave_other_tables_alone() {
    require_root();
    let mut topo = Topology::start(&[], &[]);
    topo.kill_host();
    nft(&topo.parent, &["-f", "-"], Some(DOCKER_LIKE));
    let before = nft(&topo.parent, &["list", "ruleset"], None);
    assert!(before.contains("docker_like"));

    let mut host = start_host(&topo, "host-proxy-transparent.log", None);
    let tables = nft(&topo.parent, &["list", "tables"], None);
    assert!(
        tables.contains("table ip enclave_net_host_proxy"),
        "{tables}"
    );
    let ports = ports();
    bounded(60, async {
        for &port in &ports {
            serve_peer_addr(topo.enclave.listen(any(port)));
        }
        // The parent's own service outside the range.
        let ssh = topo.parent.listen(any(22));
        tokio::spawn(async move {
            while let Ok((mut s, _)) = ssh.accept().await {
                let _ = s.write_all(b"parent\n").await;
            }
        });
        for &port in &ports {
            let s = topo
                .client
                .connect(SocketAddr::from((PARENT_IP, port)))
                .await
                .unwrap_or_else(|e| panic!("port {port}: {e}\n{}", topo.logs()));
            assert_eq!(
                read_all(s).await.unwrap().trim(),
                CLIENT_IP.to_string(),
                "port {port} reached the enclave server on the same port"
            );
        }
        let s = topo
            .client
            .connect(SocketAddr::from((PARENT_IP, 22)))
            .await
            .unwrap();
        assert_eq!(read_all(s).await.unwrap().trim(), "parent");
        // The redirect listener itself, dialled directly, leads nowhere: 61440 is no range's.
        serve_peer_addr(topo.enclave.listen(any(61440)));
        // host-proxy resets it at once, which may already fail the connect itself.
        let got = match topo
            .client
            .connect(SocketAddr::from((PARENT_IP, 61440)))
            .await
        {
            Ok(direct) => read_all(direct).await.unwrap_or_default(),
            Err(_) => String::new(),
        };
        assert!(got.is_empty(), "reached enclave port 61440: {got:?}");
    })
    .await;

    // kill -9 leaves the table; the next start (from a file) replaces it, and still serves.
    host.kill();
    let tables = nft(&topo.parent, &["list", "tables"], None);
    assert!(tables.contains("enclave_net_host_proxy"), "{tables}");
    let config = topo.dir.0.join("transparent.toml");
    let ranges = |r: &str| std::fs::write(&config, format!("publish_transparent = [\"{r}\"]\n"));
    ranges("toclient:1024-61439").unwrap();
    let host = start_host(&topo, "host-proxy-transparent-2.log", Some(&config));
    let listed = nft(&topo.parent, &["list", "ruleset"], None);
    assert_eq!(
        listed.matches("table ip enclave_net_host_proxy").count(),
        1,
        "{listed}"
    );
    assert!(listed.contains("docker_like"));
    bounded(30, async {
        let s = topo
            .client
            .connect(SocketAddr::from((PARENT_IP, ports[0])))
            .await
            .unwrap();
        assert_eq!(read_all(s).await.unwrap().trim(), CLIENT_IP.to_string());
        // SIGHUP with other ranges: the table is replaced, and ports leave and join.
        serve_peer_addr(topo.enclave.listen(any(62000)));
        ranges("toclient:62000-62100").unwrap();
        host.signal(nix::sys::signal::Signal::SIGHUP);
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        while !host.log_text().contains("SIGHUP: configuration reloaded") {
            assert!(std::time::Instant::now() < deadline, "{}", host.log_text());
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        let listed = nft(
            &topo.parent,
            &["list", "table", "ip", "enclave_net_host_proxy"],
            None,
        );
        assert!(
            listed.contains("62000-62100") && !listed.contains("1024-61439"),
            "{listed}"
        );
        let s = topo
            .client
            .connect(SocketAddr::from((PARENT_IP, 62000)))
            .await
            .unwrap();
        assert_eq!(read_all(s).await.unwrap().trim(), CLIENT_IP.to_string());
        let gone = topo
            .client
            .connect(SocketAddr::from((PARENT_IP, ports[0])))
            .await;
        assert!(gone.is_err(), "port {} left the ranges", ports[0]);
    })
    .await;

    // A clean exit removes the table; every other rule is byte for byte as before.
    drop(host);
    let after = nft(&topo.parent, &["list", "ruleset"], None);
    assert_eq!(after, before, "the ruleset changed");
}
