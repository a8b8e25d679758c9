//! `--metrics-port PORT`: enclave-proxy's own Prometheus metrics, served at the gateway address
//! inside the enclave (`http://GATEWAY:PORT/metrics`) by the userspace stack itself, and to
//! ingress streams for that port, so an operator scrapes it from the parent by publishing the
//! port like any other (`host-proxy --publish 9465:PORT`).
//!
//! Besides the connection, byte, DNS and UDP counters both daemons keep
//! ([`common::exposition::encode_counters`]), it shows what only the stack knows, read from it
//! at each scrape ([`Snapshot`]): TAP frames in and out and the frames dropped, live TCP
//! sockets, and the bytes held in socket buffers and backlogs.
//!
//! A scrape here arrives as a stream's framed payload (the connection to the gateway is pumped
//! like any other, its far end being this module instead of host-proxy), so the HTTP exchange
//! is read and written in frames ([`common::frame`]). It is bounded like host-proxy's endpoint:
//! 16 scrapes at once from the host and 16 from inside the enclave (apart, so the host cannot
//! take them all), a request of 8 KiB read within 5 s; past the cap a scrape is refused (the
//! connect fails) rather than cut. The stack's part is read at most five times a second.

use std::io;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use tokio::time::Instant;

use common::exposition::{encode_counters, gauge, request_complete, response, REQUEST_TIMEOUT};
use common::frame::{encode_all, Chunk, Deframer, End};
use common::metrics::Counters;
use common::transport::Stream;
use common::wire::Status;
use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeMetric};
use prometheus_client::metrics::counter::ConstCounter;
use prometheus_client::metrics::MetricType;
use prometheus_client::registry::Registry;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::sync::{mpsc, oneshot, OwnedSemaphorePermit, Semaphore};
use tracing::debug;

use crate::stack::Event;
use crate::tap::TapStats;

/// What the stack holds at one moment.
#[derive(Debug, Default, Clone, Copy)]
pub struct Snapshot {
    /// What crossed the TAP.
    pub tap: TapStats,
    /// TCP sockets alive (connections being carried, either way).
    pub sockets: usize,
    /// Egress connections waiting on host-proxy.
    pub pending: usize,
    /// Bytes waiting in the sockets' receive buffers (from the enclave, not yet on the link).
    pub received: usize,
    /// Bytes waiting in the sockets' send buffers (for the enclave, not yet acknowledged).
    pub sending: usize,
    /// Bytes from the link waiting in backlogs for room in a send buffer.
    pub backlog: usize,
    /// The most the sockets' buffers may hold: their size, both ways, for every socket (pages
    /// are committed only as data passes).
    pub capacity: usize,
}

/// The metrics endpoint.
#[derive(Debug)]
pub struct Metrics {
    /// The port it is served on.
    pub port: u16,
    counters: Arc<Counters>,
    events: mpsc::Sender<Event>,
    /// Scrapes at once through published ports (from the untrusted host), and from inside the
    /// enclave: apart, so the host cannot take every slot.
    from_host: Arc<Semaphore>,
    from_enclave: Arc<Semaphore>,
    /// The last snapshot and when it was taken: one is reused for [`SNAPSHOT_AGE`], so scrapes
    /// cost the stack task at most one pass over its connections per period.
    last: Mutex<Option<(Instant, Snapshot)>>,
}

/// How long a snapshot of the stack is reused.
const SNAPSHOT_AGE: Duration = Duration::from_millis(200);

impl Metrics {
    /// The endpoint on `port`, reading `counters` and asking the stack (through `events`) for
    /// the rest.
    pub fn new(port: u16, counters: Arc<Counters>, events: mpsc::Sender<Event>) -> Metrics {
        let slots = || Arc::new(Semaphore::new(common::exposition::MAX_SCRAPES));
        Metrics {
            port,
            counters,
            events,
            from_host: slots(),
            from_enclave: slots(),
            last: Mutex::new(None),
        }
    }

