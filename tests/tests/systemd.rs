//! Running under systemd (issue: "Running it for real on the parent"): the shipped unit passes
//! `systemd-analyze verify`, and both daemons tell a `NOTIFY_SOCKET` the test owns `READY=1`
//! only once they serve, and `STOPPING=1` on SIGTERM.
//!
//! Run as root (namespaces). Nothing is sent outside the namespaces.
#![allow(clippy::unwrap_used, missing_docs, clippy::disallowed_types)]

use std::os::unix::net::UnixDatagram;
use std::process::Command;
use std::time::Duration;

use enclave_net_tests::process::bin;
use enclave_net_tests::topology::*;
use enclave_net_tests::traffic::*;
use enclave_net_tests::{bounded, internet, require_root};
use nix::sys::signal::Signal;

/// `systemd/host-proxy.service` with `ExecStart` pointing at the binary under test (verify
/// checks that it is executable), verified: no error, and no warning either.
#[test]
fn the_unit_passes_systemd_analyze_verify() {
    let unit = std::fs::read_to_string(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../systemd/host-proxy.service"
    ))
    .unwrap();
    assert!(unit.contains("ExecStart=/usr/local/bin/host-proxy --config "));
    for key in [
        "Type=notify",
        "Restart=on-failure",
        "NoNewPrivileges=yes",
        "ProtectSystem=strict",
    ] {
        assert!(unit.lines().any(|l| l == key), "{key} missing");
    }
    let dir = TempDir::new("unit");
    let path = dir.0.join("host-proxy.service");
    let exe = bin("host-proxy");
    std::fs::write(
        &path,
        unit.replace("/usr/local/bin/host-proxy", exe.to_str().unwrap()),
    )
    .unwrap();
    let out = Command::new("systemd-analyze")
        .arg("verify")
        .arg(&path)
        .output()
        .expect("systemd-analyze (Debian's systemd package)");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    assert!(stderr.trim().is_empty(), "warnings: {stderr}");
}

/// A notify socket owned by the test.
struct Notify {
    socket: UnixDatagram,
    path: String,
}

impl Notify {
    fn new(dir: &TempDir, name: &str) -> Notify {
        let path = dir.0.join(name);
        let socket = UnixDatagram::bind(&path).unwrap();
        socket
            .set_read_timeout(Some(Duration::from_secs(15)))
            .unwrap();
        Notify {
            socket,
            path: path.to_str().unwrap().to_string(),
        }
    }

    /// The next message, or a panic after 15 s.
    fn next(&self) -> String {
        let mut buf = [0u8; 512];
        let n = self
            .socket
            .recv(&mut buf)
            .expect("a notification within 15 s");
        String::from_utf8_lossy(&buf[..n]).trim_end().to_string()
    }

