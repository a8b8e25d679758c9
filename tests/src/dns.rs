//! A real DNS server for the tests and the benchmark: dnsmasq (Debian's `dnsmasq-base`) in a
//! namespace, answering for the zone `enclave.test` only, and the queries sent to it.

use std::net::Ipv4Addr;
use std::path::Path;
use std::time::Duration;

use crate::netns::Netns;
use crate::process::Daemon;

/// dnsmasq in `ns`, listening on `listen` port 53, answering for `enclave.test` only with TTL
/// `ttl` and the records in `records` (dnsmasq options such as `--host-record=NAME,IP`). Its log
/// goes to `dir`/dnsmasq.log.
pub fn dnsmasq(ns: &Netns, listen: Ipv4Addr, dir: &Path, ttl: u32, records: &[String]) -> Daemon {
    let mut cmd = ns.command("dnsmasq");
    cmd.args([
        "--keep-in-foreground",
        "--log-facility=-",
        "--conf-file=/dev/null",
        "--no-resolv",
        "--no-hosts",
        "--pid-file=",
        "--user=root",
        "--bind-interfaces",
        &format!("--listen-address={listen}"),
        "--port=53",
        &format!("--local-ttl={ttl}"),
        "--local=/enclave.test/",
    ]);
    cmd.args(records);
    Daemon::start_with(
        "dnsmasq",
        cmd,
        dir.join("dnsmasq.log"),
        "started",
        Duration::from_secs(5),
    )
}

/// A DNS query for `name`, type `qtype`, with an EDNS OPT record offering `edns` bytes if set.
pub fn query(id: u16, name: &str, qtype: u16, edns: Option<u16>) -> Vec<u8> {
    let mut q = id.to_be_bytes().to_vec();
    q.extend_from_slice(&[0x01, 0x00, 0, 1, 0, 0, 0, 0, 0, u8::from(edns.is_some())]);
    for label in name.split('.') {
        q.push(label.len() as u8);
        q.extend_from_slice(label.as_bytes());
    }
    q.push(0);
    q.extend_from_slice(&qtype.to_be_bytes());
    q.extend_from_slice(&[0, 1]);
    if let Some(size) = edns {
        q.extend_from_slice(&[0, 0, 41]);
        q.extend_from_slice(&size.to_be_bytes());
        q.extend_from_slice(&[0, 0, 0, 0, 0, 0]);
    }
    q
}
