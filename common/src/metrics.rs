//! Connection and byte counters kept beside the logs (firecracker's vsock `METRICS` is the model).

use std::sync::atomic::{AtomicU64, Ordering::Relaxed};

/// Counters for one daemon. All are monotonic.
#[derive(Debug, Default)]
pub struct Counters {
    /// Connections that reached the `ok` status.
    pub opened: AtomicU64,
    /// Connections the destination refused.
    pub refused: AtomicU64,
    /// Connections policy denied.
    pub denied: AtomicU64,
    /// Connections that failed otherwise (unreachable, timed out, bad request, link down).
    pub failed: AtomicU64,
    /// Connections that ended with an error or reset rather than two clean closes.
    pub reset: AtomicU64,
    /// Payload bytes carried client->enclave (ingress) or world->enclave (egress replies).
    pub bytes_to_enclave: AtomicU64,
    /// Payload bytes carried enclave->client or enclave->world.
    pub bytes_from_enclave: AtomicU64,
}

impl Counters {
    /// Adds one to a counter.
    pub fn bump(counter: &AtomicU64) {
        counter.fetch_add(1, Relaxed);
    }

    /// Counts a connection that ended with a failure `status`.
    pub fn failure(&self, status: crate::wire::Status) {
        use crate::wire::Status;
        Self::bump(match status {
            Status::Refused => &self.refused,
            Status::Denied => &self.denied,
            _ => &self.failed,
        });
    }

    /// Logs every counter on one line.
    pub fn log(&self, who: &str) {
        tracing::info!(
            opened = self.opened.load(Relaxed),
            refused = self.refused.load(Relaxed),
            denied = self.denied.load(Relaxed),
            failed = self.failed.load(Relaxed),
            reset = self.reset.load(Relaxed),
            bytes.to_enclave = self.bytes_to_enclave.load(Relaxed),
            bytes.from_enclave = self.bytes_from_enclave.load(Relaxed),
            "{who} counters"
        );
    }
}
