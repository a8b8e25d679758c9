//! `--metrics ADDR`: Prometheus exposition over HTTP, through `prometheus-client` (the
//! Prometheus project's Rust client; no text is formatted by hand here).
//!
//! Every metric carries the label `enclave` (the `--enclave` address). The connection and
//! datagram counters are read from [`Counters`] at each scrape (a [`Collector`]); the connection
//! counters, live connections and bytes have a `direction` label. The egress connect latency is
//! a histogram.
//!
//! The HTTP side is deliberately small: `GET /metrics` (or `/`) over HTTP/1.x, one request per
//! connection, a request of at most 8 KiB read within 5 s, anything else answered 404 or 400.
//! At most 16 scrapes are served at once; past that a connection is closed at once.

use std::sync::Arc;
use std::time::Duration;

use common::metrics::{Counters, Direction};
use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeMetric};
use prometheus_client::metrics::counter::ConstCounter;
use prometheus_client::metrics::gauge::ConstGauge;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::metrics::MetricType;
use prometheus_client::registry::Registry;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tracing::{debug, warn};

/// Metrics observed as they happen (the rest are read from [`Counters`] at each scrape).
#[derive(Debug, Clone)]
pub struct Observed {
    /// Seconds from an egress stream's request to the destination's answer (connected or
    /// failed).
    pub egress_connect: Histogram,
}

impl Default for Observed {
    fn default() -> Observed {
        Observed {
            // 100 µs to about 13 s.
            egress_connect: Histogram::new(exponential_buckets(0.0001, 2.0, 18)),
        }
    }
}

/// Reads [`Counters`] at each scrape.
#[derive(Debug)]
struct CountersCollector<T>(Arc<T>);

impl<T: AsRef<Counters> + std::fmt::Debug + Send + Sync + 'static> Collector
    for CountersCollector<T>
{
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        use std::sync::atomic::Ordering::Relaxed;
        let c = (*self.0).as_ref();
        let by_direction = [
            ("connections_opened", "Connections set up", &c.opened),
            (
                "connections_refused",
                "Connections the destination refused",
                &c.refused,
            ),
            (
                "connections_denied",
                "Connections the policy denied",
                &c.denied,
            ),
            (
                "connections_failed",
                "Connections that failed otherwise",
                &c.failed,
            ),
            (
                "connections_capped",
                "Connections and UDP flows turned away by a cap",
                &c.capped,
            ),
            (
                "connections_reset",
                "Connections that ended in a reset or an error",
                &c.reset,
            ),
            (
                "connections_idle_closed",
                "Connections and flows closed for idleness",
                &c.idle_closed,
            ),
        ];
        for (name, help, value) in by_direction {
            let mut family = encoder.encode_descriptor(name, help, None, MetricType::Counter)?;
            for direction in [Direction::Ingress, Direction::Egress] {
                ConstCounter::new(value.at(direction).load(Relaxed))
                    .encode(family.encode_family(&[("direction", direction.label())])?)?;
            }
        }
        let counters = [
            (
                "dns_queries",
                "DNS queries from the enclave forwarded to a resolver",
                &c.dns_queries,
            ),
            (
                "dns_servfail",
                "DNS queries answered SERVFAIL",
                &c.dns_servfail,
            ),
            ("dns_dropped", "DNS datagrams dropped", &c.dns_dropped),
            ("udp_flows", "UDP flows opened", &c.udp_flows),
            ("udp_dropped", "UDP datagrams dropped", &c.udp_dropped),
        ];
        for (name, help, value) in counters {
            let metric = ConstCounter::new(value.load(Relaxed));
            metric.encode(encoder.encode_descriptor(name, help, None, MetricType::Counter)?)?;
        }
        let mut bytes = encoder.encode_descriptor(
            "bytes",
            "Payload bytes carried, to the enclave and from it",
            None,
            MetricType::Counter,
        )?;
        for (direction, value) in [
            ("to_enclave", &c.bytes_to_enclave),
            ("from_enclave", &c.bytes_from_enclave),
        ] {
            ConstCounter::new(value.load(Relaxed))
                .encode(bytes.encode_family(&[("direction", direction)])?)?;
        }
        let mut active = encoder.encode_descriptor(
            "connections_active",
            "Connections alive now",
            None,
            MetricType::Gauge,
        )?;
        for (direction, value) in [("ingress", &c.live_ingress), ("egress", &c.live_egress)] {
            ConstGauge::new(value.load(Relaxed) as i64)
                .encode(active.encode_family(&[("direction", direction)])?)?;
        }
        ConstGauge::new(c.live_udp.load(Relaxed) as i64).encode(encoder.encode_descriptor(
            "udp_flows_active",
            "UDP flows alive now",
            None,
            MetricType::Gauge,
        )?)?;
        Ok(())
    }
}

