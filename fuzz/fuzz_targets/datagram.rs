//! Fuzzes the datagram deframer, which reads every DNS (and later UDP) stream's bytes from the
//! other daemon.
//!
//! The input is a [`FrameInput`]: piece sizes, then a body. Two checks run on every input.
//!
//! The body as link bytes, fed to `Deframer::datagrams()` in those pieces, as a reader that hands
//! each datagram on at once and returns credit as it goes:
//! - it never panics, always makes progress, and never reports more payload than it consumed;
//! - no datagram is longer than `MAX_DATAGRAM`, and none is reported ended twice;
//! - after an error nothing more is accepted;
//! - the datagrams, the end and the error do not depend on how the bytes were cut.
//!
//! The body as one datagram (cut to `MAX_DATAGRAM`): `encode_datagram` then decoding in the
//! fuzzer's pieces gives back exactly that datagram, costing what the encoder said.
#![no_main]

use common::frame::{
    cost, encode_datagram, Chunk, Deframer, End, FrameError, FIN, MAX_DATA, MAX_DATAGRAM,
};
use fuzz_corpus::FrameInput;
use libfuzzer_sys::fuzz_target;

/// What decoding gave: the whole datagrams, the bytes of one left open, the end, any error.
#[derive(Debug, PartialEq, Eq)]
struct Outcome {
    datagrams: Vec<Vec<u8>>,
    open: Vec<u8>,
    end: End,
    error: Option<FrameError>,
}

fn drive(input: &[u8], splits: &[usize]) -> Outcome {
    let floor = input.len().div_ceil(512).max(1);
    let mut d = Deframer::datagrams();
    let mut out = Outcome {
        datagrams: Vec::new(),
        open: Vec::new(),
        end: End::Open,
        error: None,
    };
    let mut rest = input;
    let mut turn = 0;
    while !rest.is_empty() {
        let size = match splits {
            [] => rest.len(),
            _ => splits[turn % splits.len()].max(floor),
        };
        turn += 1;
        let (mut piece, tail) = rest.split_at(size.min(rest.len()));
        rest = tail;
        while !piece.is_empty() {
            match d.decode(piece) {
                Ok((used, chunk)) => {
                    assert!(used > 0 && used <= piece.len());
                    match chunk {
                        Some(Chunk::Datagram { n, end }) => {
                            assert!(n <= used && n <= MAX_DATA);
                            out.open.extend_from_slice(&piece[used - n..used]);
                            assert!(out.open.len() <= MAX_DATAGRAM);
                            d.delivered(n);
                            if end {
                                out.datagrams.push(std::mem::take(&mut out.open));
                            }
                        }
                        Some(Chunk::Data(_)) => panic!("DATA on a datagram stream"),
                        Some(Chunk::Credit(_) | Chunk::Fin | Chunk::Rst) | None => {}
                    }
                    let _ = d.credit_due();
                    piece = &piece[used..];
                }
                Err(e) => {
                    for more in [piece, rest, &FIN[..], &[4, 0, 0, 0][..]] {
                        if !more.is_empty() {
                            assert!(d.clone().decode(more).is_err(), "accepted bytes after {e}");
                        }
                    }
                    out.end = d.end();
                    out.error = Some(e);
                    return out;
                }
            }
        }
    }
    out.end = d.end();
    out
}

fuzz_target!(|data: &[u8]| {
    let input = FrameInput::parse(data);
    let got = drive(input.body, &input.splits);
    let total: usize = got.datagrams.iter().map(Vec::len).sum::<usize>() + got.open.len();
    assert!(total <= input.body.len());
    assert_eq!(
        drive(input.body, &[]),
        got,
        "the outcome depends on the cut"
    );

    let datagram = &input.body[..input.body.len().min(MAX_DATAGRAM)];
    let mut bytes = Vec::new();
    let spent = encode_datagram(&mut bytes, datagram);
    let pieces = datagram.len().div_ceil(MAX_DATA).max(1);
    assert_eq!(bytes.len(), datagram.len() + 4 * pieces);
    assert!(spent >= cost(0) && spent >= bytes.len());
    let back = drive(&bytes, &input.splits);
    assert_eq!(back.error, None);
    assert!(back.open.is_empty());
    assert!(back.datagrams.len() == 1 && back.datagrams[0] == datagram);
});
