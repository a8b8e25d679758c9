//! Fuzzes what host-proxy does with a DNS datagram from the enclave before any resolver sees it:
//! telling a query from anything else, and the SERVFAIL answer it gives when no resolver answers.
//!
//! Whatever the bytes, nothing panics, and for a query the SERVFAIL answer:
//! - keeps the id, the opcode and RD, sets QR and RA, has RCODE 2 and no records;
//! - is no longer than the query (it is the header and at most the question section);
//! - echoes the question section byte for byte when it keeps it;
//! - is not itself taken for a query.
#![no_main]

use common::dns::{is_query, servfail, HEADER_LEN};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if !is_query(data) {
        assert!(data.len() < HEADER_LEN || data[2] & 0x80 != 0);
        return;
    }
    let a = servfail(data);
    assert!(a.len() >= HEADER_LEN && a.len() <= data.len());
    assert_eq!(a[..2], data[..2]);
    assert_eq!(a[2], 0x80 | (data[2] & 0x79));
    assert_eq!(a[3], 0x82);
    assert_eq!(a[6..12], [0; 6]);
    let qd = u16::from_be_bytes([a[4], a[5]]);
    if a.len() > HEADER_LEN {
        assert_eq!(qd, u16::from_be_bytes([data[4], data[5]]));
        assert_eq!(a[HEADER_LEN..], data[HEADER_LEN..a.len()]);
    } else {
        assert_eq!(qd, 0, "a header-only answer claims questions");
    }
    assert!(!is_query(&a));
});
