//! Prometheus exposition for both daemons, through `prometheus-client` (the Prometheus
//! project's Rust client; no text is formatted by hand here): the [`Counters`] as metric
//! families, and a deliberately small HTTP responder.
//!
//! The responder answers `GET /metrics` (or `/`) over HTTP/1.x, one request per connection, a
//! request of at most 8 KiB read within 5 s, anything else 404 or 400. host-proxy serves it on a
//! TCP listener ([`serve`]); enclave-proxy on streams of its own ([`answer`]).

use std::future::Future;
use std::sync::atomic::Ordering::Relaxed;
use std::sync::Arc;
use std::time::Duration;

use prometheus_client::encoding::{DescriptorEncoder, EncodeMetric};
use prometheus_client::metrics::counter::ConstCounter;
use prometheus_client::metrics::gauge::ConstGauge;
use prometheus_client::metrics::MetricType;
use prometheus_client::registry::Registry;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpListener;
use tracing::{debug, warn};

use crate::metrics::{Counters, Direction};

/// Labels that tell one set of counters from another (host-proxy's `enclave`), as pairs. Their
/// values go out as they are (`prometheus-client` escapes nothing): make them with
/// [`label_value`].
pub type Labels = Vec<(&'static str, String)>;

/// `s` as a label value of the text formats: backslash, double quote and line feed escaped, so
/// no value (a `unix:` path, say) can break the exposition.
pub fn label_value(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        match c {
            '\\' => out.push_str("\\\\"),
            '"' => out.push_str("\\\""),
            '\n' => out.push_str("\\n"),
            c => out.push(c),
        }
    }
    out
}

/// `labels` and one more.
fn with(labels: &Labels, key: &'static str, value: &str) -> Labels {
    let mut out = labels.clone();
    out.push((key, value.to_string()));
    out
}

/// Encodes every counter of each of `each`, told apart by its labels; the connection counters,
/// live connections and bytes also by `direction`. Each family appears once, with a sample per
/// set of counters.
pub fn encode_counters(
    encoder: &mut DescriptorEncoder,
    each: &[(Labels, &Counters)],
) -> Result<(), std::fmt::Error> {
    type Pick = fn(&Counters) -> &crate::metrics::PerDirection;
    let by_direction: [(&str, &str, Pick); 7] = [
        ("connections_opened", "Connections set up", |c| &c.opened),
        (
            "connections_refused",
            "Connections the destination refused",
            |c| &c.refused,
        ),
        ("connections_denied", "Connections the policy denied", |c| {
            &c.denied
        }),
        (
            "connections_failed",
            "Connections that failed otherwise",
            |c| &c.failed,
        ),
        (
            "connections_capped",
            "Connections and UDP flows turned away by a cap",
            |c| &c.capped,
        ),
        (
            "connections_reset",
            "Connections that ended in a reset or an error",
            |c| &c.reset,
        ),
        (
            "connections_idle_closed",
            "Connections and flows closed for idleness",
            |c| &c.idle_closed,
        ),
    ];
    for (name, help, pick) in by_direction {
        let mut family = encoder.encode_descriptor(name, help, None, MetricType::Counter)?;
        for (labels, c) in each {
            for direction in [Direction::Ingress, Direction::Egress] {
                let labels = with(labels, "direction", direction.label());
                ConstCounter::new(pick(c).at(direction).load(Relaxed))
                    .encode(family.encode_family(&labels)?)?;
            }
        }
    }
    type One = fn(&Counters) -> &std::sync::atomic::AtomicU64;
    let counters: [(&str, &str, One); 7] = [
        (
            "dns_queries",
            "DNS queries from the enclave forwarded to a resolver",
            |c| &c.dns_queries,
        ),
        ("dns_servfail", "DNS queries answered SERVFAIL", |c| {
            &c.dns_servfail
        }),
        ("dns_dropped", "DNS datagrams dropped", |c| &c.dns_dropped),
        ("udp_flows", "UDP flows opened", |c| &c.udp_flows),
        ("udp_dropped", "UDP datagrams dropped", |c| &c.udp_dropped),
        (
            "udp_reassembled",
            "Datagrams from the enclave joined from IPv4 fragments",
            |c| &c.udp_reassembled,
        ),
        (
            "udp_fragmented",
            "Datagrams into the enclave sent as IPv4 fragments",
            |c| &c.udp_fragmented,
        ),
    ];
    for (name, help, pick) in counters {
        let mut family = encoder.encode_descriptor(name, help, None, MetricType::Counter)?;
        for (labels, c) in each {
            ConstCounter::new(pick(c).load(Relaxed)).encode(family.encode_family(labels)?)?;
        }
    }
    let mut bytes = encoder.encode_descriptor(
        "bytes",
        "Payload bytes carried, to the enclave and from it",
        None,
        MetricType::Counter,
    )?;
    for (labels, c) in each {
        for (direction, value) in [
            ("to_enclave", &c.bytes_to_enclave),
            ("from_enclave", &c.bytes_from_enclave),
        ] {
            ConstCounter::new(value.load(Relaxed)).encode(bytes.encode_family(&with(
                labels,
                "direction",
                direction,
            ))?)?;
        }
    }
    let mut active = encoder.encode_descriptor(
        "connections_active",
        "Connections alive now",
        None,
        MetricType::Gauge,
    )?;
    for (labels, c) in each {
        for (direction, value) in [("ingress", &c.live_ingress), ("egress", &c.live_egress)] {
            gauge(value.load(Relaxed)).encode(active.encode_family(&with(
                labels,
                "direction",
                direction,
            ))?)?;
        }
    }
    let mut udp = encoder.encode_descriptor(
        "udp_flows_active",
        "UDP flows alive now",
        None,
        MetricType::Gauge,
    )?;
    for (labels, c) in each {
        gauge(c.live_udp.load(Relaxed)).encode(udp.encode_family(labels)?)?;
    }
    Ok(())
}

