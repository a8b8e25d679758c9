//! Fuzzes the payload deframer, which reads every byte the other daemon sends after the status.
//!
//! The input is a [`FrameInput`]: piece sizes, then a body. Two checks run on every input.
//!
//! The body as link bytes, fed to a `Deframer` in those pieces:
//! - it never panics, always makes progress, and never reports more payload than it consumed;
//! - once it has reported an end, nothing more is accepted: after a RST no byte at all, after a
//!   FIN nothing but a RST (TCP may reset a half-closed connection) or a CREDIT (for the other
//!   direction); every CREDIT returns 1 to `WINDOW`;
//! - the reader hands payload on at once and returns credit as it goes, so the window never
//!   trips, however the bytes are cut;
//! - nothing is accepted after an error either;
//! - the outcome (payload, end, error) does not depend on how the bytes were cut: `decode_all`
//!   over the whole body in one piece agrees with the pieces;
//! - a stream that decodes without error re-encodes (`encode_all`) to no more bytes than it
//!   took, and that encoding decodes (`decode_all`, cut in pieces of the first size) to the same
//!   payload and end.
//!
//! The body as a payload (padded if asked): `encode_all` with the chosen end costs one 4-byte
//! header per started DATA frame plus one for the end, and decoding it with `decode_all` in
//! pieces of the first size (and, given several sizes, with the `Deframer` in all of them) gives
//! back exactly that payload and end, with no frame left open.
//!
//! Errors latch: after an error every later byte is refused with it.
#![no_main]

use common::frame::{
    credit, decode_all, encode_all, Chunk, Deframer, End, FrameError, FIN, MAX_DATA, RST, WINDOW,
};
use fuzz_corpus::FrameInput;
use libfuzzer_sys::fuzz_target;

/// What decoding a byte string gave.
#[derive(Debug, PartialEq, Eq)]
struct Outcome {
    payload: Vec<u8>,
    end: End,
    error: Option<FrameError>,
    /// The stream stopped inside a frame (no error; more bytes were due).
    mid_frame: bool,
}

fn end_chunk(end: End) -> Option<Chunk> {
    match end {
        End::Open => None,
        End::Fin => Some(Chunk::Fin),
        End::Rst => Some(Chunk::Rst),
    }
}

/// No piece is smaller than `len / MAX_PIECES`: that keeps a 64 KiB round trip cut byte by byte
/// from costing 64 Ki calls per pass (every exact size stays reachable above that floor).
const MAX_PIECES: usize = 512;

/// The piece sizes for an input of `len` bytes: the fuzzer's, raised to the floor above.
fn pieces(splits: &[usize], len: usize) -> Vec<usize> {
    let floor = len.div_ceil(MAX_PIECES).max(1);
    splits.iter().map(|&s| s.max(floor)).collect()
}

/// Decodes `input` in pieces of the sizes in `splits` (cycled; empty: one piece), checking the
/// deframer's contract on every call. Stops at the first error, as the splice does.
///
/// The ends: after a RST nothing is accepted; after a FIN only a RST (TCP may reset a
/// half-closed connection) or a CREDIT, so a frame that starts with either type may still be
/// decoded, and may be malformed. Payload is handed on at once and credit returned as it goes,
/// as `decode_all` does.
fn drive(input: &[u8], splits: &[usize]) -> Outcome {
    let splits = pieces(splits, input.len());
    let mut d = Deframer::new();
    let mut payload = Vec::new();
    let mut rest = input;
    let mut turn = 0;
    while !rest.is_empty() {
        let size = if splits.is_empty() {
            rest.len()
        } else {
            splits[turn % splits.len()]
        };
        turn += 1;
        let (mut piece, tail) = rest.split_at(size.min(rest.len()));
        rest = tail;
        while !piece.is_empty() {
            let before = d.end();
            match d.decode(piece) {
                Ok((used, chunk)) => {
                    assert_ne!(before, End::Rst, "accepted {used} bytes after a RST");
                    assert!(
                        used > 0 && used <= piece.len(),
                        "used {used} of {}",
                        piece.len()
                    );
                    match chunk {
                        Some(Chunk::Data(n)) => {
                            assert_eq!(before, End::Open, "accepted data after a FIN");
                            assert!(n > 0 && n <= used, "data {n} of {used} used");
                            payload.extend_from_slice(&piece[used - n..used]);
                            assert_eq!(d.end(), End::Open);
                            d.delivered(n);
                        }
                        Some(Chunk::Credit(amount)) => {
                            assert_ne!(before, End::Rst);
                            assert!((1..=WINDOW).contains(&amount), "CREDIT of {amount}");
                            assert!(used <= 4 && !d.mid_frame());
                        }
                        Some(Chunk::Fin) => {
                            assert_eq!(before, End::Open, "a second FIN was accepted");
                            assert_eq!(d.end(), End::Fin);
                            assert!(!d.mid_frame());
                        }
                        Some(Chunk::Rst) => {
                            assert_eq!(d.end(), End::Rst);
                            assert!(!d.mid_frame());
                        }
                        Some(Chunk::Datagram { .. }) => panic!("a byte stream gave a datagram"),
                        None => {
                            // A partial header, or a DATA header with no payload in this piece.
                            assert_eq!(used, piece.len());
                            assert!(d.mid_frame());
                        }
                    }
                    let _ = d.credit_due();
                    piece = &piece[used..];
                }
                Err(e) => {
                    match before {
                        End::Open => assert!(
                            !matches!(e, FrameError::AfterEnd | FrameError::OverWindow),
                            "{e:?}"
                        ),
                        End::Rst => assert_eq!(e, FrameError::AfterEnd),
                        // A malformed RST or CREDIT after the FIN is named as what it is.
                        End::Fin => assert!(
                            matches!(
                                e,
                                FrameError::AfterEnd
                                    | FrameError::Flags { kind: 3, .. }
                                    | FrameError::ControlLength { kind: 3, .. }
                                    | FrameError::CreditAmount(_)
                            ),
                            "after a FIN: {e:?}"
                        ),
                    }
                    for more in [piece, rest, &FIN[..], &RST[..], &[1, 0, 0, 1, 0][..]] {
                        if !more.is_empty() {
                            let r = d.clone().decode(more);
                            assert!(r.is_err(), "accepted {more:?} after {e}: {r:?}");
                        }
                    }
                    assert!(payload.len() <= input.len());
                    return Outcome {
                        payload,
                        end: d.end(),
                        error: Some(e),
                        mid_frame: false,
                    };
                }
            }
        }
    }
    if !d.mid_frame() {
        probe_end(&d);
    }
    assert!(payload.len() <= input.len());
    Outcome {
        payload,
        end: d.end(),
        mid_frame: d.mid_frame(),
        error: None,
    }
}

