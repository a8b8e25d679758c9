//! Egress set-up: one stream to host-proxy per new SYN.

use std::time::Duration;

use common::handshake::{read_status, write_header};
use common::transport::{LinkAddr, Stream};
use common::wire::{Header, Status};
use tracing::debug;

/// Opens a stream to host-proxy, sends the header and waits for the status, all within `limit`.
/// Returns the stream, ready for payload, or the status the application's connect should fail
/// with.
pub async fn open(host: &LinkAddr, header: &Header, limit: Duration) -> Result<Stream, Status> {
    let attempt = async {
        let mut link = host.connect().await.map_err(|e| {
            common::warn_limited!(%host, "host-proxy unreachable: {e}");
            Status::Unreachable
        })?;
        write_header(&mut link, header).await.map_err(|e| {
            debug!("link failed while sending the header: {e}");
            Status::Unreachable
        })?;
        match read_status(&mut link, limit).await {
            Ok(Status::Ok) => Ok(link),
            Ok(status) => Err(status),
            Err(e) => {
                common::warn_limited!("no valid status from host-proxy: {e}");
                Err(Status::Unreachable)
            }
        }
    };
    tokio::time::timeout(limit, attempt)
        .await
        .unwrap_or(Err(Status::TimedOut))
}
