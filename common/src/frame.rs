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
//!  type 4 DATAGRAM  length 0..=32764, flags bit 0 "more of this datagram follows": a piece of a
//!                  datagram (DNS, UDP) on a datagram stream; a datagram of up to 65,535 bytes
//!                  is its pieces in order, the last without the bit (an empty datagram is one
//!                  empty piece)
//!  type 5 CREDIT  flags and length together: a 24-bit amount of window given back (1..=WINDOW)
//!  flags        0 for types 1-3
//! ```
//!
//! A stream carries either DATA frames (TCP) or DATAGRAM frames (its header's kind says which,
//! [`crate::wire::Kind::datagrams`]), never both.
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
//! # The window (protocol version 3)
//!
//! vsock meters its flow control in bytes only, but since Linux 6.12.92 a receiver also resets
//! a connection once the *number* of packets queued on it costs more than its buffer: every
//! queued packet costs about 576 bytes of bookkeeping, so 455 packets fill the default 256 KiB
//! whatever they carry (DESIGN.md). A sender that trickles small frames to a receiver that has
//! stopped reading gets there long before the byte credit runs out. So each direction has a
//! window that counts both bytes and frames:
//!
//! - every DATA frame costs its length with header, but at least [`MIN_COST`]; a side may have at
//!   most [`WINDOW`] of cost unreturned, hence at most [`WINDOW_FRAMES`] frames and
//!   [`WINDOW`] bytes;
//! - the receiver returns a frame's cost in CREDIT frames: the part above the payload as soon as
//!   the frame is read off the link, the payload once it has been handed on (written to the TCP
//!   peer, or queued on the smoltcp socket). It sends a CREDIT once [`CREDIT_EVERY`] is owed, so
//!   a sender at the window is always answered, with one 4-byte frame per quarter window;
//! - because everything a peer may send fits the window, a receiver reads its link at all times,
//!   keeping payload it cannot hand on yet in a backlog (at most [`WINDOW`] bytes). CREDITs
//!   therefore never wait behind unread data: a window whose ACKs queue behind data deadlocks an
//!   application that writes everything before it reads (found by the 64 MiB each-way test);
//! - a sender whose window is closed stops reading its own source. The bytes wait in the kernel
//!   (or in smoltcp) and leave as one large frame when credit returns: under back-pressure frames
//!   grow, they never trickle. At most `WINDOW_FRAMES` DATA frames plus a few CREDITs are ever
//!   queued on a link, well under the 455 of the smallest vsock buffer.
//!
//! CREDIT frames travel in the other direction's frame sequence, so they may follow its FIN. A
//! peer that sends beyond the window, or returns more than it was sent, is broken: the stream is
//! reset.
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
const TYPE_DATAGRAM: u8 = 4;
const TYPE_CREDIT: u8 = 5;
/// DATAGRAM flag: more pieces of this datagram follow.
const MORE: u8 = 1;
/// The largest datagram a stream carries (the largest UDP payload over IPv6 jumbograms aside).
pub const MAX_DATAGRAM: usize = 65_535;

/// The most cost a side may have sent and not had returned, and what a receiver may have to hold
/// for one direction of one connection. It is twice host-proxy's default vsock buffer (2 MiB,
/// itself chosen because 256 KiB stalls multi-gigabit streams): a window smaller than what the
/// link can buffer becomes the limit. At 1 MiB it was, on the 2-core test machine, where a
/// CREDIT waits for a process to be scheduled: single-stream enclave->client throughput fell by
/// a quarter to a third against the unwindowed protocol (README, "The window").
pub const WINDOW: usize = 4 << 20;
/// The most DATA frames a side may have unreturned: 128 frames and as many CREDITs stay far
/// below the 455 queued packets at which a 256 KiB vsock buffer resets.
pub const WINDOW_FRAMES: usize = 128;
/// What the smallest DATA frame costs: with a 4 MiB window, as much as the largest, so the
/// window is in effect 128 frames of up to 32 KiB each.
pub const MIN_COST: usize = WINDOW / WINDOW_FRAMES;
/// A receiver returns cost once this much is owed.
pub const CREDIT_EVERY: usize = WINDOW / 4;

