//! Child processes a test started, stopped by their own PID on drop.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;

/// A running daemon with its log file.
#[derive(Debug)]
pub struct Daemon {
    child: Option<Child>,
    log: PathBuf,
    name: String,
    stop_timeout: Duration,
}

/// Where the workspace's binaries are: `ENCLAVE_NET_BIN_DIR`, or the profile directory the
/// running binary was built into (`target/<profile>`, or its `deps/` for test binaries).
pub fn bin(name: &str) -> PathBuf {
    let dir = std::env::var_os("ENCLAVE_NET_BIN_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            let exe = std::env::current_exe().expect("current_exe");
            let dir = exe.parent().expect("binary has a directory");
            if dir.ends_with("deps") {
                dir.parent().map_or(dir.to_path_buf(), Path::to_path_buf)
            } else {
                dir.to_path_buf()
            }
        });
    let path = dir.join(name);
    assert!(
        path.exists(),
        "{} not found: build the binaries first (cargo build --release --workspace --bins)",
        path.display()
    );
    path
}

impl Daemon {
    /// Starts `command`, logging to `log`, and waits until the log has a line containing
    /// `ready`.
    pub fn start(name: &str, command: Command, log: PathBuf) -> Daemon {
        Daemon::start_with(name, command, log, "ready", Duration::from_secs(5))
    }

    /// Like [`Daemon::start`], waiting for `marker` in the log, and allowing `stop_timeout`
    /// between SIGTERM and SIGKILL.
    pub fn start_with(
        name: &str,
        command: Command,
        log: PathBuf,
        marker: &str,
        stop_timeout: Duration,
    ) -> Daemon {
        Daemon::start_within(
            name,
            command,
            log,
            marker,
            Duration::from_secs(30),
            stop_timeout,
        )
    }

    /// Like [`Daemon::start_with`], waiting up to `ready_timeout` for `marker`.
    pub fn start_within(
        name: &str,
        mut command: Command,
        log: PathBuf,
        marker: &str,
        ready_timeout: Duration,
        stop_timeout: Duration,
    ) -> Daemon {
        let file = std::fs::File::create(&log).expect("create log");
        let child = command
            .env(
                "RUST_LOG",
                std::env::var("TEST_RUST_LOG").unwrap_or_else(|_| "info".into()),
            )
            .stdin(Stdio::null())
            .stdout(file.try_clone().expect("dup log"))
            .stderr(file)
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {name}: {e}"));
        crate::cleanup::register(crate::cleanup::Item::Process(child.id()));
        let mut daemon = Daemon {
            child: Some(child),
            log,
            name: name.into(),
            stop_timeout,
        };
        daemon.wait_ready(marker, ready_timeout);
        daemon
    }

