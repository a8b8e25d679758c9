//! DNS messages, as far as the enclave's resolver needs them (sans-IO): telling a query from
//! anything else, and the SERVFAIL answer host-proxy gives when no resolver answers. Answers from
//! resolvers are never parsed: they pass through unchanged.

/// A DNS header's length.
pub const HEADER_LEN: usize = 12;

/// Whether `msg` can be a DNS query: a whole header with QR clear.
pub fn is_query(msg: &[u8]) -> bool {
    msg.len() >= HEADER_LEN && msg[2] & 0x80 == 0
}

/// The SERVFAIL answer to `query` (which [`is_query`] accepted): its id, opcode, RD bit and
/// question section, with QR and RA set, RCODE 2 and no records. A question section that does
/// not parse is left out (QDCOUNT 0).
pub fn servfail(query: &[u8]) -> Vec<u8> {
    let questions = u16::from_be_bytes([query[4], query[5]]);
    let end = question_end(query, questions);
    let mut answer = query[..end.unwrap_or(HEADER_LEN)].to_vec();
    answer[2] = 0x80 | (query[2] & 0x79); // QR, opcode and RD kept, AA and TC clear
    answer[3] = 0x80 | 2; // RA, RCODE SERVFAIL
    let qd = if end.is_some() { questions } else { 0 };
    answer[4..6].copy_from_slice(&qd.to_be_bytes());
    answer[6..12].fill(0);
    answer
}

/// Where `count` questions after the header end, if they parse (uncompressed names, as in any
/// query).
fn question_end(msg: &[u8], count: u16) -> Option<usize> {
    let mut at = HEADER_LEN;
    for _ in 0..count {
        loop {
            let len = usize::from(*msg.get(at)?);
            at += 1;
            if len == 0 {
                break;
            }
            if len > 63 {
                return None;
            }
            at += len;
        }
        at += 4; // QTYPE, QCLASS
    }
    (at <= msg.len()).then_some(at)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A query for `example.test.` type A with an EDNS OPT record.
    fn query() -> Vec<u8> {
        let mut q = vec![0xab, 0xcd, 0x01, 0x20, 0, 1, 0, 0, 0, 0, 0, 1];
        q.extend_from_slice(b"\x07example\x04test\x00\x00\x01\x00\x01");
        q.extend_from_slice(&[0, 0, 41, 0x10, 0, 0, 0, 0, 0, 0, 0]);
        q
    }

    #[test]
    fn servfail_keeps_id_question_and_rd() {
        let q = query();
        assert!(is_query(&q));
        let a = servfail(&q);
        assert_eq!(&a[..2], &[0xab, 0xcd]);
        assert_eq!(a[2], 0x81, "QR and RD");
        assert_eq!(a[3] & 0x0f, 2, "SERVFAIL");
        assert_eq!(&a[4..12], &[0, 1, 0, 0, 0, 0, 0, 0]);
        assert_eq!(&a[12..], b"\x07example\x04test\x00\x00\x01\x00\x01");
        assert!(!is_query(&a), "an answer is not a query");
        // A question that does not parse is left out.
        let mut cut = q[..20].to_vec();
        cut[4..6].copy_from_slice(&[0, 1]);
        assert_eq!(servfail(&cut).len(), HEADER_LEN);
        assert!(!is_query(&q[..11]));
    }
}
