//! The test probe that runs inside a microVM guest (tests/tests/microvm.rs): servers for the
//! host's ingress checks, and an agent on a vsock port that runs one client check per
//! connection for the host and answers with one line of result.
//!
//! ```text
//! enclave-net-probe agent PORT [--serve KIND:PORT[:ARG]]...
//!   servers: peer:P (writes the client's IP), exchange:P:LEN (the seeded exchange of
//!   enclave_net_tests::traffic), after-eof:P, reset:P (resets each client), watch:P (reads each
//!   client to its end and remembers how it ended)
//! the agent's commands, one line per connection:
//!   exchange ADDR SEED LEN   -> ok RECEIVED HASH SENT_HASH | err ERRNO
//!   connect ADDR             -> ok MS | err ERRNO MS
//!   half-close ADDR SEED LEN -> ok REPLY (sends, shuts its side, reads the reply to its end)
//!   reset ADDR               -> ok (connects, sends a byte, resets)
//!   read-reset ADDR          -> reset | eof | err ERRNO (how the server's side ended)
//!   watched                  -> how the last watch:P client ended: reset | eof | none
//!   dns SERVER NAME          -> ok RCODE IP... | err WHAT
//! ```
//!
//! Everything it connects to is given by the host test: the test's own namespaces and guests.
#![allow(clippy::unwrap_used, missing_docs, clippy::disallowed_types)]

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Instant;

use enclave_net_tests::traffic::*;
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::{TcpListener, TcpStream, UdpSocket};

type Watched = Arc<Mutex<&'static str>>;

#[tokio::main(flavor = "current_thread")]
async fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let (Some("agent"), Some(port)) = (args.first().map(String::as_str), args.get(1)) else {
        eprintln!("usage: enclave-net-probe agent VSOCK_PORT [--serve KIND:PORT[:ARG]]...");
        std::process::exit(2);
    };
    let watched: Watched = Arc::new(Mutex::new("none"));
    for spec in args[2..].chunks(2) {
        let ["--serve", spec] = [spec[0].as_str(), spec.get(1).map_or("", String::as_str)] else {
            eprintln!("expected --serve KIND:PORT[:ARG], got {spec:?}");
            std::process::exit(2);
        };
        serve(spec, watched.clone()).await;
    }
    let addr: common::transport::LinkAddr = format!("vsock:any:{port}").parse().unwrap();
    let listener = addr.listen().await.expect("vsock listen");
    println!("probe agent on vsock port {port}");
    loop {
        let Ok((stream, _)) = listener.accept().await else {
            continue;
        };
        let watched = watched.clone();
        tokio::spawn(async move {
            let mut stream = BufReader::new(stream);
            let mut line = String::new();
            if stream.read_line(&mut line).await.is_err() {
                return;
            }
            let answer = run(line.trim(), &watched).await;
            let _ = stream
                .get_mut()
                .write_all(format!("{answer}\n").as_bytes())
                .await;
            let _ = stream.get_mut().shutdown().await;
        });
    }
}

/// Starts one server.
async fn serve(spec: &str, watched: Watched) {
    let parts: Vec<&str> = spec.split(':').collect();
    let port: u16 = parts
        .get(1)
        .and_then(|p| p.parse().ok())
        .expect("KIND:PORT");
    let listener = TcpListener::bind(any(port)).await.expect("bind");
    match parts[0] {
        "peer" => serve_peer_addr(listener),
        "exchange" => {
            let len = parts
                .get(2)
                .and_then(|l| l.parse().ok())
                .expect("exchange:P:LEN");
            let mut done = serve_exchange(listener, len);
            tokio::spawn(async move {
                while let Some((seed, hash, n)) = done.recv().await {
                    println!("exchange {seed} received {n} bytes, sha256 {}", hex(&hash));
                }
            });
        }
        "after-eof" => serve_after_eof(listener),
        "reset" => {
            tokio::spawn(async move {
                while let Ok((stream, _)) = listener.accept().await {
                    reset(stream);
                }
            });
        }
        "watch" => {
            tokio::spawn(async move {
                while let Ok((mut stream, _)) = listener.accept().await {
                    let watched = watched.clone();
                    tokio::spawn(async move {
                        let how = match drain(&mut stream).await.1 {
                            Ok(()) => "eof",
                            Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => "reset",
                            Err(_) => "error",
                        };
                        *watched.lock().unwrap() = how;
                    });
                }
            });
        }
        other => panic!("unknown server kind {other}"),
    }
}

fn errno(e: &std::io::Error) -> String {
    format!("err {}", e.raw_os_error().unwrap_or(0))
}

