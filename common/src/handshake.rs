//! Reading and writing the [`wire`](crate::wire) messages on a stream, with deadlines.
//!
//! The peer is untrusted on both sides (DESIGN.md), so every read of a header or status is bounded
//! in size by the codec and in time by the caller's deadline: a peer that opens a stream and then
//! goes silent cannot hold a task forever.

use std::io;
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

use crate::wire::{DecodeError, Header, Status, FIXED_LEN, MAX_HEADER_LEN, STATUS_LEN};

/// Why a header or status could not be read.
#[derive(Debug, thiserror::Error)]
pub enum HandshakeError {
    /// The bytes were not a valid message.
    #[error("malformed message: {0}")]
    Decode(#[from] DecodeError),
    /// The stream failed or closed early.
    #[error("stream failed during handshake: {0}")]
    Io(#[from] io::Error),
    /// The peer did not finish the message before the deadline.
    #[error("peer sent no complete message within {0:?}")]
    Timeout(Duration),
}

/// Reads one header, giving up after `limit`.
pub async fn read_header<S: AsyncRead + Unpin>(
    stream: &mut S,
    limit: Duration,
) -> Result<Header, HandshakeError> {
    let read = async {
        let mut buf = [0u8; MAX_HEADER_LEN];
        stream.read_exact(&mut buf[..FIXED_LEN]).await?;
        let total = Header::total_len(&buf[..FIXED_LEN])?;
        stream.read_exact(&mut buf[FIXED_LEN..total]).await?;
        Ok::<_, HandshakeError>(Header::decode(&buf[..total])?.0)
    };
    tokio::time::timeout(limit, read)
        .await
        .map_err(|_| HandshakeError::Timeout(limit))?
}

/// Reads one status reply, giving up after `limit`.
pub async fn read_status<S: AsyncRead + Unpin>(
    stream: &mut S,
    limit: Duration,
) -> Result<Status, HandshakeError> {
    let read = async {
        let mut buf = [0u8; STATUS_LEN];
        stream.read_exact(&mut buf).await?;
        Ok::<_, HandshakeError>(Status::decode(&buf)?)
    };
    tokio::time::timeout(limit, read)
        .await
        .map_err(|_| HandshakeError::Timeout(limit))?
}

/// Writes one header.
pub async fn write_header<S: AsyncWrite + Unpin>(
    stream: &mut S,
    header: &Header,
) -> io::Result<()> {
    let (buf, len) = header.encode();
    stream.write_all(&buf[..len]).await
}

/// Writes one status reply.
pub async fn write_status<S: AsyncWrite + Unpin>(stream: &mut S, status: Status) -> io::Result<()> {
    stream.write_all(&status.encode()).await
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::wire::Kind;

    #[tokio::test]
    async fn header_and_status_cross_a_duplex() {
        let (mut a, mut b) = tokio::io::duplex(64);
        let h = Header {
            kind: Kind::TcpIngress,
            src: "10.99.0.2:5000".parse().unwrap(),
            dst: "0.0.0.0:8080".parse().unwrap(),
        };
        write_header(&mut a, &h).await.unwrap();
        assert_eq!(
            read_header(&mut b, Duration::from_secs(1)).await.unwrap(),
            h
        );
        write_status(&mut b, Status::Denied).await.unwrap();
        assert_eq!(
            read_status(&mut a, Duration::from_secs(1)).await.unwrap(),
            Status::Denied
        );
    }

    #[tokio::test(start_paused = true)]
    async fn silent_peer_times_out() {
        let (_a, mut b) = tokio::io::duplex(64);
        let err = read_header(&mut b, Duration::from_secs(5))
            .await
            .unwrap_err();
        assert!(matches!(err, HandshakeError::Timeout(_)), "{err}");
    }

    #[tokio::test]
    async fn truncated_header_is_an_io_error_not_a_hang() {
        let (mut a, mut b) = tokio::io::duplex(64);
        tokio::io::AsyncWriteExt::write_all(&mut a, b"ENET\x01")
            .await
            .unwrap();
        drop(a);
        let err = read_header(&mut b, Duration::from_secs(5))
            .await
            .unwrap_err();
        assert!(matches!(err, HandshakeError::Io(_)), "{err}");
    }
}