/// What a DATA frame of `len` payload bytes costs against the window.
pub fn cost(len: usize) -> usize {
    (len + FRAME_HEADER_LEN).max(MIN_COST)
}

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

/// The CREDIT frame returning `amount` (1 to [`WINDOW`]) of the window.
pub fn credit(amount: usize) -> [u8; FRAME_HEADER_LEN] {
    debug_assert!((1..=WINDOW).contains(&amount), "CREDIT of {amount}");
    let [_, a, b, c] = (amount as u32).to_be_bytes();
    [TYPE_CREDIT, a, b, c]
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
    /// Bytes other than a RST or a CREDIT followed a FIN, or anything followed a RST.
    #[error("bytes after the end of the direction")]
    AfterEnd,
    /// A CREDIT returned nothing, or more than the window.
    #[error("CREDIT of {0} (must be 1 to {WINDOW})")]
    CreditAmount(usize),
    /// A CREDIT returned more than was sent and not yet returned.
    #[error("CREDIT of {amount} when {outstanding} was outstanding")]
    CreditBeyondSent {
        /// The CREDIT's amount.
        amount: usize,
        /// Cost sent and not yet returned.
        outstanding: usize,
    },
    /// The peer sent more than the window before it was returned.
    #[error("DATA beyond the window of {WINDOW}")]
    OverWindow,
    /// A DATAGRAM piece was longer than [`MAX_DATA`], or empty without ending a datagram.
    #[error("DATAGRAM piece of {0} bytes")]
    DatagramPiece(usize),
    /// A datagram's pieces added up to more than [`MAX_DATAGRAM`].
    #[error("datagram longer than {MAX_DATAGRAM} bytes")]
    DatagramLength,
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
    /// The peer returned this much of our window.
    Credit(usize),
    /// The last `n` bytes consumed are part of a datagram; `end` says the datagram is complete.
    Datagram {
        /// Payload bytes.
        n: usize,
        /// The datagram ends here.
        end: bool,
    },
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
    /// The stream carries DATAGRAM frames instead of DATA frames.
    datagrams: bool,
    /// The DATAGRAM piece being decoded is not the datagram's last.
    more: bool,
    /// Bytes of the datagram being decoded so far.
    datagram_len: usize,
    /// Cost of the DATA frames read and not yet returned: at most [`WINDOW`].
    held: usize,
    /// The part of `held` that is free again and owed to the peer.
    owed: usize,
}

impl Deframer {
    /// A decoder at the start of the payload of a byte stream (DATA frames).
    pub fn new() -> Deframer {
        Deframer::default()
    }