/// A gauge of a count.
pub fn gauge(n: u64) -> ConstGauge<i64> {
    ConstGauge::new(i64::try_from(n).unwrap_or(i64::MAX))
}

/// The exposition of `registry`, in the OpenMetrics text format.
pub fn render(registry: &Registry) -> String {
    let mut out = String::new();
    // Writing to a String cannot fail.
    let _ = prometheus_client::encoding::text::encode(&mut out, registry);
    out
}

/// Scrapes served at once by one responder.
pub const MAX_SCRAPES: usize = 16;
/// The longest request read.
const MAX_REQUEST: usize = 8 * 1024;
/// How long a scraper may take to send its request, and to read the answer.
pub const REQUEST_TIMEOUT: Duration = Duration::from_secs(5);

/// Serves `registry` on `listener` until cancelled, [`MAX_SCRAPES`] at once; past that a
/// connection is closed at once.
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
            let body = async { render(&registry) };
            if let Err(e) = answer(stream, body).await {
                debug!(%peer, "metrics scrape: {e}");
            }
            drop(permit);
        });
    }
}

/// Reads one request from `stream` and answers it; `body` makes the exposition, and runs only
/// for a `GET /metrics`.
pub async fn answer<S, F>(mut stream: S, body: F) -> std::io::Result<()>
where
    S: AsyncRead + AsyncWrite + Unpin,
    F: Future<Output = String>,
{
    let mut request = Vec::new();
    let mut buf = [0u8; 1024];
    let read = tokio::time::timeout(REQUEST_TIMEOUT, async {
        while !request_complete(&request) {
            let n = stream.read(&mut buf).await?;
            if n == 0 {
                break;
            }
            request.extend_from_slice(&buf[..n]);
        }
        Ok::<_, std::io::Error>(())
    })
    .await;
    let Ok(read) = read else {
        return Ok(());
    };
    read?;
    let response = response(&request, body).await;
    // A scraper that stops reading gives its slot back after the same bound.
    tokio::time::timeout(REQUEST_TIMEOUT, async {
        stream.write_all(&response).await?;
        stream.shutdown().await
    })
    .await
    .unwrap_or(Ok(()))
}

/// Whether `request` is all that will be read of a request: its head is complete, or it has
/// reached the most read.
pub fn request_complete(request: &[u8]) -> bool {
    request.windows(4).any(|w| w == b"\r\n\r\n") || request.len() >= MAX_REQUEST
}

/// The whole HTTP response to `request`; `body` makes the exposition (OpenMetrics text), and
/// runs only for a `GET /metrics` (or `/`). A scraper that accepts OpenMetrics (Prometheus
/// itself asks for it first) gets it; any other (curl, `promtool check metrics`) the classic
/// Prometheus text format ([`classic`]), as Prometheus's own client libraries negotiate.
pub async fn response<F: Future<Output = String>>(request: &[u8], body: F) -> Vec<u8> {
    let text = String::from_utf8_lossy(request);
    let mut lines = text.split("\r\n");
    let line = lines.next().unwrap_or_default();
    let openmetrics = lines
        .take_while(|l| !l.is_empty())
        .filter_map(|l| l.split_once(':'))
        .filter(|(name, _)| name.eq_ignore_ascii_case("accept"))
        .flat_map(|(_, value)| value.split(','))
        .any(accepts_openmetrics);
    let mut parts = line.split(' ');
    let (status, content_type, body) = match (parts.next(), parts.next(), parts.next()) {
        (Some("GET"), Some("/metrics" | "/"), Some(v)) if v.starts_with("HTTP/1.") => {
            if openmetrics {
                (
                    "200 OK",
                    "application/openmetrics-text; version=1.0.0; charset=utf-8",
                    body.await,
                )
            } else {
                (
                    "200 OK",
                    "text/plain; version=0.0.4; charset=utf-8",
                    classic(&body.await),
                )
            }
        }
        (Some(_), Some(_), Some(v)) if v.starts_with("HTTP/1.") => {
            ("404 Not Found", "text/plain", "GET /metrics\n".to_string())
        }
        _ => ("400 Bad Request", "text/plain", "bad request\n".to_string()),
    };
    let mut out = format!(
        "HTTP/1.1 {status}\r\nContent-Type: {content_type}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
        body.len()
    )
    .into_bytes();
    out.extend_from_slice(body.as_bytes());
    out
}

