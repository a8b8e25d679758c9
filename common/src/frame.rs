//! Payload framing: what a stream carries after its `ok` status.
//!
//! # Primer
//!
//! TCP has three ways to end a direction: a FIN, a RST, and the connection simply going away. A
//! bare byte stream can carry only one of them (its own end of file), so since protocol version 2
//! every byte after the status travels in a *frame*:
//!
//! ```text
//!  0      1       2        4
//!  +------+-------+--------+=====================+
//!  | type | flags | length |  payload (length B) |   all integers big-endian
//!  +------+-------+--------+=====================+
//!
//!  type 1 DATA  length 1..=32764, payload: the connection's bytes
//!  type 2 FIN   length 0: this direction is finished (TCP FIN, half-close)
//!  type 3 RST   length 0: the connection was aborted (TCP RST); nothing more follows
//!  type 4       reserved for datagrams (UDP), with flags bit 0 "more of this datagram follows"
//!  flags        0 for types 1-3
//! ```
//!
//! A DATA frame with its header is at most [`MAX_WRITE`] bytes, so every frame fits one capped
//! vsock write (DESIGN.md: 32 KiB). The header costs 4 bytes per frame: 0.012% on bulk transfers
//! and 4 bytes per message on request/response traffic.
//!
//! How a stream ends:
//! - each side sends FIN once its TCP peer has finished sending, and closes the link only once it
//!   has both sent and received FIN. Such an end is clean;
//! - a RST may follow a FIN (the TCP peer half-closed, then reset); nothing else may;
//! - a side whose TCP peer reset sends RST (when it can) and closes the link;
//! - anything else the receiver sees — end of file before FIN, a read error, a frame cut short,
//!   a malformed frame — means the other daemon died or misbehaved, and the receiver resets its
//!   TCP side. A broken link never looks like a complete stream.
//!
//! An end-of-direction marker in band also makes half-close work over transports that cannot
//! carry `shutdown(WR)` themselves (the hybrid vsock side of `vhost-device-vsock` drops it).
//!
//! Decoding is sans-IO: a [`Deframer`] takes bytes in any split and says what they were.

use crate::transport::MAX_WRITE;

/// Length of a frame header.
pub const FRAME_HEADER_LEN: usize = 4;
/// The most payload one DATA frame carries: header and payload together fill one capped write.
pub const MAX_DATA: usize = MAX_WRITE - FRAME_HEADER_LEN;

const TYPE_DATA: u8 = 1;
const TYPE_FIN: u8 = 2;
const TYPE_RST: u8 = 3;

/// The FIN frame: this direction is finished.
pub const FIN: [u8; FRAME_HEADER_LEN] = [TYPE_FIN, 0, 0, 0];
/// The RST frame: the connection was aborted.
pub const RST: [u8; FRAME_HEADER_LEN] = [TYPE_RST, 0, 0, 0];

/// The header of a DATA frame carrying `len` bytes (1 to [`MAX_DATA`]).
pub fn data_header(len: usize) -> [u8; FRAME_HEADER_LEN] {
    debug_assert!((1..=MAX_DATA).contains(&len), "DATA frame of {len} bytes");
    let [hi, lo] = (len as u16).to_be_bytes();
    [TYPE_DATA, 0, hi, lo]
}

/// Why bytes are not a valid frame sequence. Every one of these ends the connection with a reset.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum FrameError {
    /// The type byte names no frame a TCP stream carries.
    #[error("unknown frame type {0}")]
    UnknownType(u8),
    /// Flags must be zero on these frame types.
    #[error("frame type {kind} with flags {flags:#04x}")]
    Flags {
        /// The frame type.
        kind: u8,
        /// The flags byte.
        flags: u8,
    },
    /// A DATA frame was empty or longer than [`MAX_DATA`].
    #[error("DATA frame of {0} bytes (must be 1 to {MAX_DATA})")]
    DataLength(usize),
    /// A FIN or RST frame had a payload.
    #[error("control frame type {kind} with a {len}-byte payload")]
    ControlLength {
        /// The frame type.
        kind: u8,
        /// Its length field.
        len: usize,
    },
    /// Bytes other than a RST followed a FIN, or anything followed a RST.
    #[error("bytes after the end of the direction")]
    AfterEnd,
}

/// What a run of decoded bytes was.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Chunk {
    /// The last `n` bytes consumed are payload (possibly part of a larger DATA frame).
    Data(usize),
    /// The direction is finished.
    Fin,
    /// The connection was aborted.
    Rst,
}

/// How a direction of a stream has ended, if it has.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum End {
    /// Still open.
    #[default]
    Open,
    /// A FIN was received.
    Fin,
    /// A RST was received.
    Rst,
}