    fn wait_ready(&mut self, marker: &str, timeout: Duration) {
        let deadline = Instant::now() + timeout;
        while Instant::now() < deadline {
            if self.log_text().contains(marker) {
                return;
            }
            if let Some(status) = self
                .child
                .as_mut()
                .and_then(|c| c.try_wait().ok().flatten())
            {
                panic!(
                    "{} exited with {status} before ready:\n{}",
                    self.name,
                    self.log_text()
                );
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        panic!(
            "{} not ready after {timeout:?}:\n{}",
            self.name,
            self.log_text()
        );
    }

    /// The daemon's log so far.
    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// The process ID, while it runs.
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    /// Whether it is still running.
    pub fn alive(&mut self) -> bool {
        matches!(self.child.as_mut().map(|c| c.try_wait()), Some(Ok(None)))
    }

    /// Sends SIGTERM and waits for it to exit (SIGKILL after the stop timeout). Returns
    /// whether it exited on its own with status 0.
    pub fn stop(&mut self) -> bool {
        let Some(mut child) = self.child.take() else {
            return false;
        };
        crate::cleanup::forget(&crate::cleanup::Item::Process(child.id()));
        let pid = Pid::from_raw(child.id() as i32);
        let _ = kill(pid, Signal::SIGTERM);
        let deadline = Instant::now() + self.stop_timeout;
        while Instant::now() < deadline {
            if let Ok(Some(status)) = child.try_wait() {
                return status.success();
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        let _ = child.kill();
        let _ = child.wait();
        false
    }
}

impl Daemon {
    /// Sends `signal` to the daemon, by its PID.
    pub fn signal(&self, signal: Signal) {
        if let Some(pid) = self.pid() {
            let _ = kill(Pid::from_raw(pid as i32), signal);
        }
    }

    /// Kills the daemon with SIGKILL (`kill -9`: no clean-up of its own) and reaps it.
    pub fn kill(&mut self) {
        let Some(mut child) = self.child.take() else {
            return;
        };
        crate::cleanup::forget(&crate::cleanup::Item::Process(child.id()));
        let _ = child.kill();
        let _ = child.wait();
    }

    /// How many file descriptors the daemon has open now (`/proc/PID/fd`).
    pub fn fd_count(&self) -> usize {
        let pid = self.pid().expect("daemon is running");
        std::fs::read_dir(format!("/proc/{pid}/fd"))
            .map(|d| d.count())
            .unwrap_or_else(|e| panic!("{}: /proc/{pid}/fd: {e}", self.name))
    }

    /// The daemon's resident memory in KiB (`VmRSS` in `/proc/PID/status`).
    pub fn rss_kib(&self) -> u64 {
        let pid = self.pid().expect("daemon is running");
        let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
        status
            .lines()
            .find_map(|l| l.strip_prefix("VmRSS:"))
            .and_then(|v| v.split_whitespace().next()?.parse().ok())
            .unwrap_or_else(|| panic!("{}: no VmRSS in /proc/{pid}/status", self.name))
    }

    /// Asks the daemon for its counters (SIGUSR1) and returns the line it logs, parsed into
    /// `name -> value` (`live.ingress`, `live.egress`, `opened`, ...). Panics if no new counters
    /// line appears within 5 s.
    pub fn counters(&self) -> Counters {
        let before = counter_lines(&self.log_text()).len();
        self.signal(Signal::SIGUSR1);
        let deadline = Instant::now() + Duration::from_secs(5);
        loop {
            let text = self.log_text();
            let lines = counter_lines(&text);
            if lines.len() > before {
                return Counters::parse(lines[lines.len() - 1]);
            }
            assert!(
                Instant::now() < deadline,
                "{} logged no counters line within 5 s of SIGUSR1:\n{text}",
                self.name
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

/// The counters a daemon logs on SIGUSR1, by field name.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Counters(pub std::collections::BTreeMap<String, u64>);

impl Counters {
    /// Parses every `name=number` field of a log line (ANSI colours allowed).
    pub fn parse(line: &str) -> Counters {
        let plain = strip_ansi(line);
        Counters(
            plain
                .split_whitespace()
                .filter_map(|field| {
                    let (k, v) = field.split_once('=')?;
                    Some((k.to_string(), v.parse().ok()?))
                })
                .collect(),
        )
    }

    /// One field; panics if the line has no such field.
    pub fn get(&self, name: &str) -> u64 {
        *self
            .0
            .get(name)
            .unwrap_or_else(|| panic!("no {name} in the counters line {:?}", self.0))
    }

    /// Live connections: `(live.ingress, live.egress)`.
    pub fn live(&self) -> (u64, u64) {
        (self.get("live.ingress"), self.get("live.egress"))
    }
}

/// The lines of a log that carry live-connection counters.
fn counter_lines(text: &str) -> Vec<&str> {
    text.lines()
        .filter(|l| l.contains("counters") && l.contains("live.ingress"))
        .collect()
}

/// Removes ANSI escape sequences (`ESC [ ... letter`), which tracing adds around field names.
fn strip_ansi(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    let mut chars = s.chars();
    while let Some(c) = chars.next() {
        if c == '\u{1b}' {
            for c in chars.by_ref() {
                if c.is_ascii_alphabetic() {
                    break;
                }
            }
        } else {
            out.push(c);
        }
    }
    out
}

impl Drop for Daemon {
    fn drop(&mut self) {
        self.stop();
    }
}

/// Stops a process by PID: SIGTERM, then SIGKILL if it has not exited (or become a zombie)
/// after `timeout`.
pub fn terminate(pid: u32, timeout: Duration) {
    let target = Pid::from_raw(pid as i32);
    if kill(target, Signal::SIGTERM).is_err() {
        return;
    }
    let deadline = Instant::now() + timeout;
    while Instant::now() < deadline {
        let state = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
        let gone = state
            .rsplit_once(')')
            .and_then(|(_, rest)| rest.split_whitespace().next())
            .is_none_or(|s| s == "Z");
        if gone {
            return;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let _ = kill(target, Signal::SIGKILL);
}

/// Runs `cmd` to its end with `input` on its standard input; its output. `what` names the
/// program in the panic if it cannot start.
pub fn run_with_input(cmd: &mut Command, input: &str, what: &str) -> std::process::Output {
    use std::io::Write;
    cmd.stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let mut child = cmd
        .spawn()
        .unwrap_or_else(|e| panic!("cannot start {what}: {e}"));
    let mut stdin = child.stdin.take().expect("piped stdin");
    stdin.write_all(input.as_bytes()).expect("write stdin");
    drop(stdin);
    child.wait_with_output().expect("wait")
}
