//! `udp-echo PORT`: answers every UDP datagram on `0.0.0.0:PORT` with the same bytes, and a
//! datagram `whoami` with the sender's address.
//!
//! `udp-echo IP:PORT SIZE`: sends one datagram of SIZE bytes there, waits up to 5 s for it to
//! come back and prints `echoed N` if it came back whole (exit status 1 otherwise).
//!
//! Runs in a container for the UDP tests (its image is built by
//! `enclave_net_tests::docker::Docker::import_udp_echo_image`).
#![forbid(unsafe_code)]

use std::net::UdpSocket;

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    if let [dst, size] = args.as_slice() {
        std::process::exit(send(dst, size));
    }
    let arg = args.first().cloned().unwrap_or_default();
    let Ok(port) = arg.parse::<u16>() else {
        eprintln!("usage: udp-echo PORT, not {arg:?}");
        std::process::exit(2);
    };
    let socket = match UdpSocket::bind(("0.0.0.0", port)) {
        Ok(s) => s,
        Err(e) => {
            eprintln!("udp-echo: bind {port}: {e}");
            std::process::exit(1);
        }
    };
    println!("udp-echo listening on {port}");
    let mut buf = vec![0u8; 65536];
    loop {
        let Ok((n, from)) = socket.recv_from(&mut buf) else {
            continue;
        };
        let reply = if &buf[..n] == b"whoami" {
            from.ip().to_string().into_bytes()
        } else {
            buf[..n].to_vec()
        };
        let _ = socket.send_to(&reply, from);
    }
}

/// Client mode: one datagram of `size` bytes to `dst` and back.
fn send(dst: &str, size: &str) -> i32 {
    let (Ok(dst), Ok(size)) = (dst.parse::<std::net::SocketAddr>(), size.parse::<usize>()) else {
        eprintln!("usage: udp-echo IP:PORT SIZE");
        return 2;
    };
    let run = || -> std::io::Result<usize> {
        let socket = UdpSocket::bind("0.0.0.0:0")?;
        socket.set_read_timeout(Some(std::time::Duration::from_secs(5)))?;
        let sent: Vec<u8> = (0..size).map(|i| (i % 251) as u8).collect();
        socket.send_to(&sent, dst)?;
        let mut buf = vec![0u8; 65536];
        let (n, _) = socket.recv_from(&mut buf)?;
        Ok(if buf[..n] == sent[..] { n } else { 0 })
    };
    match run() {
        Ok(n) if n == size => {
            println!("echoed {n}");
            0
        }
        Ok(_) => {
            eprintln!("the echo differed");
            1
        }
        Err(e) => {
            eprintln!("udp-echo to {dst}: {e}");
            1
        }
    }
}
