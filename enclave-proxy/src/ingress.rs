//! Ingress streams from host-proxy: accepted, their headers checked against `--expose`, then
//! handed to the stack task.
//!
//! The host is untrusted: a stream with a malformed, truncated or slow header, the wrong kind, or
//! a port outside `--expose` is answered and closed here, and never reaches the stack. Nor is the
//! header's client address taken on trust: before the stream goes to the stack, the enclave
//! kernel is asked whether it routes that address back out of the TAP ([`Routes::check`]); if
//! not, the stack sources the connection from the gateway. A host can still make a server see any
//! address that is routed out of the TAP, so a server must not use it for authorisation.
//!
//! Everything logged here can be triggered per stream by the host, so it logs at debug.

use std::sync::Arc;
use std::time::Duration;

use common::handshake::{read_header, write_status};
use common::metrics::Counters;
use common::ports::PortSet;
use common::transport::{Listener, Stream};
use common::wire::{Kind, Status};
use tokio::sync::mpsc;
use tracing::{debug, info_span, Instrument, Span};

use crate::metrics::Metrics;
use crate::netlink::Routes;
use crate::stack::Event;

/// What decides an ingress stream's admission.
#[derive(Debug)]
pub struct Admission {
    /// The enclave ports ingress may reach (`--expose`; `None` is all).
    pub expose: Option<PortSet>,
    /// How long host-proxy may take to send the header.
    pub handshake_timeout: Duration,
    /// enclave-proxy's own metrics, which answer streams for their port.
    pub metrics: Option<Arc<Metrics>>,
}

/// Accepts ingress streams until cancelled.
pub async fn serve(
    listener: Listener,
    admission: Admission,
    routes: Arc<Routes>,
    events: mpsc::Sender<Event>,
    counters: Arc<Counters>,
) {
    let admission = Arc::new(admission);
    // Streams still sending their header, or waiting for the stack to take them. Bounded, so a
    // flood of streams from the (untrusted) host cannot grow tasks without limit.
    let admitting = Arc::new(tokio::sync::Semaphore::new(MAX_ADMITTING));
    common::serve::accept_loop(listener, "ingress", |link, peer, id| {
        let span = info_span!("ingress", conn.id = id, link.peer = %peer);
        let Ok(permit) = admitting.clone().try_acquire_owned() else {
            debug!(parent: &span, "too many ingress streams being set up; closing this one");
            counters.failure(Status::Unreachable, common::metrics::Direction::Ingress);
            return;
        };
        let task = admit(
            link,
            admission.clone(),
            routes.clone(),
            events.clone(),
            counters.clone(),
        );
        tokio::spawn(
            async move {
                task.await;
                drop(permit);
            }
            .instrument(span),
        );
    })
    .await;
}

/// The most ingress streams in set-up at once.
const MAX_ADMITTING: usize = 1024;

async fn admit(
    mut link: Stream,
    admission: Arc<Admission>,
    routes: Arc<Routes>,
    events: mpsc::Sender<Event>,
    counters: Arc<Counters>,
) {
    let header = match read_header(&mut link, admission.handshake_timeout).await {
        Ok(h) => h,
        Err(e) => {
            debug!("dropping ingress stream: {e}");
            counters.failure(Status::BadRequest, common::metrics::Direction::Ingress);
            let _ = write_status(&mut link, Status::BadRequest).await;
            return;
        }
    };
    let span = Span::current();
    span.record("tcp.peer", tracing::field::display(header.src));
    if !matches!(header.kind, Kind::TcpIngress | Kind::UdpIngress) {
        debug!(kind = ?header.kind, "dropping stream: not an ingress request");
        counters.failure(Status::BadRequest, common::metrics::Direction::Ingress);
        let _ = write_status(&mut link, Status::BadRequest).await;
        return;
    }
    let port = header.dst.port();
    if admission
        .expose
        .as_ref()
        .is_some_and(|set| !set.contains(port))
    {
        debug!(client = %header.src, port, "denied: port is not in --expose");
        counters.failure(Status::Denied, common::metrics::Direction::Ingress);
        let _ = write_status(&mut link, Status::Denied).await;
        return;
    }
    if let Some(metrics) = admission
        .metrics
        .as_ref()
        .filter(|m| m.port == port && header.kind == Kind::TcpIngress)
    {
        debug!(client = %header.src, port, "ingress stream for enclave-proxy's metrics");
        match metrics.admit(true) {
            Some(permit) => {
                if write_status(&mut link, Status::Ok).await.is_ok() {
                    metrics.serve(link, permit);
                }
            }
            None => {
                let _ = write_status(&mut link, Status::Unreachable).await;
            }
        }
        return;
    }
    // Here, not on the stack task: the lookup is a round trip to the kernel.
    let route = routes.check(header.src.ip()).await;
    let routed = route.is_tap();
    if routed {
        debug!(client = %header.src, port, "ingress stream accepted");
    } else {
        debug!(client = %header.src, port, ?route, "ingress stream accepted; the client is not routed out of the TAP, so it will come from the gateway");
    }
    let event = if header.kind == Kind::UdpIngress {
        Event::UdpIngress {
            header,
            link,
            routed,
        }
    } else {
        let span = info_span!("tcp", tcp.peer = %header.src, enclave.port = port);
        Event::Ingress {
            header,
            link,
            span,
            routed,
        }
    };
    let _ = events.send(event).await;
}

/// Answers an ingress stream with a failure status and closes it, off the stack task.
pub fn refuse(mut link: Stream, status: Status, span: Span) {
    tokio::spawn(
        async move {
            let write = write_status(&mut link, status);
            if tokio::time::timeout(Duration::from_secs(2), write)
                .await
                .is_err()
            {
                debug!("host-proxy did not take the {status} status");
            }
        }
        .instrument(span),
    );
}
