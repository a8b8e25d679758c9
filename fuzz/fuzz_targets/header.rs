//! Fuzzes the decoders that read bytes from the untrusted peer: the stream header and the
//! status reply. Anything decoded must re-encode to the same bytes.
#![no_main]

use common::wire::{Header, Status};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok((header, used)) = Header::decode(data) {
        let (buf, len) = header.encode();
        assert_eq!(len, used);
        assert_eq!(&buf[..len], &data[..used]);
    }
    if let Ok(status) = Status::decode(data) {
        assert_eq!(&status.encode()[..3], &data[..3]);
    }
});
