//! The accept loop every listener in both daemons runs.
//!
//! An accept error (for example `EMFILE` under a flood) is logged and retried after a short pause,
//! so the listener never spins and never stops serving.

use std::future::Future;
use std::io;
use std::time::Duration;

use tokio::net::{TcpListener, TcpStream};

use crate::transport::{Listener, Stream};

/// Something that accepts connections, describing each peer for logs.
pub trait Accept {
    /// The accepted connection.
    type Conn;
    /// Waits for the next connection.
    fn accept_conn(&self) -> impl Future<Output = io::Result<(Self::Conn, String)>> + Send;
}

impl Accept for Listener {
    type Conn = Stream;
    fn accept_conn(&self) -> impl Future<Output = io::Result<(Stream, String)>> + Send {
        self.accept()
    }
}

impl Accept for TcpListener {
    type Conn = TcpStream;
    async fn accept_conn(&self) -> io::Result<(TcpStream, String)> {
        let (s, peer) = self.accept().await?;
        Ok((s, peer.to_string()))
    }
}

/// Accepts until cancelled, handing each connection, its peer and a running number to `spawn`.
pub async fn accept_loop<L: Accept>(
    listener: L,
    what: &str,
    mut spawn: impl FnMut(L::Conn, String, u64),
) {
    let mut next_id: u64 = 0;
    loop {
        match listener.accept_conn().await {
            Ok((conn, peer)) => {
                next_id += 1;
                spawn(conn, peer, next_id);
            }
            Err(e) => {
                // A flood (EMFILE) fails every accept: one line per period, the rest counted.
                crate::warn_limited!("{what} accept failed: {e}");
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
    }
}
