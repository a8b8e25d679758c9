//! Tracing set-up shared by both daemons: `RUST_LOG` sets the filter (default `info`).

use tracing_subscriber::EnvFilter;

/// How log lines are written.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum LogFormat {
    /// Human-readable lines.
    #[default]
    Text,
    /// One JSON object per line.
    Json,
}

impl std::str::FromStr for LogFormat {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "text" => Ok(LogFormat::Text),
            "json" => Ok(LogFormat::Json),
            other => Err(format!("log format {other:?} is neither `text` nor `json`")),
        }
    }
}

/// Installs the global subscriber, writing to stderr.
pub fn init(format: LogFormat) {
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    match format {
        LogFormat::Text => builder.init(),
        LogFormat::Json => builder.json().init(),
    }
}

/// Resolves when SIGTERM or SIGINT arrives.
pub async fn shutdown_signal() {
    use tokio::signal::unix::{signal, SignalKind};
    let (Ok(mut term), Ok(mut int)) = (
        signal(SignalKind::terminate()),
        signal(SignalKind::interrupt()),
    ) else {
        // Without signal handlers the daemon still runs; it just dies the default way.
        return std::future::pending().await;
    };
    tokio::select! {
        _ = term.recv() => tracing::info!("SIGTERM received, shutting down"),
        _ = int.recv() => tracing::info!("SIGINT received, shutting down"),
    }
}

/// Tells the service manager the daemon is serving (`READY=1`), when it was started with
/// `NOTIFY_SOCKET` set (a systemd unit of `Type=notify`, or any supervisor that speaks the
/// protocol); does nothing otherwise. Call it once every listener is bound.
pub fn notify_ready() {
    notify(&[sd_notify::NotifyState::Ready], "READY=1");
}

/// A ready file for init scripts that run no service manager (`--ready-file PATH`): the daemon
/// says `READY=1` in it once serving, the way [`notify_ready`] tells systemd.
///
/// - If PATH is a FIFO (`mkfifo`), the line is written into it once a reader has it open, so an
///   init script waits with a blocking read (`read _ < PATH`) and no polling. The open waits on
///   a thread of its own, so the daemon serves whether or not anyone reads.
/// - Otherwise PATH is created holding the line (written beside it, then renamed, so a reader
///   never sees half of it), and removed when the daemon stops. A regular file left from an
///   earlier run is removed when the daemon starts ([`ReadyFile::new`]); a script that looks
///   for the file should still remove it before starting the daemon, or use a FIFO.
#[derive(Debug)]
pub struct ReadyFile(std::path::PathBuf);

impl ReadyFile {
    /// Takes `path`, removing a stale regular file there.
    pub fn new(path: std::path::PathBuf) -> std::io::Result<ReadyFile> {
        match std::fs::symlink_metadata(&path) {
            Ok(m) if m.file_type().is_file() => std::fs::remove_file(&path)?,
            Ok(_) | Err(_) => {}
        }
        Ok(ReadyFile(path))
    }

    /// Says `READY=1`; a failure is logged, not fatal (the daemon serves anyway).
    pub fn ready(&self) {
        use std::os::unix::fs::FileTypeExt;
        let path = self.0.clone();
        let fifo = std::fs::metadata(&path).is_ok_and(|m| m.file_type().is_fifo());
        if fifo {
            std::thread::spawn(move || {
                if let Err(e) = std::fs::OpenOptions::new()
                    .write(true)
                    .open(&path)
                    .and_then(|mut f| std::io::Write::write_all(&mut f, b"READY=1\n"))
                {
                    tracing::warn!("cannot say ready in {}: {e}", path.display());
                }
            });
            return;
        }
        let tmp = path.with_extension("ready-tmp");
        let written =
            std::fs::write(&tmp, b"READY=1\n").and_then(|()| std::fs::rename(&tmp, &path));
        if let Err(e) = written {
            let _ = std::fs::remove_file(&tmp);
            tracing::warn!("cannot write the ready file {}: {e}", path.display());
        }
    }

    /// The daemon is stopping: a regular ready file goes.
    pub fn stopping(&self) {
        if std::fs::symlink_metadata(&self.0).is_ok_and(|m| m.file_type().is_file()) {
            let _ = std::fs::remove_file(&self.0);
        }
    }
}

/// Tells the service manager the daemon is reloading its configuration (`RELOADING=1`); it
/// follows with [`notify_ready`] when done.
pub fn notify_reloading() {
    notify(&[sd_notify::NotifyState::Reloading], "RELOADING=1");
}

