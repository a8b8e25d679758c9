//! Root only (skipped otherwise): asks a real kernel, in a network namespace of the test's own,
//! which ingress clients can be the source of an injected connection, and measures a lookup.
//!
//! The namespace has what an enclave running Docker has: the TAP as the default route, a bridge
//! like `docker0` on 172.17.0.0/16, and the kinds of route a lookup can meet. `setns` moves only
//! the calling thread, so the work runs on a thread of its own with a current-thread runtime.

use std::fs::File;
use std::net::{IpAddr, Ipv4Addr};
use std::process::Command;
use tokio::time::Instant;

use enclave_proxy::netlink::{self, ClientRoute, Routes};
use nix::sched::{setns, CloneFlags};
use rtnetlink::packet_route::route::RouteType;

/// A namespace that is removed on drop, even when the test fails.
struct Netns(String);

impl Netns {
    fn new() -> Netns {
        let name = format!("entroutes{}", std::process::id());
        ip(&["netns", "add", &name]);
        Netns(name)
    }

    fn ip(&self, args: &[&str]) {
        let mut full = vec!["-n", &self.0];
        full.extend_from_slice(args);
        ip(&full);
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        let _ = Command::new("ip").args(["netns", "del", &self.0]).status();
    }
}

fn ip(args: &[&str]) {
    let out = Command::new("ip")
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("cannot run ip {args:?}: {e}"));
    assert!(
        out.status.success(),
        "ip {args:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

fn v4(s: &str) -> IpAddr {
    IpAddr::V4(s.parse().expect("test address"))
}

#[test]
fn the_enclave_kernel_decides_which_clients_can_be_a_source() {
    if !nix::unistd::geteuid().is_root() {
        eprintln!("skipped: needs root to create a network namespace and a TAP device");
        return;
    }
    let ns = Netns::new();
    // Docker's default bridge, and routes of the kinds the kernel refuses to use.
    ns.ip(&["link", "add", "docker0", "type", "bridge"]);
    ns.ip(&["addr", "add", "172.17.0.1/16", "dev", "docker0"]);
    ns.ip(&["link", "set", "docker0", "up"]);
    ns.ip(&["route", "add", "blackhole", "198.51.100.0/24"]);
    ns.ip(&["route", "add", "unreachable", "192.0.2.0/24"]);
    let path = format!("/run/netns/{}", ns.0);
    std::thread::spawn(move || {
        let file = File::open(&path).expect("open the namespace");
        setns(&file, CloneFlags::CLONE_NEWNET).expect("setns");
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("runtime");
        runtime.block_on(check_in_namespace());
    })
    .join()
    .expect("the namespaced thread failed");
}

async fn check_in_namespace() {
    let tap = (Ipv4Addr::new(10, 240, 0, 2), 30);
    let _tap_fd = enclave_proxy::sys::open_tap("tap0").expect("open tap0");
    netlink::configure(&netlink::TapConfig {
        name: "tap0".into(),
        address: tap.0,
        prefix: tap.1,
        gateway: Ipv4Addr::new(10, 240, 0, 1),
        mtu: 65520,
    })
    .await
    .expect("configure tap0");
    let routes = Routes::open("tap0", tap).await.expect("open routes");

    assert_eq!(routes.check(v4("203.0.113.7")).await, ClientRoute::Tap);
    let mapped = IpAddr::V6(Ipv4Addr::new(203, 0, 113, 7).to_ipv6_mapped());
    assert_eq!(routes.check(mapped).await, ClientRoute::Tap);
    assert_eq!(routes.check(v4("127.0.0.1")).await, ClientRoute::Special);
    assert_eq!(routes.check(v4("10.240.0.2")).await, ClientRoute::TapSubnet);
    assert_eq!(
        routes.check("::1".parse().expect("v6")).await,
        ClientRoute::NotIpv4
    );
    // A container on the bridge, the bridge's own address (an address of the enclave), its
    // broadcast address.
    let cases = [
        ("172.17.0.5", RouteType::Unicast),
        ("172.17.0.1", RouteType::Local),
        ("172.17.255.255", RouteType::Broadcast),
    ];
    for (elsewhere, want) in cases {
        let got = routes.check(v4(elsewhere)).await;
        assert!(
            matches!(got, ClientRoute::Elsewhere { kind, .. } if kind == want),
            "{elsewhere}: {got:?}"
        );
    }
    for none in ["198.51.100.7", "192.0.2.7"] {
        assert_eq!(routes.check(v4(none)).await, ClientRoute::NoRoute, "{none}");
    }

    // What a lookup costs, one at a time and many at once (a burst of streams).
    const N: u32 = 20_000;
    let start = Instant::now();
    for _ in 0..N {
        assert_eq!(routes.check(v4("203.0.113.7")).await, ClientRoute::Tap);
    }
    let serial = start.elapsed() / N;
    let start = Instant::now();
    let burst = (0..1024u32).map(|i| {
        let routes = &routes;
        async move {
            let client = Ipv4Addr::from(u32::from(Ipv4Addr::new(203, 0, 113, 0)) + i % 256);
            routes.check(IpAddr::V4(client)).await
        }
    });
    let answers = futures::future::join_all(burst).await;
    let burst_time = start.elapsed();
    assert!(answers.iter().all(|a| a.is_tap()), "{answers:?}");
    eprintln!("route lookup: {serial:?} each in series; 1024 at once in {burst_time:?}");
}