/// Whether one media range of an `Accept` header takes OpenMetrics: it names it, with no
/// `q=0`.
fn accepts_openmetrics(range: &str) -> bool {
    let mut parts = range.split(';').map(str::trim);
    let named = parts
        .next()
        .is_some_and(|t| t.eq_ignore_ascii_case("application/openmetrics-text"));
    let refused = parts.any(|p| {
        p.strip_prefix("q=")
            .is_some_and(|q| q.parse::<f32>().is_ok_and(|q| q <= 0.0))
    });
    named && !refused
}

/// `openmetrics` (as `prometheus-client` writes it, which has no other format) in the classic
/// Prometheus text format: a counter family's `HELP` and `TYPE` name its samples (`x_total`,
/// not `x`), and there is no `UNIT` or `EOF` line. Samples are the same in both.
pub fn classic(openmetrics: &str) -> String {
    let counters: std::collections::HashSet<&str> = openmetrics
        .lines()
        .filter_map(|l| l.strip_prefix("# TYPE ")?.strip_suffix(" counter"))
        .collect();
    let mut out = String::with_capacity(openmetrics.len());
    for line in openmetrics.lines() {
        if line == "# EOF" || line.starts_with("# UNIT ") {
            continue;
        }
        let meta = ["# HELP ", "# TYPE "]
            .into_iter()
            .find_map(|p| Some((p, line.strip_prefix(p)?)));
        match meta.and_then(|(p, rest)| Some((p, rest.split_once(' ')?))) {
            Some((p, (name, rest))) if counters.contains(name) => {
                out.push_str(&format!("{p}{name}_total {rest}"));
            }
            _ => out.push_str(line),
        }
        out.push('\n');
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use prometheus_client::collector::Collector;

    #[derive(Debug)]
    struct Two(Counters, Counters);

    impl Collector for Two {
        fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
            let label = |v: &str| vec![("enclave", v.to_string())];
            encode_counters(
                &mut encoder,
                &[(label("a"), &self.0), (label("b"), &self.1)],
            )
        }
    }

    #[test]
    fn each_family_once_with_a_sample_per_set_of_counters() {
        let two = Two(Counters::default(), Counters::default());
        Counters::bump(two.1.opened.at(Direction::Egress));
        two.0.bytes_from_enclave.fetch_add(1234, Relaxed);
        let mut registry = Registry::with_prefix("enclave_net");
        registry.register_collector(Box::new(two));
        let text = render(&registry);
        for want in [
            "enclave_net_connections_opened_total{enclave=\"b\",direction=\"egress\"} 1",
            "enclave_net_connections_opened_total{enclave=\"a\",direction=\"egress\"} 0",
            "enclave_net_bytes_total{enclave=\"a\",direction=\"from_enclave\"} 1234",
            "enclave_net_udp_flows_active{enclave=\"b\"} 0",
            "# EOF",
        ] {
            assert!(text.contains(want), "{want} missing from:\n{text}");
        }
        assert_eq!(
            text.matches("# TYPE enclave_net_bytes ").count(),
            1,
            "{text}"
        );
    }

    #[test]
    fn openmetrics_only_when_asked_for() {
        let kind = |accept: &str| {
            let request = format!("GET /metrics HTTP/1.1\r\nAccept: {accept}\r\n\r\n");
            let out = ready(response(request.as_bytes(), async { "# EOF\n".into() }));
            String::from_utf8(out).unwrap().contains("openmetrics-text")
        };
        assert!(kind(
            "application/openmetrics-text;version=1.0.0,text/plain;q=0.5"
        ));
        assert!(!kind("application/openmetrics-text;q=0, text/plain"));
        assert!(!kind("*/*"));
        assert_eq!(label_value("a\"b\\c\nd"), "a\\\"b\\\\c\\nd");
    }

    /// The output of a future that never waits.
    fn ready<F: Future>(f: F) -> F::Output {
        let mut cx = std::task::Context::from_waker(std::task::Waker::noop());
        match std::pin::pin!(f).poll(&mut cx) {
            std::task::Poll::Ready(v) => v,
            std::task::Poll::Pending => panic!("the future waited"),
        }
    }

    #[tokio::test]
    async fn answers_get_metrics_and_nothing_else() {
        for (request, want) in [
            (
                "GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n",
                "HTTP/1.1 200 OK",
            ),
            ("GET /other HTTP/1.1\r\n\r\n", "HTTP/1.1 404"),
            ("garbage\r\n\r\n", "HTTP/1.1 400"),
        ] {
            let (mut client, server) = tokio::io::duplex(64 * 1024);
            client.write_all(request.as_bytes()).await.unwrap();
            answer(server, async { "body\n".to_string() })
                .await
                .unwrap();
            let mut got = String::new();
            client.read_to_string(&mut got).await.unwrap();
            assert!(got.starts_with(want), "{request:?}: {got}");
            assert_eq!(got.ends_with("body\n"), want.ends_with("200 OK"));
        }
    }
}