/// Decodes one direction of a stream's frames, in whatever pieces the bytes arrive.
#[derive(Debug, Clone, Default)]
pub struct Deframer {
    header: [u8; FRAME_HEADER_LEN],
    have: usize,
    data_left: usize,
    end: End,
    /// The first error: once the stream is known bad, every later byte is refused with it.
    error: Option<FrameError>,
}

impl Deframer {
    /// A decoder at the start of the payload.
    pub fn new() -> Deframer {
        Deframer::default()
    }

    /// How the direction has ended, if it has.
    pub fn end(&self) -> End {
        self.end
    }

    /// Whether an end of file here would cut a frame in two.
    pub fn mid_frame(&self) -> bool {
        self.have > 0 || self.data_left > 0
    }

    /// Payload bytes of the current DATA frame not yet decoded.
    pub fn data_left(&self) -> usize {
        self.data_left
    }

    /// Header bytes still needed before the next frame is known (0 inside a DATA payload).
    /// A reader that may only take `room` payload bytes can safely read `room + header_left()`
    /// bytes: headers take up the rest.
    pub fn header_left(&self) -> usize {
        if self.data_left > 0 {
            0
        } else {
            FRAME_HEADER_LEN - self.have
        }
    }

    /// Decodes from the start of `input`. Returns how many bytes were consumed and what they
    /// were; `None` means all of `input` was consumed into a partial header. Call again with the
    /// rest of the input until it is empty.
    pub fn decode(&mut self, input: &[u8]) -> Result<(usize, Option<Chunk>), FrameError> {
        if let Some(e) = self.error {
            return Err(e);
        }
        if input.is_empty() {
            return Ok((0, None));
        }
        let r = self.decode_inner(input);
        if let Err(e) = r {
            self.error = Some(e);
        }
        r
    }

    fn decode_inner(&mut self, input: &[u8]) -> Result<(usize, Option<Chunk>), FrameError> {
        // After a FIN only a RST may follow (TCP allows a reset after a half-close).
        let kind = if self.have == 0 {
            input[0]
        } else {
            self.header[0]
        };
        if self.end == End::Rst || (self.end == End::Fin && kind != TYPE_RST) {
            return Err(FrameError::AfterEnd);
        }
        if self.data_left > 0 {
            let n = self.data_left.min(input.len());
            self.data_left -= n;
            return Ok((n, Some(Chunk::Data(n))));
        }
        let take = (FRAME_HEADER_LEN - self.have).min(input.len());
        self.header[self.have..self.have + take].copy_from_slice(&input[..take]);
        self.have += take;
        if self.have < FRAME_HEADER_LEN {
            return Ok((take, None));
        }
        self.have = 0;
        let [kind, flags, hi, lo] = self.header;
        let len = usize::from(u16::from_be_bytes([hi, lo]));
        if !matches!(kind, TYPE_DATA | TYPE_FIN | TYPE_RST) {
            return Err(FrameError::UnknownType(kind));
        }
        if flags != 0 {
            return Err(FrameError::Flags { kind, flags });
        }
        match kind {
            TYPE_DATA => {
                if len == 0 || len > MAX_DATA {
                    return Err(FrameError::DataLength(len));
                }
                let n = len.min(input.len() - take);
                self.data_left = len - n;
                if n == 0 {
                    return Ok((take, None));
                }
                Ok((take + n, Some(Chunk::Data(n))))
            }
            _ if len != 0 => Err(FrameError::ControlLength { kind, len }),
            TYPE_FIN => {
                self.end = End::Fin;
                Ok((take, Some(Chunk::Fin)))
            }
            _ => {
                self.end = End::Rst;
                Ok((take, Some(Chunk::Rst)))
            }
        }
    }
}

/// Encodes `payload` as DATA frames followed by `end` (FIN or RST), for tests and tools.
pub fn encode_all(payload: &[u8], end: Option<Chunk>) -> Vec<u8> {
    let mut out =
        Vec::with_capacity(payload.len() + FRAME_HEADER_LEN * (2 + payload.len() / MAX_DATA));
    for piece in payload.chunks(MAX_DATA) {
        out.extend_from_slice(&data_header(piece.len()));
        out.extend_from_slice(piece);
    }
    match end {
        Some(Chunk::Fin) => out.extend_from_slice(&FIN),
        Some(Chunk::Rst) => out.extend_from_slice(&RST),
        _ => {}
    }
    out
}

