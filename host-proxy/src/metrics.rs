//! `--metrics ADDR`: Prometheus exposition over HTTP ([`common::exposition`]).
//!
//! Every metric carries the label `enclave` (the enclave's name, [`crate::Config::label`]).
//! The connection and datagram counters are read from each enclave's [`Counters`] at each scrape
//! (a [`Collector`]); the connection counters, live connections and bytes have a `direction`
//! label. The egress connect latency is a histogram per enclave.

use std::sync::Arc;

use common::exposition::{encode_counters, label_value, Labels};
use common::metrics::Counters;
use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeMetric};
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::metrics::MetricType;
use prometheus_client::registry::Registry;

pub use common::exposition::serve;

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

/// One enclave's metrics: its name, counters and observations.
pub trait Enclave: std::fmt::Debug + Send + Sync + 'static {
    /// The `enclave` label.
    fn label(&self) -> &str;
    /// Its counters.
    fn counters(&self) -> &Counters;
    /// Its observations.
    fn observed(&self) -> &Observed;
}

impl Enclave for crate::Shared {
    fn label(&self) -> &str {
        &self.label
    }
    fn counters(&self) -> &Counters {
        &self.counters
    }
    fn observed(&self) -> &Observed {
        &self.observed
    }
}

/// Reads every enclave's counters at each scrape.
#[derive(Debug)]
struct EnclavesCollector<T>(Vec<Arc<T>>);

impl<T: Enclave> Collector for EnclavesCollector<T> {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let labels = |e: &T| -> Labels { vec![("enclave", label_value(e.label()))] };
        let each: Vec<(Labels, &Counters)> =
            self.0.iter().map(|e| (labels(e), e.counters())).collect();
        encode_counters(&mut encoder, &each)?;
        let mut family = encoder.encode_descriptor(
            "egress_connect_seconds",
            "Time from an egress request to the destination's answer",
            None,
            MetricType::Histogram,
        )?;
        for e in &self.0 {
            e.observed()
                .egress_connect
                .encode(family.encode_family(&labels(e))?)?;
        }
        Ok(())
    }
}

/// The registry of one host-proxy: every metric of every enclave, labelled with `enclave`.
pub fn registry<T: Enclave>(enclaves: Vec<Arc<T>>) -> Registry {
    let mut registry = Registry::with_prefix("enclave_net");
    registry.register_collector(Box::new(EnclavesCollector(enclaves)));
    registry
}

#[cfg(test)]
mod tests {
    use super::*;
    use common::metrics::Direction;

    #[derive(Debug, Default)]
    struct Fake(String, Counters, Observed);

    impl Enclave for Fake {
        fn label(&self) -> &str {
            &self.0
        }
        fn counters(&self) -> &Counters {
            &self.1
        }
        fn observed(&self) -> &Observed {
            &self.2
        }
    }

    #[test]
    fn counters_and_the_histogram_are_exposed_with_their_labels() {
        let a = Arc::new(Fake(
            "vsock:16:5000".into(),
            Counters::default(),
            Observed::default(),
        ));
        let b = Arc::new(Fake("web".into(), Counters::default(), Observed::default()));
        Counters::bump(a.1.opened.at(Direction::Egress));
        a.1.bytes_from_enclave
            .fetch_add(1234, std::sync::atomic::Ordering::Relaxed);
        a.2.egress_connect.observe(0.003);
        let text = common::exposition::render(&registry(vec![a, b]));
        for want in [
            "enclave_net_connections_opened_total{enclave=\"vsock:16:5000\",direction=\"egress\"} 1",
            "enclave_net_connections_opened_total{enclave=\"vsock:16:5000\",direction=\"ingress\"} 0",
            "enclave_net_connections_opened_total{enclave=\"web\",direction=\"egress\"} 0",
            "enclave_net_bytes_total{enclave=\"vsock:16:5000\",direction=\"from_enclave\"} 1234",
            "enclave_net_connections_active{enclave=\"vsock:16:5000\",direction=\"ingress\"} 0",
            "enclave_net_egress_connect_seconds_count{enclave=\"vsock:16:5000\"} 1",
            "enclave_net_egress_connect_seconds_count{enclave=\"web\"} 0",
            "# EOF",
        ] {
            assert!(text.contains(want), "{want} missing from:\n{text}");
        }
    }
}
