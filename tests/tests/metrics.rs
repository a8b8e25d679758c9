//! Metrics (issue: "Running it for real on the parent", test 6): `host-proxy --metrics` serves
//! the counters with their labels, answers what is not a scrape plainly, and a real Prometheus
//! (Debian's `prometheus`) scrapes it; `enclave-proxy --metrics-port` serves its own at the
//! gateway and through a published port. Both pass `promtool check metrics`, and their counters
//! rise by what crossed.
//!
//! Run as root. The endpoint and Prometheus listen on the parent namespace's loopback; nothing is
//! sent outside the test's namespaces.
#![allow(clippy::unwrap_used, missing_docs, clippy::disallowed_types)]

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use enclave_net_tests::process::Daemon;
use enclave_net_tests::scrape::{http, promtool_check, sample};
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
        // The classic text format by default, which promtool lints clean; OpenMetrics to a
        // scraper that asks for it.
        promtool_check(&text).unwrap();
        let accept = "GET /metrics HTTP/1.1\r\nAccept: application/openmetrics-text; version=1.0.0";
        let (status, open) = http(&topo.parent, metrics, accept).await;
        assert_eq!(status, 200);
        assert!(open.ends_with("# EOF\n"), "{open}");

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

/// enclave-proxy's own metrics: published like any port and scraped from the client side, and
/// at the gateway from inside the enclave. Counters rise by exactly what crossed between two
/// scrapes; the stack's gauges show the scrape's own socket.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn enclave_proxy_metrics_at_the_gateway_and_through_a_publish() {
    use tokio::io::AsyncWriteExt;
    require_root();
    let topo = Topology::start(&["--publish", "19465:9465"], &["--metrics-port", "9465"]);
    let published = SocketAddr::from((PARENT_IP, 19465));
    let gateway: SocketAddr = "10.240.0.1:9465".parse().unwrap();
    let get = |text: &str, series: &str| {
        sample(text, &format!("enclave_net_{series}"))
            .unwrap_or_else(|| panic!("no {series} in:\n{text}"))
    };
    bounded(60, async {
        let (status, before) = http(&topo.client, published, "GET /metrics HTTP/1.1").await;
        assert_eq!(status, 200, "{before}\n{}", topo.logs());
        promtool_check(&before).unwrap();
        // 100,000 bytes in through the published port, to an enclave server that drains them.
        let len = 100_000;
        let sink = topo.enclave.listen(any(ENCLAVE_PORT));
        let drained = tokio::spawn(async move {
            let (mut s, _) = sink.accept().await.unwrap();
            drain(&mut s).await.0
        });
        let mut s = topo.client.connect(topo.published()).await.unwrap();
        s.write_all(&payload(3, len)).await.unwrap();
        s.shutdown().await.unwrap();
        assert_eq!(drained.await.unwrap(), len as u64);
        read_all(s).await.unwrap();
        // The stack's figures are read at most every 200 ms.
        tokio::time::sleep(Duration::from_millis(300)).await;
        let (_, after) = http(&topo.client, published, "GET /metrics HTTP/1.1").await;
        promtool_check(&after).unwrap();
        let rise = |series: &str| get(&after, series) - get(&before, series);
        assert_eq!(
            rise("bytes_total{direction=\"to_enclave\"}"),
            len as f64,
            "{after}"
        );
        assert_eq!(rise("connections_opened_total{direction=\"ingress\"}"), 1.0);
        assert!(
            rise("tap_frames_total{direction=\"out\"}") >= 2.0,
            "{after}"
        );
        assert!(rise("tap_frames_total{direction=\"in\"}") >= 2.0, "{after}");
        assert_eq!(get(&after, "tap_dropped_total{direction=\"out\"}"), 0.0);

        // From inside the enclave, at the gateway: this scrape is itself a socket of the stack.
        tokio::time::sleep(Duration::from_millis(300)).await;
        let (status, inside) = http(&topo.enclave, gateway, "GET /metrics HTTP/1.1").await;
        assert_eq!(status, 200, "{inside}");
        promtool_check(&inside).unwrap();
        assert!(get(&inside, "tcp_sockets") >= 1.0, "{inside}");
        assert!(
            get(&inside, "socket_buffer_capacity_bytes") > 0.0,
            "{inside}"
        );
        assert!(get(&inside, "socket_buffer_bytes{buffer=\"backlog\"}") >= 0.0);
        let (status, _) = http(&topo.enclave, gateway, "GET /nothing HTTP/1.1").await;
        assert_eq!(status, 404);
    })
    .await;
}