/// Decodes a whole byte string: the payload, how the direction ended, and any error. Used by
/// tests and the fuzz target.
pub fn decode_all(mut input: &[u8], split: usize) -> (Vec<u8>, End, Result<(), FrameError>) {
    let mut d = Deframer::new();
    let mut payload = Vec::new();
    let split = split.max(1);
    while !input.is_empty() {
        let piece = &input[..split.min(input.len())];
        let mut at = 0;
        while at < piece.len() {
            match d.decode(&piece[at..]) {
                Ok((used, chunk)) => {
                    if let Some(Chunk::Data(n)) = chunk {
                        payload.extend_from_slice(&piece[at + used - n..at + used]);
                    }
                    at += used;
                }
                Err(e) => return (payload, d.end(), Err(e)),
            }
        }
        input = &input[piece.len()..];
    }
    (payload, d.end(), Ok(()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn layout_is_stable() {
        assert_eq!(data_header(5), [1, 0, 0, 5]);
        assert_eq!(data_header(MAX_DATA), [1, 0, 0x7f, 0xfc]);
        assert_eq!(FRAME_HEADER_LEN + MAX_DATA, 32 * 1024);
        assert_eq!(FIN, [2, 0, 0, 0]);
        assert_eq!(RST, [3, 0, 0, 0]);
    }

    #[test]
    fn data_then_fin_in_one_piece_and_byte_by_byte() {
        let bytes = encode_all(b"hello world", Some(Chunk::Fin));
        for split in [1, 2, 3, 5, 64] {
            let (payload, end, r) = decode_all(&bytes, split);
            assert_eq!(r, Ok(()));
            assert_eq!(payload, b"hello world");
            assert_eq!(end, End::Fin);
        }
    }

    #[test]
    fn rst_is_an_end_and_nothing_may_follow() {
        let mut bytes = encode_all(b"x", Some(Chunk::Rst));
        let (_, end, r) = decode_all(&bytes, 100);
        assert_eq!((end, r), (End::Rst, Ok(())));
        bytes.extend_from_slice(&data_header(1));
        bytes.push(0);
        let (_, _, r) = decode_all(&bytes, 100);
        assert_eq!(r, Err(FrameError::AfterEnd));
        let mut bytes = encode_all(b"", Some(Chunk::Fin));
        bytes.extend_from_slice(&FIN);
        assert_eq!(decode_all(&bytes, 3).2, Err(FrameError::AfterEnd));
        // A reset may follow a half-close.
        let mut bytes = encode_all(b"abc", Some(Chunk::Fin));
        bytes.extend_from_slice(&RST);
        assert_eq!(decode_all(&bytes, 2), (b"abc".to_vec(), End::Rst, Ok(())));
        bytes.push(0);
        assert_eq!(decode_all(&bytes, 2).2, Err(FrameError::AfterEnd));
    }

    #[test]
    fn malformed_frames_are_named() {
        let cases: [(&[u8], FrameError); 6] = [
            (&[9, 0, 0, 0], FrameError::UnknownType(9)),
            (&[4, 1, 0, 1], FrameError::UnknownType(4)),
            (&[1, 0, 0, 0], FrameError::DataLength(0)),
            (&[1, 0, 0x7f, 0xfd], FrameError::DataLength(MAX_DATA + 1)),
            (&[2, 0, 0, 1], FrameError::ControlLength { kind: 2, len: 1 }),
            (&[3, 8, 0, 0], FrameError::Flags { kind: 3, flags: 8 }),
        ];
        for (bytes, err) in cases {
            assert_eq!(decode_all(bytes, 1).2, Err(err), "{bytes:?}");
        }
    }

    #[test]
    fn an_error_is_final() {
        let mut d = Deframer::new();
        assert_eq!(d.decode(&[1, 0, 0, 0]), Err(FrameError::DataLength(0)));
        assert_eq!(d.decode(&FIN), Err(FrameError::DataLength(0)));
        assert_eq!(d.decode(&[]), Err(FrameError::DataLength(0)));
    }

    #[test]
    fn a_cut_frame_is_visible() {
        let bytes = encode_all(b"abcdef", None);
        let mut d = Deframer::new();
        assert_eq!(d.decode(&bytes[..2]), Ok((2, None)));
        assert!(d.mid_frame());
        assert_eq!(d.decode(&bytes[2..7]), Ok((5, Some(Chunk::Data(3)))));
        assert_eq!(d.data_left(), 3);
        assert!(d.mid_frame());
        assert_eq!(d.decode(&bytes[7..]), Ok((3, Some(Chunk::Data(3)))));
        assert!(!d.mid_frame());
        assert_eq!(d.end(), End::Open);
    }

    proptest! {
        #[test]
        fn round_trips_in_any_split(
            payload in proptest::collection::vec(any::<u8>(), 0..100_000),
            split in 1usize..70_000,
            rst in any::<bool>(),
        ) {
            let end = if rst { Chunk::Rst } else { Chunk::Fin };
            let bytes = encode_all(&payload, Some(end));
            let (got, ended, r) = decode_all(&bytes, split);
            prop_assert_eq!(r, Ok(()));
            prop_assert_eq!(got, payload);
            prop_assert_eq!(ended, if rst { End::Rst } else { End::Fin });
        }

        #[test]
        fn arbitrary_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..256), split in 1usize..300) {
            let (payload, _, _) = decode_all(&bytes, split);
            prop_assert!(payload.len() <= bytes.len());
        }
    }
}