    /// A decoder at the start of the payload of a datagram stream (DATAGRAM frames).
    pub fn datagrams() -> Deframer {
        Deframer {
            datagrams: true,
            ..Deframer::default()
        }
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

    /// Notes that `n` payload bytes have been handed on (to the TCP peer or the socket), so
    /// their cost is owed back to the peer.
    pub fn delivered(&mut self, n: usize) {
        self.owed += n;
        debug_assert!(self.owed <= self.held, "delivered more than was read");
    }

    /// The CREDIT frame to send now, if [`CREDIT_EVERY`] is owed. Taking it counts the cost
    /// returned; the caller must send it. Once the peer has ended its direction it sends no
    /// more DATA, so it is owed nothing (and may already have closed the link).
    pub fn credit_due(&mut self) -> Option<[u8; FRAME_HEADER_LEN]> {
        if self.owed < CREDIT_EVERY || self.end != End::Open {
            return None;
        }
        self.held -= self.owed;
        Some(credit(std::mem::take(&mut self.owed)))
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

    /// What `n` payload bytes just decoded are: stream data, or a piece of a datagram, which
    /// ends with the last byte of a piece without the "more" flag.
    fn payload(&mut self, n: usize) -> Chunk {
        if !self.datagrams {
            return Chunk::Data(n);
        }
        let end = self.data_left == 0 && !self.more;
        if end {
            self.datagram_len = 0;
        }
        Chunk::Datagram { n, end }
    }

    fn decode_inner(&mut self, input: &[u8]) -> Result<(usize, Option<Chunk>), FrameError> {
        // After a FIN only a RST (TCP allows a reset after a half-close) or a CREDIT (for the
        // other direction) may follow.
        let kind = if self.have == 0 {
            input[0]
        } else {
            self.header[0]
        };
        if self.end == End::Rst || (self.end == End::Fin && !matches!(kind, TYPE_RST | TYPE_CREDIT))
        {
            return Err(FrameError::AfterEnd);
        }
        if self.data_left > 0 {
            let n = self.data_left.min(input.len());
            self.data_left -= n;
            return Ok((n, Some(self.payload(n))));
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
        if kind == TYPE_CREDIT {
            let amount = (usize::from(flags) << 16) | len;
            if amount == 0 || amount > WINDOW {
                return Err(FrameError::CreditAmount(amount));
            }
            return Ok((take, Some(Chunk::Credit(amount))));
        }
        let payload_type = if self.datagrams {
            TYPE_DATAGRAM
        } else {
            TYPE_DATA
        };
        if kind != payload_type && !matches!(kind, TYPE_FIN | TYPE_RST) {
            return Err(FrameError::UnknownType(kind));
        }
        let allowed = if kind == TYPE_DATAGRAM { MORE } else { 0 };
        if flags & !allowed != 0 {
            return Err(FrameError::Flags { kind, flags });
        }
        match kind {
            TYPE_DATA | TYPE_DATAGRAM => {
                if kind == TYPE_DATA && (len == 0 || len > MAX_DATA) {
                    return Err(FrameError::DataLength(len));
                }
                if kind == TYPE_DATAGRAM {
                    self.more = flags & MORE != 0;
                    if len > MAX_DATA || (len == 0 && self.more) {
                        return Err(FrameError::DatagramPiece(len));
                    }
                    self.datagram_len += len;
                    if self.datagram_len > MAX_DATAGRAM {
                        return Err(FrameError::DatagramLength);
                    }
                }
                let cost = cost(len);
                if self.held + cost > WINDOW {
                    return Err(FrameError::OverWindow);
                }
                self.held += cost;
                // The frame is off the link: all but its payload is free already.
                self.owed += cost - len;
                let n = len.min(input.len() - take);
                self.data_left = len - n;
                if n == 0 && self.data_left > 0 {
                    return Ok((take, None));
                }
                Ok((take + n, Some(self.payload(n))))
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

/// The sender's side of the window: how much it has sent and not had returned.
#[derive(Debug, Clone, Copy, Default)]
pub struct SendWindow {
    outstanding: usize,
}

impl SendWindow {
    /// The most payload the next DATA frame may carry now (0: the window is closed). Reading no
    /// more than this from the source, and framing what was read, keeps within the window.
    pub fn room(&self) -> usize {
        let free = WINDOW - self.outstanding;
        if free < MIN_COST {
            0
        } else {
            (free - FRAME_HEADER_LEN).min(MAX_DATA)
        }
    }

    /// Counts a DATA frame of `len` payload bytes sent (at most [`SendWindow::room`]).
    pub fn sent(&mut self, len: usize) {
        debug_assert!(len <= self.room(), "DATA frame of {len} beyond the window");
        self.outstanding += cost(len);
    }

    /// Counts frames costing `cost` sent if the window has room for them all; a datagram that
    /// does not fit is dropped rather than waited for.
    pub fn try_send(&mut self, cost: usize) -> bool {
        if self.outstanding + cost > WINDOW {
            return false;
        }
        self.outstanding += cost;
        true
    }

    /// Applies the peer's CREDIT of `amount`.
    pub fn credited(&mut self, amount: usize) -> Result<(), FrameError> {
        if amount > self.outstanding {
            return Err(FrameError::CreditBeyondSent {
                amount,
                outstanding: self.outstanding,
            });
        }
        self.outstanding -= amount;
        Ok(())
    }
}

/// Payload read off the link that its destination cannot take yet. The peer keeps within the
/// window, so it never holds more than [`WINDOW`] bytes.
///
/// It is kept in blocks of [`BACKLOG_BLOCK`] bytes, each handed back as soon as it has been
/// written out, so a connection that has gone quiet holds nothing. Blocks come from and go back
/// to a small pool per thread: a bulk transfer fills and empties its backlog continually, and
/// taking fresh memory each time cost page faults (and, for one large buffer, an `mmap` and
/// `munmap` per refill).
#[derive(Debug, Default)]
pub struct Backlog {
    blocks: std::collections::VecDeque<Block>,
    /// Bytes of the first block already handed on.
    head: usize,
    len: usize,
}

/// The size of a [`Backlog`] block: two of the largest DATA frames.
pub const BACKLOG_BLOCK: usize = 64 * 1024;
/// Blocks a thread keeps for reuse: one window's worth.
const POOL_BLOCKS: usize = WINDOW / BACKLOG_BLOCK;

#[derive(Debug)]
struct Block {
    buf: Box<[u8]>,
    filled: usize,
}

thread_local! {
    static POOL: std::cell::RefCell<Vec<Box<[u8]>>> = const { std::cell::RefCell::new(Vec::new()) };
}

impl Block {
    fn take() -> Block {
        let buf = POOL
            .with(|p| p.borrow_mut().pop())
            .unwrap_or_else(|| vec![0; BACKLOG_BLOCK].into_boxed_slice());
        Block { buf, filled: 0 }
    }

    fn give_back(self) {
        // During thread teardown the pool may be gone already: the block is simply freed.
        let _ = POOL.try_with(|p| {
            let mut pool = p.borrow_mut();
            if pool.len() < POOL_BLOCKS {
                pool.push(self.buf);
            }
        });
    }
}

impl Backlog {
    /// Whether nothing is waiting.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Bytes waiting.
    pub fn len(&self) -> usize {
        self.len
    }

    /// Queues payload behind what is waiting.
    pub fn push(&mut self, mut payload: &[u8]) {
        self.len += payload.len();
        while !payload.is_empty() {
            let block = match self.blocks.back_mut() {
                Some(b) if b.filled < BACKLOG_BLOCK => b,
                _ => {
                    self.blocks.push_back(Block::take());
                    self.blocks.back_mut().expect("just pushed")
                }
            };
            let n = payload.len().min(BACKLOG_BLOCK - block.filled);
            block.buf[block.filled..block.filled + n].copy_from_slice(&payload[..n]);
            block.filled += n;
            payload = &payload[n..];
        }
    }

    /// The oldest waiting bytes, in one piece of at most [`BACKLOG_BLOCK`] (the rest follows
    /// once it is consumed).
    pub fn front(&self) -> &[u8] {
        self.blocks
            .front()
            .map_or(&[], |b| &b.buf[self.head..b.filled])
    }

    /// Drops the first `n` bytes of [`Backlog::front`], which have been handed on.
    pub fn consume(&mut self, n: usize) {
        debug_assert!(n <= self.front().len());
        self.head += n;
        self.len -= n;
        if let Some(first) = self.blocks.front() {
            // A block is done once read to its end, unless it is the last and may fill further.
            if self.head == first.filled && (self.blocks.len() > 1 || self.len == 0) {
                if let Some(block) = self.blocks.pop_front() {
                    block.give_back();
                }
                self.head = 0;
            }
        }
    }
}

impl Drop for Backlog {
    fn drop(&mut self) {
        for block in self.blocks.drain(..) {
            block.give_back();
        }
    }
}

/// Appends `datagram` (at most [`MAX_DATAGRAM`] bytes) to `out` as DATAGRAM frames; returns
/// what they cost against the window.
pub fn encode_datagram(out: &mut Vec<u8>, datagram: &[u8]) -> usize {
    debug_assert!(datagram.len() <= MAX_DATAGRAM);
    let mut pieces = datagram.chunks(MAX_DATA).peekable();
    if pieces.peek().is_none() {
        out.extend_from_slice(&[TYPE_DATAGRAM, 0, 0, 0]);
        return cost(0);
    }
    let mut total = 0;
    while let Some(piece) = pieces.next() {
        let flags = if pieces.peek().is_some() { MORE } else { 0 };
        let [hi, lo] = (piece.len() as u16).to_be_bytes();
        out.extend_from_slice(&[TYPE_DATAGRAM, flags, hi, lo]);
        out.extend_from_slice(piece);
        total += cost(piece.len());
    }
    total
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

/// Decodes a whole byte string: the payload, how the direction ended, and any error, as a
/// reader that hands payload on at once and returns credit as it goes (CREDITs it receives are
/// skipped). Used by tests and the fuzz target.
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
                        d.delivered(n);
                    }
                    let _ = d.credit_due();
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

    #[test]
    fn a_backlog_hands_on_every_byte_in_order_and_holds_no_block_once_empty() {
        let data: Vec<u8> = (0..300_000u32).map(|i| (i * 13 + i / 7) as u8).collect();
        let mut b = Backlog::default();
        let mut out = Vec::new();
        let mut pushed = 0;
        // Pushes and partial hand-ons interleaved, across block edges.
        for (k, chunk) in data.chunks(9_999).enumerate() {
            b.push(chunk);
            pushed += chunk.len();
            let take = b.front().len().min(k * 3_001 % 20_000 + 1);
            out.extend_from_slice(&b.front()[..take]);
            b.consume(take);
            assert_eq!(b.len(), pushed - out.len());
            assert!(b.front().len() <= BACKLOG_BLOCK);
        }
        while !b.is_empty() {
            let n = b.front().len();
            out.extend_from_slice(b.front());
            b.consume(n);
        }
        assert!(out == data);
        assert!(b.blocks.is_empty(), "a quiet backlog keeps no memory");
        b.push(b"again");
        assert_eq!(b.front(), b"again");
    }
    use proptest::prelude::*;

    #[test]
    fn layout_is_stable() {
        assert_eq!(data_header(5), [1, 0, 0, 5]);
        assert_eq!(data_header(MAX_DATA), [1, 0, 0x7f, 0xfc]);
        assert_eq!(FRAME_HEADER_LEN + MAX_DATA, 32 * 1024);
        assert_eq!(FIN, [2, 0, 0, 0]);
        assert_eq!(RST, [3, 0, 0, 0]);
        assert_eq!(credit(CREDIT_EVERY), [5, 0x10, 0, 0]);
        assert_eq!(credit(1), [5, 0, 0, 1]);
        assert_eq!(
            (MIN_COST, cost(1), cost(MAX_DATA)),
            (32 * 1024, 32 * 1024, 32 * 1024)
        );
    }

    /// A reader returns a small frame's overhead when it reads it, its payload when it hands it
    /// on; a peer past the window is refused, and credit reopens it.
    #[test]
    fn the_window_counts_frames_and_bytes_and_is_enforced() {
        let one = [1, 0, 0, 1, 7];
        let mut d = Deframer::new();
        for i in 1..=WINDOW_FRAMES {
            assert_eq!(d.decode(&one), Ok((5, Some(Chunk::Data(1)))));
            // With no payload handed on yet, a quarter window of overhead is owed after 33 frames.
            let owed = i * (MIN_COST - 1);
            let due = (owed >= CREDIT_EVERY).then(|| credit(owed));
            assert_eq!(d.clone().credit_due(), due, "after {i} frames");
        }
        assert_eq!(d.clone().decode(&one), Err(FrameError::OverWindow));
        // Returning the overhead of the frames read leaves only their undelivered payload held.
        assert_eq!(d.credit_due(), Some(credit(WINDOW_FRAMES * (MIN_COST - 1))));
        assert_eq!(d.decode(&one), Ok((5, Some(Chunk::Data(1)))));
        d.delivered(WINDOW_FRAMES + 1);
        assert_eq!(d.credit_due(), None, "129 bytes are not worth a CREDIT");
        // The sender's side of the same exchange.
        let mut w = SendWindow::default();
        for _ in 0..WINDOW_FRAMES {
            w.sent(1);
        }
        assert_eq!(w.room(), 0);
        w.credited(WINDOW_FRAMES * (MIN_COST - 1)).unwrap();
        assert_eq!(w.room(), MAX_DATA);

        // Large frames: bytes are the limit, and a frame is never cut to fit.
        let mut d = Deframer::new();
        let full = encode_all(&vec![0u8; MAX_DATA], None);
        for _ in 0..WINDOW / cost(MAX_DATA) {
            assert_eq!(d.decode(&full).unwrap().0, full.len());
        }
        assert_eq!(d.clone().decode(&full), Err(FrameError::OverWindow));
        // Handing payload on frees nothing until the CREDIT for it is sent.
        let frames_per_credit = CREDIT_EVERY / MAX_DATA;
        d.delivered((frames_per_credit - 1) * MAX_DATA);
        assert_eq!(d.clone().decode(&full), Err(FrameError::OverWindow));
        assert_eq!(d.credit_due(), None);
        d.delivered(MAX_DATA);
        assert!(d.credit_due().is_some());
        assert_eq!(d.decode(&full).unwrap().0, full.len());
    }

    #[test]
    fn a_send_window_fills_exactly_and_refuses_false_credit() {
        let mut w = SendWindow::default();
        let mut sent = 0;
        while w.room() > 0 {
            let len = w.room().min(1000);
            w.sent(len);
            sent += cost(len);
        }
        assert!(sent <= WINDOW && WINDOW - sent < MIN_COST, "{sent}");
        assert_eq!(
            w.credited(sent + 1),
            Err(FrameError::CreditBeyondSent {
                amount: sent + 1,
                outstanding: sent
            })
        );
        w.credited(sent).unwrap();
        assert_eq!(w.room(), MAX_DATA);
    }

    #[test]
    fn nothing_is_owed_after_the_peer_has_ended() {
        let bytes = encode_all(&vec![1u8; CREDIT_EVERY], None);
        let mut d = Deframer::new();
        let mut at = 0;
        while at < bytes.len() {
            at += d.decode(&bytes[at..]).unwrap().0;
        }
        d.delivered(CREDIT_EVERY);
        assert!(d.clone().credit_due().is_some());
        d.decode(&FIN).unwrap();
        assert_eq!(d.credit_due(), None);
    }

    #[test]
    fn credits_decode_and_may_follow_a_fin_but_not_a_rst() {
        let mut bytes = encode_all(b"abc", Some(Chunk::Fin));
        bytes.extend_from_slice(&credit(WINDOW));
        let mut d = Deframer::new();
        let mut at = 0;
        let mut chunks = Vec::new();
        while at < bytes.len() {
            let (used, chunk) = d.decode(&bytes[at..]).unwrap();
            chunks.push(chunk);
            at += used;
        }
        assert_eq!(
            chunks,
            [
                Some(Chunk::Data(3)),
                Some(Chunk::Fin),
                Some(Chunk::Credit(WINDOW))
            ]
        );
        let mut bytes = encode_all(b"", Some(Chunk::Rst));
        bytes.extend_from_slice(&credit(1));
        assert_eq!(decode_all(&bytes, 4).2, Err(FrameError::AfterEnd));
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
        let cases: [(&[u8], FrameError); 9] = [
            (&[9, 0, 0, 0], FrameError::UnknownType(9)),
            (&[4, 1, 0, 1], FrameError::UnknownType(4)),
            (&[4, 0, 0, 0], FrameError::UnknownType(4)),
            (&[1, 0, 0, 0], FrameError::DataLength(0)),
            (&[1, 0, 0x7f, 0xfd], FrameError::DataLength(MAX_DATA + 1)),
            (&[2, 0, 0, 1], FrameError::ControlLength { kind: 2, len: 1 }),
            (&[3, 8, 0, 0], FrameError::Flags { kind: 3, flags: 8 }),
            (&[5, 0, 0, 0], FrameError::CreditAmount(0)),
            (&[5, 0x40, 0, 1], FrameError::CreditAmount(WINDOW + 1)),
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

    /// Decodes a datagram stream cut into pieces of `split` bytes, as a reader that hands each
    /// datagram on at once.
    fn decode_datagrams(input: &[u8], split: usize) -> Result<(Vec<Vec<u8>>, End), FrameError> {
        let mut d = Deframer::datagrams();
        let (mut done, mut current) = (Vec::new(), Vec::new());
        for piece in input.chunks(split.max(1)) {
            let mut at = 0;
            while at < piece.len() {
                let (used, chunk) = d.decode(&piece[at..])?;
                if let Some(Chunk::Datagram { n, end }) = chunk {
                    current.extend_from_slice(&piece[at + used - n..at + used]);
                    d.delivered(n);
                    if end {
                        done.push(std::mem::take(&mut current));
                    }
                }
                let _ = d.credit_due();
                at += used;
            }
        }
        assert!(current.is_empty() || d.mid_frame() || d.more);
        Ok((done, d.end()))
    }

    #[test]
    fn datagrams_keep_their_boundaries_whatever_their_size() {
        let sizes = [
            0,
            1,
            512,
            MAX_DATA,
            MAX_DATA + 1,
            2 * MAX_DATA,
            MAX_DATAGRAM,
            3,
        ];
        let datagrams: Vec<Vec<u8>> = sizes
            .iter()
            .map(|&n| (0..n).map(|i| (i * 7 + n) as u8).collect())
            .collect();
        let mut bytes = Vec::new();
        let mut costs = 0;
        for d in &datagrams {
            costs += encode_datagram(&mut bytes, d);
        }
        // Six pieces below the minimum cost (0, 1, 512, the tails of MAX_DATA + 1 and 65,535, 3),
        // six full ones.
        assert_eq!(costs, 6 * MIN_COST + 6 * MAX_WRITE);
        bytes.extend_from_slice(&FIN);
        for split in [1, 3, 4, 5, 1000, 70_000] {
            assert_eq!(
                decode_datagrams(&bytes, split),
                Ok((datagrams.clone(), End::Fin)),
                "split {split}"
            );
        }
    }

    #[test]
    fn malformed_datagram_frames_are_named() {
        let too_long = {
            let mut b = Vec::new();
            encode_datagram(&mut b, &vec![0; MAX_DATAGRAM]);
            // One more byte in the last piece's length, and the byte itself.
            let last = b.len() - (MAX_DATAGRAM - 2 * MAX_DATA) - FRAME_HEADER_LEN;
            b[last + 3] += 1;
            b.push(0);
            b
        };
        let cases: [(&[u8], FrameError); 5] = [
            (&[1, 0, 0, 1, 0], FrameError::UnknownType(1)),
            (&[4, 1, 0, 0], FrameError::DatagramPiece(0)),
            (&[4, 0, 0x7f, 0xfd], FrameError::DatagramPiece(MAX_DATA + 1)),
            (&[4, 2, 0, 0], FrameError::Flags { kind: 4, flags: 2 }),
            (&too_long, FrameError::DatagramLength),
        ];
        for (bytes, err) in cases {
            assert_eq!(decode_datagrams(bytes, 7), Err(err), "{:?}", &bytes[..4]);
        }
        // A byte stream takes no DATAGRAM frames.
        assert_eq!(
            decode_all(&[4, 0, 0, 0], 1).2,
            Err(FrameError::UnknownType(4))
        );
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