/// Tells the service manager the daemon is shutting down (`STOPPING=1`).
pub fn notify_stopping() {
    notify(&[sd_notify::NotifyState::Stopping], "STOPPING=1");
}

fn notify(state: &[sd_notify::NotifyState<'_>], what: &str) {
    if std::env::var_os("NOTIFY_SOCKET").is_none() {
        return;
    }
    match sd_notify::notify(false, state) {
        Ok(()) => tracing::debug!("told the service manager {what}"),
        Err(e) => tracing::warn!("could not tell the service manager {what}: {e}"),
    }
}

/// Raises the open-file limit to at least `need` descriptors, and says plainly when it cannot.
///
/// The soft limit goes to the hard limit first (the usual soft limit of 1024 would cap a daemon
/// at a few hundred connections); if that is still short, the hard limit is raised too, which
/// works with CAP_SYS_RESOURCE (root, or a systemd unit with `LimitNOFILE=`). `caps` names the
/// options the need comes from, for the warning.
pub fn raise_fd_limit(need: u64, caps: &str) {
    use nix::sys::resource::{getrlimit, setrlimit, Resource};
    let Ok((soft, hard)) = getrlimit(Resource::RLIMIT_NOFILE) else {
        return;
    };
    let target = need.max(soft.min(hard));
    if soft >= need {
        return;
    }
    if setrlimit(Resource::RLIMIT_NOFILE, hard.max(need), hard.max(need)).is_ok() {
        tracing::debug!(limit = hard.max(need), "raised the open-file limit");
        return;
    }
    if soft < hard && setrlimit(Resource::RLIMIT_NOFILE, hard, hard).is_ok() && hard >= need {
        return;
    }
    tracing::warn!(
        limit = hard.min(target),
        needed = need,
        "the open-file limit is below what {caps} need; past it new connections fail with \
         EMFILE: raise the limit (systemd: LimitNOFILE=) or lower the caps"
    );
}

/// Lets one event through per `period` and counts the rest, for log lines that a flood could
/// trigger once per connection (an unreachable peer, bad headers): the first is logged with how
/// many were held back since the last one, and the others can go to `debug`. Const-constructible,
/// so it can be a `static` beside the code that logs.
#[derive(Debug)]
pub struct RateLimit {
    period: std::time::Duration,
    /// When an event was last let through, and how many were held back since.
    state: std::sync::Mutex<(Option<tokio::time::Instant>, u64)>,
}

impl RateLimit {
    /// At most one event per `period`.
    pub const fn new(period: std::time::Duration) -> RateLimit {
        RateLimit {
            period,
            state: std::sync::Mutex::new((None, 0)),
        }
    }

    /// `Some(held back since the last one let through)` if this event may be logged; `None` if
    /// it is held back.
    pub fn allow(&self) -> Option<u64> {
        let now = tokio::time::Instant::now();
        let mut state = self
            .state
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        match state.0 {
            Some(last) if now.duration_since(last) < self.period => {
                state.1 += 1;
                None
            }
            _ => {
                let held = state.1;
                *state = (Some(now), 0);
                Some(held)
            }
        }
    }
}

/// Logs at `warn` at most once per 10 s from this call site, with the count held back since the
/// last one let through; the rest go to `debug`. For lines a flood could trigger per stream or
/// per packet. Takes what `tracing::warn!` takes, without `parent:`.
#[macro_export]
macro_rules! warn_limited {
    ($($arg:tt)+) => {{
        static LIMIT: $crate::telemetry::RateLimit =
            $crate::telemetry::RateLimit::new(::std::time::Duration::from_secs(10));
        match LIMIT.allow() {
            Some(suppressed) => ::tracing::warn!(suppressed, $($arg)+),
            None => ::tracing::debug!($($arg)+),
        }
    }};
}

#[cfg(test)]
mod rate_limit_tests {
    use super::RateLimit;
    use std::time::Duration;

    #[tokio::test(start_paused = true)]
    async fn one_per_period_with_a_count_of_the_rest() {
        static LIMIT: RateLimit = RateLimit::new(Duration::from_secs(10));
        assert_eq!(LIMIT.allow(), Some(0));
        assert_eq!(LIMIT.allow(), None);
        assert_eq!(LIMIT.allow(), None);
        tokio::time::advance(Duration::from_secs(10)).await;
        assert_eq!(LIMIT.allow(), Some(2));
        assert_eq!(LIMIT.allow(), None);
    }
}
