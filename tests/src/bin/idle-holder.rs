//! The enclave-side server of the idle connections: `idle-holder IP:PORT` accepts every
//! connection on that address and holds it until killed, printing `held N` as the count changes
//! (see `enclave_net_tests::idle::hold`). The scale test runs it inside the enclave namespace,
//! as a process of its own, so that the server ends' descriptors count against its limit and
//! not the test's.
#![forbid(unsafe_code)]

use std::net::SocketAddrV4;

fn main() {
    let arg = std::env::args().nth(1).unwrap_or_default();
    let Ok(addr) = arg.parse::<SocketAddrV4>() else {
        eprintln!("usage: idle-holder IP:PORT (an IPv4 address to listen on), not {arg:?}");
        std::process::exit(2);
    };
    if let Err(e) = enclave_net_tests::idle::hold(addr) {
        eprintln!("idle holder on {addr}: {e}");
        std::process::exit(1);
    }
}