    /// A slot for one more scrape from the host (an ingress stream) or from inside the enclave;
    /// `None` past the most at once, when the scrape is to be refused.
    pub fn admit(&self, from_host: bool) -> Option<OwnedSemaphorePermit> {
        let slots = if from_host {
            &self.from_host
        } else {
            &self.from_enclave
        };
        let permit = slots.clone().try_acquire_owned().ok();
        if permit.is_none() {
            debug!(
                from_host,
                "metrics: scrapes already in progress at the cap; refused"
            );
        }
        permit
    }

    /// Answers one scrape, admitted with `permit`, whose request arrives as framed payload on
    /// `link` (its status, if any, already sent).
    pub fn serve(self: &Arc<Self>, link: Stream, permit: OwnedSemaphorePermit) {
        let me = self.clone();
        tokio::spawn(async move {
            // Bounded overall: reading the request, the stack's answer, and the scraper's FIN.
            let exchange = exchange(link, me.render());
            match tokio::time::timeout(3 * REQUEST_TIMEOUT, exchange).await {
                Ok(Err(e)) => debug!("metrics scrape: {e}"),
                Err(_) => debug!("metrics scrape took too long; closed"),
                Ok(Ok(())) => {}
            }
            drop(permit);
        });
    }

    /// The exposition now (the stack's part at most [`SNAPSHOT_AGE`] old).
    async fn render(&self) -> String {
        let cached = *self.last.lock().unwrap_or_else(PoisonError::into_inner);
        let snapshot = match cached {
            Some((at, s)) if at.elapsed() < SNAPSHOT_AGE => s,
            _ => {
                let (tx, rx) = oneshot::channel();
                let s = match self.events.send(Event::Snapshot(tx)).await {
                    Ok(()) => rx.await.unwrap_or_default(),
                    Err(_) => Snapshot::default(),
                };
                *self.last.lock().unwrap_or_else(PoisonError::into_inner) =
                    Some((Instant::now(), s));
                s
            }
        };
        let mut registry = Registry::with_prefix("enclave_net");
        registry.register_collector(Box::new(Now {
            counters: self.counters.clone(),
            snapshot,
        }));
        common::exposition::render(&registry)
    }
}

/// The counters and a snapshot, as metrics.
#[derive(Debug)]
struct Now {
    counters: Arc<Counters>,
    snapshot: Snapshot,
}

impl Collector for Now {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        encode_counters(&mut encoder, &[(Vec::new(), &self.counters)])?;
        let s = &self.snapshot;
        let as_u64 = |n: usize| u64::try_from(n).unwrap_or(u64::MAX);
        let per_way = [
            (
                "tap_frames",
                "Frames read from the TAP (in) and written to it (out)",
                s.tap.rx_frames,
                s.tap.tx_frames,
            ),
            (
                "tap_dropped",
                "Frames dropped: read with an offload not asked for (in), not written (out)",
                s.tap.rx_unsupported,
                s.tap.tx_dropped,
            ),
            (
                "tap_superframes",
                "TCP super-frames of up to 64 KiB read (in) and written (out)",
                s.tap.rx_gso,
                s.tap.tx_gso,
            ),
        ];
        for (name, help, rx, tx) in per_way {
            let mut family = encoder.encode_descriptor(name, help, None, MetricType::Counter)?;
            for (way, value) in [("in", rx), ("out", tx)] {
                ConstCounter::new(value).encode(family.encode_family(&[("direction", way)])?)?;
            }
        }
        let gauges = [
            ("tcp_sockets", "TCP sockets alive in the stack", s.sockets),
            (
                "egress_pending",
                "Egress connections waiting on host-proxy",
                s.pending,
            ),
            (
                "socket_buffer_capacity_bytes",
                "The most the sockets' buffers may hold, both ways (committed as used)",
                s.capacity,
            ),
        ];
        for (name, help, value) in gauges {
            gauge(as_u64(value)).encode(encoder.encode_descriptor(
                name,
                help,
                None,
                MetricType::Gauge,
            )?)?;
        }
        let mut held = encoder.encode_descriptor(
            "socket_buffer_bytes",
            "Bytes held now: in the sockets' receive and send buffers, and in backlogs",
            None,
            MetricType::Gauge,
        )?;
        for (buffer, value) in [
            ("receive", s.received),
            ("send", s.sending),
            ("backlog", s.backlog),
        ] {
            gauge(as_u64(value)).encode(held.encode_family(&[("buffer", buffer)])?)?;
        }
        Ok(())
    }
}