/// Runs one command; its one-line answer.
async fn run(line: &str, watched: &Watched) -> String {
    let words: Vec<&str> = line.split_whitespace().collect();
    let addr = |i: usize| words.get(i).and_then(|a| a.parse::<SocketAddr>().ok());
    match words.first().copied() {
        Some("exchange") => {
            let Some((to, seed, len)) = addr_seed_len(&words) else {
                return "err usage".into();
            };
            let data = client_payload(seed, len);
            match TcpStream::connect(to).await {
                Err(e) => errno(&e),
                Ok(s) => match exchange(s, &data).await {
                    Ok((hash, n)) => format!("ok {n} {} {}", hex(&hash), hex(&sha(&data))),
                    Err(e) => errno(&e),
                },
            }
        }
        Some("half-close") => {
            let Some((to, seed, len)) = addr_seed_len(&words) else {
                return "err usage".into();
            };
            match TcpStream::connect(to).await {
                Err(e) => errno(&e),
                Ok(s) => match send_then_read(s, &client_payload(seed, len)).await {
                    Ok(reply) => format!("ok {reply}"),
                    Err(e) => errno(&e),
                },
            }
        }
        Some("connect") => {
            let Some(to) = addr(1) else {
                return "err usage".into();
            };
            let started = Instant::now();
            let r = TcpStream::connect(to).await;
            let ms = started.elapsed().as_millis();
            match r {
                Ok(_) => format!("ok {ms}"),
                Err(e) => format!("{} {ms}", errno(&e)),
            }
        }
        Some("reset") => {
            let Some(to) = addr(1) else {
                return "err usage".into();
            };
            match TcpStream::connect(to).await {
                Err(e) => errno(&e),
                Ok(mut s) => {
                    let _ = s.write_all(b"x").await;
                    tokio::time::sleep(std::time::Duration::from_millis(100)).await;
                    reset(s);
                    "ok".into()
                }
            }
        }
        Some("read-reset") => {
            let Some(to) = addr(1) else {
                return "err usage".into();
            };
            match TcpStream::connect(to).await {
                Err(e) => errno(&e),
                Ok(mut s) => {
                    let mut buf = [0u8; 1024];
                    loop {
                        match s.read(&mut buf).await {
                            Ok(0) => return "eof".into(),
                            Ok(_) => {}
                            Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => {
                                return "reset".into()
                            }
                            Err(e) => return errno(&e),
                        }
                    }
                }
            }
        }
        Some("watched") => watched.lock().unwrap().to_string(),
        Some("dns") => {
            let (Some(server), Some(name)) = (addr(1), words.get(2)) else {
                return "err usage".into();
            };
            dns(server, name).await
        }
        _ => format!("err unknown command {line:?}"),
    }
}

/// `COMMAND ADDR SEED LEN`'s arguments.
fn addr_seed_len(words: &[&str]) -> Option<(SocketAddr, u64, usize)> {
    Some((
        words.get(1)?.parse().ok()?,
        words.get(2)?.parse().ok()?,
        words.get(3)?.parse().ok()?,
    ))
}

/// One A query to `server`; the answer's rcode and addresses.
async fn dns(server: SocketAddr, name: &str) -> String {
    let Ok(socket) = UdpSocket::bind(any(0)).await else {
        return "err bind".into();
    };
    let query = enclave_net_tests::dns::query(0x4e45, name, 1, None);
    if socket.send_to(&query, server).await.is_err() {
        return "err send".into();
    }
    let mut buf = [0u8; 1500];
    let recv = tokio::time::timeout(std::time::Duration::from_secs(5), socket.recv(&mut buf));
    let Ok(Ok(n)) = recv.await else {
        return "err no answer".into();
    };
    let reply = &buf[..n];
    if reply.len() < 12 || reply[..2] != query[..2] {
        return "err bad answer".into();
    }
    let rcode = reply[3] & 0x0f;
    let answers = u16::from_be_bytes([reply[6], reply[7]]);
    // Skip the question: the name as sent, then type and class.
    let mut at = query.len();
    let mut ips = Vec::new();
    for _ in 0..answers {
        // A compressed name (2 bytes), type, class, TTL, length, data.
        let Some(rr) = reply.get(at..at + 12) else {
            break;
        };
        let len = usize::from(u16::from_be_bytes([rr[10], rr[11]]));
        if let (1, Some(ip)) = (
            u16::from_be_bytes([rr[2], rr[3]]),
            reply.get(at + 12..at + 16).filter(|_| len == 4),
        ) {
            ips.push(std::net::Ipv4Addr::new(ip[0], ip[1], ip[2], ip[3]).to_string());
        }
        at += 12 + len;
    }
    format!("ok {rcode} {}", ips.join(" "))
}
