//! Reading a Prometheus endpoint from a test.

use std::net::SocketAddr;

use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::netns::Netns;

/// One HTTP/1.1 exchange from `ns`: the status code and the body.
pub async fn http(ns: &Netns, addr: SocketAddr, request_line: &str) -> (u16, String) {
    let mut s = ns.connect(addr).await.unwrap();
    let request = format!("{request_line}\r\nHost: test\r\nConnection: close\r\n\r\n");
    s.write_all(request.as_bytes()).await.unwrap();
    let mut out = Vec::new();
    s.read_to_end(&mut out).await.unwrap();
    let out = String::from_utf8_lossy(&out).into_owned();
    let status = out
        .split(' ')
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or(0);
    let body = out
        .split_once("\r\n\r\n")
        .map_or("", |(_, b)| b)
        .to_string();
    (status, body)
}

/// The value of the sample `name{labels}` in an exposition.
pub fn sample(text: &str, series: &str) -> Option<f64> {
    text.lines()
        .find_map(|l| l.strip_prefix(series)?.strip_prefix(' ')?.parse().ok())
}

/// `promtool check metrics` (Debian's `prometheus`) on an exposition: the lint's complaints, or
/// `Ok` when it has none.
pub fn promtool_check(text: &str) -> Result<(), String> {
    let mut cmd = std::process::Command::new("promtool");
    cmd.args(["check", "metrics"]);
    let out = crate::process::run_with_input(&mut cmd, text, "promtool (Debian's prometheus)");
    let said = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    if out.status.success() && said.trim().is_empty() {
        Ok(())
    } else {
        Err(format!("promtool check metrics: {:?}: {said}", out.status))
    }
}
