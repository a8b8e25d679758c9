//! Config files, as an operator meets them (issue: "Running it for real on the parent", test 5):
//! a bad file is refused at start with a message naming the problem and its line, and a non-zero
//! exit; a good one runs the daemon as its flags would.
//!
//! These start the daemon binaries but never get as far as a socket: no root needed.
#![allow(clippy::unwrap_used, missing_docs, clippy::disallowed_types)]

use std::path::PathBuf;
use std::process::Command;

use enclave_net_tests::process::bin;

/// A config file in a directory of its own, removed on drop.
struct File(PathBuf);

impl File {
    fn new(name: &str, text: &str) -> File {
        let dir = std::env::temp_dir().join(format!("enet-config-{}-{name}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join(format!("{name}.toml"));
        std::fs::write(&path, text).unwrap();
        File(path)
    }
}

impl Drop for File {
    fn drop(&mut self) {
        if let Some(dir) = self.0.parent() {
            let _ = std::fs::remove_dir_all(dir);
        }
    }
}

/// Runs `daemon --config FILE extra...`; its exit code and stderr.
fn run(daemon: &str, file: &File, extra: &[&str]) -> (Option<i32>, String) {
    let out = Command::new(bin(daemon))
        .arg("--config")
        .arg(&file.0)
        .args(extra)
        .output()
        .unwrap();
    (
        out.status.code(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn bad_configurations_are_refused_with_their_line() {
    let cases = [
        (
            "host-proxy",
            "enclave = \"unix:/nonexistent\"\n# a comment\nmax_per_clint = 3\n",
            vec!["line 3", "unknown key `max_per_clint`"],
        ),
        (
            "host-proxy",
            "enclave = \"unix:/nonexistent\"\ndns_timeout = \"soon\"\n",
            vec!["line 2", "key `dns_timeout`", "\"soon\" is not a positive number of seconds"],
        ),
        (
            "host-proxy",
            "enclave = \"unix:/nonexistent\"\npublish = [\n  \"8080:80\",\n  \"8000-8100:8000-8100\",\n]\n",
            vec!["line 3", "line 4", "8080:80", "8000-8100:8000-8100", "overlap"],
        ),
        (
            "host-proxy",
            "enclave = \"unix:/nonexistent\"\npublish = \"80:80:80:80\"\n",
            vec!["line 2", "key `publish`"],
        ),
        (
            "enclave-proxy",
            "mtu = 100\n",
            vec!["line 1", "key `mtu`", "100"],
        ),
        (
            "enclave-proxy",
            "[tap]\nname = \"tap9\"\n",
            vec!["`tap`", "takes a string or a number"],
        ),
    ];
    for (daemon, text, want) in cases {
        let file = File::new(daemon, text);
        let (code, stderr) = run(daemon, &file, &[]);
        assert_eq!(code, Some(2), "{daemon} with {text:?}: {stderr}");
        assert!(
            stderr.contains(&file.0.display().to_string()),
            "{text:?}: the message names the file: {stderr}"
        );
        for w in want {
            assert!(stderr.contains(w), "{text:?}: {w:?} missing from: {stderr}");
        }
    }
}

#[test]
fn the_command_line_wins_over_the_file() {
    // The file's bad value is never used when the flag replaces it.
    let file = File::new(
        "override",
        "enclave = \"unix:/nonexistent\"\nmax_per_client = 0\n",
    );
    let (code, stderr) = run("host-proxy", &file, &["--max-per-client", "5", "--version"]);
    assert_eq!(code, Some(0), "{stderr}");
    let (code, stderr) = run("host-proxy", &file, &["--version"]);
    assert_eq!(
        code,
        Some(2),
        "without the flag the file's 0 is refused: {stderr}"
    );
    assert!(stderr.contains("line 2"), "{stderr}");
}
