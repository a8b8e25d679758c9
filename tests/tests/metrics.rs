//! `host-proxy --metrics` (issue: "Running it for real on the parent"): the endpoint serves the
//! counters with their labels, answers what is not a scrape plainly, and a real Prometheus
//! (Debian's `prometheus`) scrapes it.
//!
//! Run as root. The endpoint and Prometheus listen on the parent namespace's loopback; nothing is
//! sent outside the test's namespaces.
#![allow(clippy::unwrap_used, missing_docs, clippy::disallowed_types)]

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use enclave_net_tests::process::Daemon;
use enclave_net_tests::scrape::{http, sample};
use enclave_net_tests::topology::*;
use enclave_net_tests::traffic::*;
use enclave_net_tests::{bounded, internet, require_root};

const METRICS: &str = "127.0.0.1:9464";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_count_what_crossed_and_prometheus_scrapes_them() {
    require_root();
    let topo = Topology::start(&["--metrics", METRICS], &[]);
    let metrics: SocketAddr = METRICS.parse().unwrap();
    let enclave = topo.dir.0.join("enclave.sock");
    let label = format!("enclave=\"unix:{}\"", enclave.display());
    bounded(60, async {
        // One ingress connection, one egress connection, one denied.
        serve_peer_addr(topo.enclave.listen(any(ENCLAVE_PORT)));
        let s = topo.client.connect(topo.published()).await.unwrap();
        assert_eq!(read_all(s).await.unwrap().trim(), CLIENT_IP.to_string());
        serve_peer_addr(topo.internet.listen(any(9101)));
        let s = topo.enclave.connect(internet(9101)).await.unwrap();
        assert_eq!(read_all(s).await.unwrap().trim(), "10.98.0.1");
        let denied = topo
            .enclave
            .connect(SocketAddr::from(([169, 254, 169, 254], 80)))
            .await;
        assert!(denied.is_err());

        let (status, text) = http(&topo.parent, metrics, "GET /metrics HTTP/1.1").await;
        assert_eq!(status, 200, "{text}");
        let get = |name: &str, extra: &str| {
            sample(&text, &format!("enclave_net_{name}{{{label}{extra}}}"))
                .unwrap_or_else(|| panic!("no {name}{extra} in:\n{text}"))
        };
        for (name, direction, want) in [
            ("connections_opened_total", "ingress", 1.0),
            ("connections_opened_total", "egress", 1.0),
            ("connections_denied_total", "egress", 1.0),
            ("connections_denied_total", "ingress", 0.0),
        ] {
            let got = get(name, &format!(",direction=\"{direction}\""));
            assert_eq!(got, want, "{name} {direction}");
        }
        assert!(get("bytes_total", ",direction=\"from_enclave\"") > 0.0);
        assert_eq!(get("connections_active", ",direction=\"ingress\""), 0.0);
        assert_eq!(get("egress_connect_seconds_count", ""), 2.0);
        assert!(text.ends_with("# EOF\n"));

        // What is not a scrape is answered plainly, and the endpoint keeps serving.
        let (status, _) = http(&topo.parent, metrics, "GET /other HTTP/1.1").await;
        assert_eq!(status, 404);
        let (status, _) = http(&topo.parent, metrics, "garbage").await;
        assert_eq!(status, 400);
    })
    .await;

    // A real Prometheus scrapes it.
    let dir = TempDir::new("prometheus");
    let config = dir.0.join("prometheus.yml");
    std::fs::write(
        &config,
        format!(
            "global:\n  scrape_interval: 1s\nscrape_configs:\n  - job_name: host-proxy\n    static_configs:\n      - targets: ['{METRICS}']\n"
        ),
    )
    .unwrap();
    let mut cmd = topo.parent.command("prometheus");
    cmd.arg(format!("--config.file={}", config.display()))
        .arg(format!(
            "--storage.tsdb.path={}",
            dir.0.join("data").display()
        ))
        .arg("--web.listen-address=127.0.0.1:9090");
    let _prometheus = Daemon::start_with(
        "prometheus",
        cmd,
        dir.0.join("prometheus.log"),
        "Server is ready to receive web requests",
        Duration::from_secs(5),
    );
    let api: SocketAddr = "127.0.0.1:9090".parse().unwrap();
    bounded(60, async {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let (_, body) = http(
                &topo.parent,
                api,
                "GET /api/v1/query?query=sum(enclave_net_connections_opened_total) HTTP/1.1",
            )
            .await;
            if body.contains(",\"2\"]") {
                break;
            }
            assert!(
                Instant::now() < deadline,
                "Prometheus never had the sample: {body}"
            );
            tokio::time::sleep(Duration::from_millis(500)).await;
        }
    })
    .await;
}
