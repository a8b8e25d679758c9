//! Bulk transfer through smoltcp with enclave-proxy's socket configuration, over an in-memory
//! Ethernet device with frames close to enclave-proxy's default MTU. This is the per-byte cost of the userspace
//! stack alone, without the TAP or the link.
#![allow(missing_docs, clippy::unwrap_used)]

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use enclave_proxy::stack::new_socket;
use smoltcp::iface::{Config, Interface, SocketSet};
use smoltcp::phy::{Loopback, Medium};
use smoltcp::socket::tcp;
use smoltcp::time::Instant;
use smoltcp::wire::{EthernetAddress, IpAddress, IpCidr};

const TOTAL: usize = 16 * 1024 * 1024;

fn transfer(buffer: usize) -> usize {
    // smoltcp's loopback device carries 65535-byte frames, close to the 65520 default MTU.
    let mut device = Loopback::new(Medium::Ethernet);
    let config = Config::new(EthernetAddress([2, 0, 0, 0, 0, 1]).into());
    let mut iface = Interface::new(config, &mut device, Instant::ZERO);
    iface.update_ip_addrs(|a| {
        a.push(IpCidr::new(IpAddress::v4(127, 0, 0, 1), 8)).unwrap();
    });
    let mut sockets = SocketSet::new(vec![]);
    let server = sockets.add(new_socket(buffer));
    let client = sockets.add(new_socket(buffer));
    sockets.get_mut::<tcp::Socket>(server).listen(1234).unwrap();
    sockets
        .get_mut::<tcp::Socket>(client)
        .connect(iface.context(), (IpAddress::v4(127, 0, 0, 1), 1234), 65000)
        .unwrap();
    let chunk = vec![0x5au8; 64 * 1024];
    let (mut sent, mut received) = (0usize, 0usize);
    let mut now = Instant::ZERO;
    while received < TOTAL {
        iface.poll(now, &mut device, &mut sockets);
        let c = sockets.get_mut::<tcp::Socket>(client);
        if c.can_send() && sent < TOTAL {
            sent += c
                .send_slice(&chunk[..chunk.len().min(TOTAL - sent)])
                .unwrap();
        }
        let s = sockets.get_mut::<tcp::Socket>(server);
        while s.can_recv() {
            received += s.recv(|b| (b.len(), b.len())).unwrap();
        }
        now += smoltcp::time::Duration::from_micros(10);
    }
    received
}

fn bulk(c: &mut Criterion) {
    let mut group = c.benchmark_group("smoltcp_bulk");
    group.throughput(Throughput::Bytes(TOTAL as u64));
    group.sample_size(10);
    for buffer_kib in [256usize, 512, 1024] {
        group.bench_with_input(
            BenchmarkId::new("buffer_kib", buffer_kib),
            &buffer_kib,
            |b, &k| b.iter(|| transfer(k * 1024)),
        );
    }
    group.finish();
}

criterion_group!(benches, bulk);
criterion_main!(benches);
