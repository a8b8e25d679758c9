//! The stream header codec: every connection pays for one encode and one decode.
#![allow(missing_docs, clippy::unwrap_used)]

use std::hint::black_box;

use common::wire::{Header, Kind, Status};
use criterion::{criterion_group, criterion_main, Criterion, Throughput};

fn codec(c: &mut Criterion) {
    let v4 = Header {
        kind: Kind::TcpEgress,
        src: "10.240.0.2:40000".parse().unwrap(),
        dst: "93.184.216.34:443".parse().unwrap(),
    };
    let v6 = Header {
        kind: Kind::TcpIngress,
        src: "[2001:db8::1]:40000".parse().unwrap(),
        dst: "[2001:db8::2]:443".parse().unwrap(),
    };
    let mut group = c.benchmark_group("header");
    for (name, h) in [("ipv4", v4), ("ipv6", v6)] {
        let (buf, len) = h.encode();
        group.throughput(Throughput::Bytes(len as u64));
        group.bench_function(format!("encode/{name}"), |b| {
            b.iter(|| black_box(&h).encode())
        });
        group.bench_function(format!("decode/{name}"), |b| {
            b.iter(|| Header::decode(black_box(&buf[..len])).unwrap())
        });
    }
    group.bench_function("decode/garbage", |b| {
        let junk = [0x47u8; 44];
        b.iter(|| Header::decode(black_box(&junk)).is_err())
    });
    group.bench_function("status/roundtrip", |b| {
        b.iter(|| Status::decode(&black_box(Status::Refused).encode()).unwrap())
    });
    group.finish();
}

criterion_group!(benches, codec);
criterion_main!(benches);