/// Once a direction has ended, nothing more is accepted (at a frame boundary): no data and no
/// second FIN after a FIN, nothing at all after a RST. A RST or a CREDIT after a FIN may be
/// accepted.
fn probe_end(d: &Deframer) {
    let data: &[u8] = &[1, 0, 0, 1, 0];
    match d.end() {
        End::Open => {}
        End::Fin => {
            for more in [&FIN[..], data, &[0][..], &[1][..]] {
                assert_eq!(d.clone().decode(more), Err(FrameError::AfterEnd));
            }
            let r = d.clone().decode(&RST);
            assert!(
                matches!(r, Ok((4, Some(Chunk::Rst))) | Err(FrameError::AfterEnd)),
                "RST after FIN: {r:?}"
            );
            assert_eq!(
                d.clone().decode(&credit(1)),
                Ok((4, Some(Chunk::Credit(1))))
            );
        }
        End::Rst => {
            for more in [&FIN[..], &RST[..], data, &[0][..], &[3][..], &credit(1)[..]] {
                assert_eq!(d.clone().decode(more), Err(FrameError::AfterEnd));
            }
        }
    }
}

/// The same decoding through `decode_all`, which cuts into pieces of one size.
fn decode_all_outcome(input: &[u8], split: usize) -> (Vec<u8>, End, Option<FrameError>) {
    let split = split.max(input.len().div_ceil(MAX_PIECES));
    let (payload, end, r) = decode_all(input, split);
    (payload, end, r.err())
}

fn encoded_len(payload: usize, end: Option<Chunk>) -> usize {
    payload + 4 * payload.div_ceil(MAX_DATA) + if end.is_some() { 4 } else { 0 }
}

fuzz_target!(|data: &[u8]| {
    let input = FrameInput::parse(data);
    let first = input.splits.first().copied().unwrap_or(usize::MAX);

    // The body as bytes from the link: in the fuzzer's pieces, then in one piece.
    let got = drive(input.body, &input.splits);
    let whole = (got.payload.clone(), got.end, got.error);
    assert_eq!(decode_all_outcome(input.body, usize::MAX), whole);
    if got.error.is_none() {
        let end = end_chunk(got.end);
        let again = encode_all(&got.payload, end);
        assert_eq!(again.len(), encoded_len(got.payload.len(), end));
        if !got.mid_frame {
            assert!(again.len() <= input.body.len());
        }
        assert_eq!(decode_all_outcome(&again, first), whole);
    }

    // The body as a payload, through the encoder and back, in the fuzzer's pieces.
    let payload = input.round_trip_payload();
    let bytes = encode_all(&payload, input.end);
    assert_eq!(bytes.len(), encoded_len(payload.len(), input.end));
    let expected_end = match input.end {
        Some(Chunk::Fin) => End::Fin,
        Some(Chunk::Rst) => End::Rst,
        _ => End::Open,
    };
    let (back, end, error) = decode_all_outcome(&bytes, first);
    assert_eq!((end, error), (expected_end, None));
    assert!(
        back == payload,
        "round trip changed a {}-byte payload",
        payload.len()
    );
    if input.splits.len() > 1 {
        let back = drive(&bytes, &input.splits);
        assert_eq!(
            (back.end, back.error, back.mid_frame),
            (expected_end, None, false)
        );
        assert!(back.payload == payload);
    }
});
