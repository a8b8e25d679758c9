//! Fuzzes the stream header decoder, the first bytes a daemon reads from the other one.
//!
//! Whatever the bytes, decoding never panics, and:
//! - a decoded header re-encodes to exactly the bytes it was read from, its ports are not 0, and
//!   every shorter prefix of those bytes asks for more (the incremental reader's contract);
//! - "need more" always names a length beyond what was given, and never beyond the largest header;
//! - a header of another protocol version is refused as `BadVersion`, whatever follows, so a
//!   version-1 peer gets a clear error.
#![no_main]

use common::wire::{DecodeError, Header, FIXED_LEN, MAGIC, MAX_HEADER_LEN, VERSION};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    match Header::decode(data) {
        Ok((header, used)) => {
            assert!(used <= data.len() && used <= MAX_HEADER_LEN);
            assert_eq!(used, header.encoded_len());
            assert_eq!(Header::total_len(data), Ok(used));
            assert_eq!(data[4], VERSION);
            assert_ne!(header.src.port(), 0);
            assert_ne!(header.dst.port(), 0);
            let (buf, len) = header.encode();
            assert_eq!(len, used);
            assert_eq!(&buf[..len], &data[..used]);
            for cut in 0..used {
                match Header::decode(&data[..cut]) {
                    Err(DecodeError::Incomplete(need)) => assert!(need > cut && need <= used),
                    other => panic!("prefix of {cut} bytes of a valid header gave {other:?}"),
                }
            }
        }
        Err(DecodeError::Incomplete(need)) => {
            assert!(need > data.len() && need <= MAX_HEADER_LEN)
        }
        Err(DecodeError::BadVersion(v)) => assert_ne!(v, VERSION),
        Err(_) => {}
    }
    if data.len() >= FIXED_LEN && data[..4] == MAGIC && data[4] != VERSION {
        assert_eq!(Header::decode(data), Err(DecodeError::BadVersion(data[4])));
    }
});
