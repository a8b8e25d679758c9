//! The byte pump between a TCP socket and a link stream.
//!
//! Each direction is copied independently (tokio's `copy_bidirectional` polls both halves, so a
//! full direction never blocks the other: DESIGN.md's virtio-vsock deadlock note). End of file in
//! one direction becomes `shutdown(WR)` on the other side, so half-close crosses the pair.
//! Buffers are fixed, so nothing is buffered without bound, and every link write is capped at
//! 32 KiB by [`common::transport::Stream`].

use std::sync::atomic::Ordering::Relaxed;

use common::metrics::Counters;
use common::transport::Stream;
use tokio::net::TcpStream;
use tracing::debug;

/// Copy buffer per direction. Large buffers mean fewer, fuller link writes (DESIGN.md: "Small
/// packets": batch writes).
const BUF: usize = 128 * 1024;

/// Carries bytes both ways until both directions have closed.
/// Bytes read from `tcp` count as going to the enclave.
pub async fn pump(tcp: &mut TcpStream, link: &mut Stream, counters: &Counters) {
    match tokio::io::copy_bidirectional_with_sizes(tcp, link, BUF, BUF).await {
        Ok((tcp_to_link, link_to_tcp)) => {
            counters.bytes_to_enclave.fetch_add(tcp_to_link, Relaxed);
            counters.bytes_from_enclave.fetch_add(link_to_tcp, Relaxed);
            debug!(
                bytes.to_enclave = tcp_to_link,
                bytes.from_enclave = link_to_tcp,
                "connection closed"
            );
        }
        Err(e) => {
            Counters::bump(&counters.reset);
            debug!("connection reset: {e}");
            reset(tcp);
        }
    }
}

/// Makes the kernel answer the TCP peer with RST rather than FIN when the socket is dropped.
pub fn reset(tcp: &TcpStream) {
    let _ = socket2::SockRef::from(tcp).set_linger(Some(std::time::Duration::ZERO));
}
