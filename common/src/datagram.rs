//! A datagram stream over a link: whole datagrams in and out, with the window kept and credit
//! returned (see [`crate::frame`]). DNS flows and UDP flows on both daemons use it.
//!
//! Sending never waits for the window: a datagram that does not fit is dropped and reported,
//! as a full socket buffer drops UDP. Receiving returns credit as each datagram is handed on.

use std::io;

use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::frame::{self, Chunk, Deframer, FrameError, SendWindow};
use crate::transport::Stream;

/// Why a datagram stream ended other than by the peer's FIN.
#[derive(Debug, thiserror::Error)]
pub enum DatagramError {
    /// The link failed.
    #[error("link: {0}")]
    Link(#[from] io::Error),
    /// The link ended without FIN: the peer died.
    #[error("the link ended without FIN")]
    Cut,
    /// The peer reset the stream.
    #[error("reset by the peer")]
    Reset,
    /// The peer sent something malformed.
    #[error("bad frame: {0}")]
    Frame(#[from] FrameError),
}

/// One datagram stream, after its status.
#[derive(Debug)]
pub struct DatagramLink {
    /// The stream.
    pub link: Stream,
    deframer: Deframer,
    window: SendWindow,
    buf: Box<[u8]>,
    at: usize,
    end: usize,
    /// The datagram being received.
    current: Vec<u8>,
    /// Frames waiting to be written: datagrams and CREDITs.
    out: Vec<u8>,
}

impl DatagramLink {
    /// Wraps a stream whose status has been exchanged.
    pub fn new(link: Stream) -> DatagramLink {
        DatagramLink {
            link,
            deframer: Deframer::datagrams(),
            window: SendWindow::default(),
            buf: vec![0u8; 64 * 1024].into_boxed_slice(),
            at: 0,
            end: 0,
            current: Vec::new(),
            out: Vec::new(),
        }
    }

    /// The next whole datagram from the peer, or `None` once it has sent FIN. Cancel-safe: what
    /// has been read stays here for the next call. Owed credit is queued for [`Self::flush`].
    pub async fn recv(&mut self) -> Result<Option<Vec<u8>>, DatagramError> {
        loop {
            while self.at < self.end {
                let (used, chunk) = self.deframer.decode(&self.buf[self.at..self.end])?;
                self.at += used;
                match chunk {
                    Some(Chunk::Datagram { n, end }) => {
                        self.current
                            .extend_from_slice(&self.buf[self.at - n..self.at]);
                        self.deframer.delivered(n);
                        if end {
                            if let Some(credit) = self.deframer.credit_due() {
                                self.out.extend_from_slice(&credit);
                            }
                            return Ok(Some(std::mem::take(&mut self.current)));
                        }
                    }
                    Some(Chunk::Credit(amount)) => self.window.credited(amount)?,
                    Some(Chunk::Fin) => return Ok(None),
                    Some(Chunk::Rst) => return Err(DatagramError::Reset),
                    // A datagram stream's decoder yields no DATA.
                    Some(Chunk::Data(_)) | None => {}
                }
            }
            let n = self.link.read(&mut self.buf).await?;
            if n == 0 {
                return Err(DatagramError::Cut);
            }
            (self.at, self.end) = (0, n);
        }
    }

    /// Queues `datagram` for [`Self::flush`] if the window has room; `false` if it was dropped.
    pub fn queue(&mut self, datagram: &[u8]) -> bool {
        let at = self.out.len();
        let cost = frame::encode_datagram(&mut self.out, datagram);
        if self.window.try_send(cost) {
            true
        } else {
            self.out.truncate(at);
            false
        }
    }

    /// Writes what is queued.
    pub async fn flush(&mut self) -> io::Result<()> {
        if !self.out.is_empty() {
            self.link.write_all(&self.out).await?;
            self.out.clear();
        }
        Ok(())
    }

    /// Ends the stream cleanly: FIN, then waits (up to `linger`) for the peer's end, so what was
    /// sent is read before the link closes.
    pub async fn finish(mut self, linger: std::time::Duration) {
        self.out.extend_from_slice(&frame::FIN);
        if self.flush().await.is_err() {
            return;
        }
        let _ = tokio::time::timeout(linger, async {
            while matches!(self.recv().await, Ok(Some(_))) {}
        })
        .await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::net::UnixStream;

    #[tokio::test]
    async fn datagrams_cross_whole_and_a_full_window_drops() {
        let (a, b) = UnixStream::pair().unwrap();
        let mut a = DatagramLink::new(Stream::unix(a).unwrap());
        let mut b = DatagramLink::new(Stream::unix(b).unwrap());
        let sizes = [0, 1, 1000, 40_000, frame::MAX_DATAGRAM];
        for n in sizes {
            assert!(a.queue(&vec![n as u8; n]));
        }
        a.flush().await.unwrap();
        for n in sizes {
            assert_eq!(b.recv().await.unwrap(), Some(vec![n as u8; n]));
        }
        // b never returns credit to a: a's window fills, and the rest is dropped, not waited for.
        let mut queued = 0;
        while a.queue(&[1; 1000]) {
            queued += 1;
            assert!(queued < frame::WINDOW_FRAMES, "the window never closed");
        }
        a.flush().await.unwrap();
        // Once b has taken them, its CREDITs reopen a's window.
        for _ in 0..queued {
            assert_eq!(b.recv().await.unwrap().map(|d| d.len()), Some(1000));
        }
        b.flush().await.unwrap();
        b.finish(std::time::Duration::from_millis(100)).await;
        assert_eq!(a.recv().await.unwrap(), None, "FIN after the credits");
        assert!(a.queue(&[1; 1000]), "credit came back");
    }

    #[tokio::test]
    async fn a_cut_link_is_not_a_clean_end() {
        let (a, b) = UnixStream::pair().unwrap();
        let mut a = DatagramLink::new(Stream::unix(a).unwrap());
        drop(b);
        assert!(matches!(a.recv().await, Err(DatagramError::Cut)));
    }
}