/// One HTTP exchange in frames: reads the request, answers it with `body` and FIN, then waits
/// for the scraper's FIN (or its end) before closing, so the stream ends cleanly. A scraper that
/// resets, or whose stream ends before its request does, gets no answer.
async fn exchange<F: std::future::Future<Output = String>>(
    mut link: Stream,
    body: F,
) -> io::Result<()> {
    let mut deframer = Deframer::new();
    let mut request = Vec::new();
    let mut buf = vec![0u8; 16 * 1024];
    let read = read_frames(&mut link, &mut deframer, &mut buf, |data| {
        request.extend_from_slice(data);
        request_complete(&request)
    });
    let eof = tokio::time::timeout(REQUEST_TIMEOUT, read)
        .await
        .map_err(|_| io::Error::new(io::ErrorKind::TimedOut, "no request in time"))??;
    match deframer.end() {
        End::Rst => return Err(io::Error::new(io::ErrorKind::ConnectionReset, "reset")),
        End::Open if eof => {
            return Err(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                "the stream ended before its FIN",
            ))
        }
        End::Open | End::Fin => {}
    }
    let answer = response(&request, body).await;
    let send = async {
        link.write_all(&encode_all(&answer, Some(Chunk::Fin)))
            .await?;
        link.flush().await?;
        // The rest of the request, if any, is read and dropped.
        read_frames(&mut link, &mut deframer, &mut buf, |_| false).await
    };
    tokio::time::timeout(REQUEST_TIMEOUT, send)
        .await
        .map_err(|_| io::Error::new(io::ErrorKind::TimedOut, "the scraper did not finish"))?
        .map(|_| ())
}

/// Reads frames from `link`, handing each run of payload to `take` until it returns true or the
/// direction ends (FIN or RST); returns whether the link reached its end of file instead. Every
/// byte read is decoded, so the next call goes on where this one stopped, and the window is
/// kept: CREDIT goes back as payload is taken. A malformed frame is an error.
async fn read_frames(
    link: &mut Stream,
    deframer: &mut Deframer,
    buf: &mut [u8],
    mut take: impl FnMut(&[u8]) -> bool,
) -> io::Result<bool> {
    let mut done = false;
    while !done && deframer.end() == End::Open {
        let n = link.read(buf).await?;
        if n == 0 {
            return Ok(true);
        }
        let mut input = &buf[..n];
        while !input.is_empty() {
            let (used, chunk) = deframer
                .decode(input)
                .map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e.to_string()))?;
            if let Some(Chunk::Data(k)) = chunk {
                deframer.delivered(k);
                done = done || take(&input[used - k..used]);
            }
            input = &input[used..];
        }
        if let Some(credit) = deframer.credit_due() {
            link.write_all(&credit).await?;
        }
    }
    Ok(false)
}

/// A stream whose far end is the metrics endpoint: what the stack pumps a connection to the
/// gateway's metrics port into, in place of a stream to host-proxy; or the status the app's
/// connect fails with.
pub fn local_stream(metrics: &Arc<Metrics>) -> Result<Stream, Status> {
    let permit = metrics.admit(false).ok_or(Status::Unreachable)?;
    let pair = tokio::net::UnixStream::pair()
        .and_then(|(ours, theirs)| Ok((Stream::unix(ours)?, Stream::unix(theirs)?)));
    match pair {
        Ok((ours, theirs)) => {
            metrics.serve(theirs, permit);
            Ok(ours)
        }
        Err(e) => {
            common::warn_limited!("cannot open a metrics stream: {e}");
            Err(Status::Unreachable)
        }
    }
}