/// The registry of one host-proxy: every metric, labelled with `enclave`.
pub fn registry<T>(shared: Arc<T>, observed: &Observed, enclave: &str) -> Registry
where
    T: AsRef<Counters> + std::fmt::Debug + Send + Sync + 'static,
{
    let mut registry = Registry::with_prefix_and_labels(
        "enclave_net",
        [("enclave".into(), enclave.to_string().into())].into_iter(),
    );
    registry.register(
        "egress_connect_seconds",
        "Time from an egress request to the destination's answer",
        observed.egress_connect.clone(),
    );
    registry.register_collector(Box::new(CountersCollector(shared)));
    registry
}

/// The exposition of `registry`, in the OpenMetrics text format.
pub fn render(registry: &Registry) -> String {
    let mut out = String::new();
    // Writing to a String cannot fail.
    let _ = prometheus_client::encoding::text::encode(&mut out, registry);
    out
}

/// Scrapes served at once.
const MAX_SCRAPES: usize = 16;
/// The longest request read.
const MAX_REQUEST: usize = 8 * 1024;
/// How long a scraper may take to send its request.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(5);

/// Serves `registry` on `listener` until cancelled.
pub async fn serve(listener: TcpListener, registry: Arc<Registry>) {
    let scrapes = Arc::new(tokio::sync::Semaphore::new(MAX_SCRAPES));
    loop {
        let (stream, peer) = match listener.accept().await {
            Ok(s) => s,
            Err(e) => {
                warn!("metrics listener: {e}");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        let Ok(permit) = scrapes.clone().try_acquire_owned() else {
            debug!(%peer, "metrics: {MAX_SCRAPES} scrapes already in progress; closed");
            continue;
        };
        let registry = registry.clone();
        tokio::spawn(async move {
            if let Err(e) = answer(stream, &registry).await {
                debug!(%peer, "metrics scrape: {e}");
            }
            drop(permit);
        });
    }
}

/// Reads one request and answers it.
async fn answer(mut stream: TcpStream, registry: &Registry) -> std::io::Result<()> {
    let mut request = Vec::new();
    let mut buf = [0u8; 1024];
    let read = tokio::time::timeout(REQUEST_TIMEOUT, async {
        while !request.windows(4).any(|w| w == b"\r\n\r\n") && request.len() < MAX_REQUEST {
            let n = stream.read(&mut buf).await?;
            if n == 0 {
                break;
            }
            request.extend_from_slice(&buf[..n]);
        }
        Ok::<_, std::io::Error>(())
    })
    .await;
    if read.is_err() {
        return Ok(());
    }
    read.unwrap_or(Ok(()))?;
    let line = request.split(|&b| b == b'\r').next().unwrap_or_default();
    let line = String::from_utf8_lossy(line);
    let mut parts = line.split(' ');
    let (status, content_type, body) = match (parts.next(), parts.next(), parts.next()) {
        (Some("GET"), Some("/metrics" | "/"), Some(v)) if v.starts_with("HTTP/1.") => (
            "200 OK",
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
            render(registry),
        ),
        (Some(_), Some(_), Some(v)) if v.starts_with("HTTP/1.") => {
            ("404 Not Found", "text/plain", "GET /metrics\n".to_string())
        }
        _ => ("400 Bad Request", "text/plain", "bad request\n".to_string()),
    };
    let head = format!(
        "HTTP/1.1 {status}\r\nContent-Type: {content_type}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
        body.len()
    );
    // A scraper that stops reading gives its slot back after the same bound.
    tokio::time::timeout(REQUEST_TIMEOUT, async {
        stream.write_all(head.as_bytes()).await?;
        stream.write_all(body.as_bytes()).await?;
        stream.shutdown().await
    })
    .await
    .unwrap_or(Ok(()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug, Default)]
    struct Fake(Counters);

    impl AsRef<Counters> for Fake {
        fn as_ref(&self) -> &Counters {
            &self.0
        }
    }

    #[test]
    fn counters_and_the_histogram_are_exposed_with_their_labels() {
        let shared = Arc::new(Fake::default());
        Counters::bump(shared.0.opened.at(Direction::Egress));
        shared
            .0
            .bytes_from_enclave
            .fetch_add(1234, std::sync::atomic::Ordering::Relaxed);
        let observed = Observed::default();
        observed.egress_connect.observe(0.003);
        let text = render(&registry(shared, &observed, "vsock:16:5000"));
        for want in [
            "enclave_net_connections_opened_total{enclave=\"vsock:16:5000\",direction=\"egress\"} 1",
            "enclave_net_connections_opened_total{enclave=\"vsock:16:5000\",direction=\"ingress\"} 0",
            "enclave_net_bytes_total{enclave=\"vsock:16:5000\",direction=\"from_enclave\"} 1234",
            "enclave_net_connections_active{enclave=\"vsock:16:5000\",direction=\"ingress\"} 0",
            "enclave_net_egress_connect_seconds_count{enclave=\"vsock:16:5000\"} 1",
            "# EOF",
        ] {
            assert!(text.contains(want), "{want} missing from:\n{text}");
        }
    }
}
