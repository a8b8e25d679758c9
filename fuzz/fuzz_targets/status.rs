//! Fuzzes the status reply decoder, the answer a daemon reads after sending a header.
//!
//! Whatever the bytes, decoding never panics, and:
//! - a decoded status re-encodes to the same four bytes (the reserved byte must be zero);
//! - fewer than four bytes always ask for exactly four;
//! - a reply of another protocol version is refused as `BadVersion`.
#![no_main]

use common::wire::{DecodeError, Status, STATUS_LEN, STATUS_MARKER, VERSION};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    match Status::decode(data) {
        Ok(status) => {
            assert!(data.len() >= STATUS_LEN);
            assert_eq!(&status.encode()[..], &data[..4]);
            assert_eq!(Status::decode(&status.encode()), Ok(status));
            assert!(!status.as_str().is_empty());
        }
        Err(DecodeError::Incomplete(need)) => {
            assert_eq!(need, STATUS_LEN);
            assert!(data.len() < STATUS_LEN);
        }
        Err(DecodeError::BadVersion(v)) => assert_ne!(v, VERSION),
        Err(DecodeError::BadStatusMarker(m)) => assert_ne!(m, STATUS_MARKER),
        Err(DecodeError::BadStatusCode(_)) => {}
        Err(DecodeError::BadStatusReserved(r)) => assert_ne!(r, 0),
        Err(other) => panic!("a status decode gave a header error: {other:?}"),
    }
    if data.len() >= STATUS_LEN && data[0] == STATUS_MARKER && data[1] != VERSION {
        assert_eq!(Status::decode(data), Err(DecodeError::BadVersion(data[1])));
    }
});