    /// Whether a message is already waiting.
    fn pending(&self) -> bool {
        self.socket.set_nonblocking(true).unwrap();
        let mut buf = [0u8; 512];
        let waiting = self.socket.recv(&mut buf).is_ok();
        self.socket.set_nonblocking(false).unwrap();
        waiting
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn both_daemons_say_ready_once_they_serve_and_stopping_on_sigterm() {
    require_root();
    let mut topo = Topology::start(&[], &[]);
    let host_notify = Notify::new(&topo.dir, "host-notify.sock");
    let enclave_notify = Notify::new(&topo.dir, "enclave-notify.sock");
    // Without NOTIFY_SOCKET nothing is sent (the daemons above started without it).
    assert!(!host_notify.pending() && !enclave_notify.pending());

    topo.kill_enclave();
    topo.daemon_env = vec![("NOTIFY_SOCKET".into(), enclave_notify.path.clone())];
    topo.start_enclave();
    assert_eq!(enclave_notify.next(), "READY=1");
    topo.kill_host();
    topo.daemon_env = vec![("NOTIFY_SOCKET".into(), host_notify.path.clone())];
    topo.start_host();
    assert_eq!(host_notify.next(), "READY=1");
    bounded(30, async {
        // READY=1 means the published port accepts, and the whole path serves.
        serve_peer_addr(topo.enclave.listen(any(ENCLAVE_PORT)));
        let stream = topo.client.connect(topo.published()).await.unwrap();
        assert_eq!(
            read_all(stream).await.unwrap().trim(),
            CLIENT_IP.to_string()
        );
    })
    .await;
    topo.host().signal(Signal::SIGTERM);
    assert_eq!(host_notify.next(), "STOPPING=1");
    topo.enclave_proxy().signal(Signal::SIGTERM);
    assert_eq!(enclave_notify.next(), "STOPPING=1");
}

/// SIGHUP (what `systemctl reload` sends) applies a new file's publishes and egress policy:
/// an added port starts accepting, a removed one stops, a tightened policy denies, while a long
/// download over a third port runs on to the end intact. A broken file changes nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sighup_reloads_publishes_and_policy_and_live_connections_keep_going() {
    use sha2::{Digest, Sha256};
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    require_root();
    let mut topo = Topology::start(&[], &[]);
    let notify = Notify::new(&topo.dir, "reload-notify.sock");
    let config = topo.dir.0.join("host-proxy.toml");
    let (enclave_sock, host_sock) = (
        topo.dir.0.join("enclave.sock"),
        topo.dir.0.join("host.sock"),
    );
    let write = |publish: &[&str], deny: &[&str], extra: &str| {
        let list = |v: &[&str]| {
            v.iter()
                .map(|s| format!("\"{s}\""))
                .collect::<Vec<_>>()
                .join(", ")
        };
        std::fs::write(
            &config,
            format!(
                "enclave = \"unix:{}\"\nlisten = \"unix:{}\"\npublish = [{}]\ndeny = [{}]\n{extra}",
                enclave_sock.display(),
                host_sock.display(),
                list(publish),
                list(deny)
            ),
        )
        .unwrap();
    };
    write(&["19080:9080", "19081:9081"], &[], "");
    // host-proxy from the file alone, with a notify socket to see each reload finish.
    topo.kill_host();
    let mut cmd = topo.parent.command(bin("host-proxy").to_str().unwrap());
    cmd.arg("--config").arg(&config);
    cmd.env("NOTIFY_SOCKET", &notify.path);
    let host = enclave_net_tests::process::Daemon::start(
        "host-proxy",
        cmd,
        topo.dir.0.join("host-proxy-reload.log"),
    );
    assert_eq!(notify.next(), "READY=1");
    let published = |port: u16| std::net::SocketAddr::from((PARENT_IP, port));
    bounded(60, async {
        for port in [9080, 9081, 9082] {
            serve_peer_addr(topo.enclave.listen(any(port)));
        }
        serve_peer_addr(topo.internet.listen(any(9100)));
        // The long download: 64 MiB from the enclave, read slowly through the reload.
        let len = 64 * 1024 * 1024;
        let data = payload(7, len);
        let want: [u8; 32] = Sha256::digest(&data).into();
        let big = topo.enclave.listen(any(9083));
        tokio::spawn(async move {
            let (mut s, _) = big.accept().await.unwrap();
            s.write_all(&data).await.unwrap();
            s.shutdown().await.unwrap();
        });
        write(&["19080:9080", "19081:9081", "19083:9083"], &[], "");
        host.signal(Signal::SIGHUP);
        assert_eq!(notify.next(), "RELOADING=1");
        assert_eq!(notify.next(), "READY=1");
        let mut download = topo.client.connect(published(19083)).await.unwrap();
        let reader = tokio::spawn(async move {
            let mut hasher = Sha256::new();
            let mut buf = vec![0u8; 64 * 1024];
            let mut total = 0;
            loop {
                let n = download.read(&mut buf).await.unwrap();
                if n == 0 {
                    break;
                }
                hasher.update(&buf[..n]);
                total += n;
                // About 1.5 s for the whole: it outlives the next reload.
                tokio::time::sleep(Duration::from_micros(1500)).await;
            }
            (total, <[u8; 32]>::from(hasher.finalize()))
        });
        tokio::time::sleep(Duration::from_millis(200)).await;
        // Add 19082, remove 19081, deny the internet server: while the download runs.
        write(
            &["19080:9080", "19082:9082", "19083:9083"],
            &["10.98.0.2/32:9100"],
            "",
        );
        host.signal(Signal::SIGHUP);
        assert_eq!(notify.next(), "RELOADING=1");
        assert_eq!(notify.next(), "READY=1");
        let client = &topo.client;
        let reached = |port| async move {
            let s = client.connect(published(port)).await?;
            read_all(s).await
        };
        assert_eq!(reached(19082).await.unwrap().trim(), CLIENT_IP.to_string());
        assert_eq!(reached(19080).await.unwrap().trim(), CLIENT_IP.to_string());
        let gone = topo.client.connect(published(19081)).await;
        assert_eq!(
            gone.map(|_| ()).unwrap_err().kind(),
            std::io::ErrorKind::ConnectionRefused,
            "19081 was removed"
        );
        let e = topo.enclave.connect(internet(9100)).await.unwrap_err();
        assert_eq!(
            e.raw_os_error(),
            Some(libc::EHOSTUNREACH),
            "egress now denied: {e}"
        );
        // A broken file: refused, and nothing changes.
        write(&["19081:9081"], &[], "max_per_clint = 3\n");
        host.signal(Signal::SIGHUP);
        assert_eq!(notify.next(), "RELOADING=1");
        assert_eq!(notify.next(), "READY=1");
        assert!(
            host.log_text().contains("reload refused"),
            "{}",
            host.log_text()
        );
        assert!(host.log_text().contains("max_per_clint"));
        assert_eq!(reached(19082).await.unwrap().trim(), CLIENT_IP.to_string());
        assert!(topo.client.connect(published(19081)).await.is_err());
        assert!(topo.enclave.connect(internet(9100)).await.is_err());
        // The download went on through all of it.
        let (total, got) = reader.await.unwrap();
        assert_eq!(total, len, "the download was cut");
        assert!(got == want, "the download arrived changed");
    })
    .await;
}
