//! Everything the harness makes is registered here, so that Ctrl-C or SIGTERM removes it too.
//!
//! Normal runs clean up through `Drop`. A signal skips every `Drop`, so the first call to
//! [`install`] starts a thread that waits for SIGINT or SIGTERM and then undoes, in reverse order
//! of creation, whatever is still registered: stops the processes (by their PID), unmounts and
//! removes the directories, deletes the namespaces. Then it exits with 128 + the signal.

use std::path::PathBuf;
use std::process::Command;
use std::sync::{Mutex, Once};

/// One thing to undo.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Item {
    /// A process the harness started.
    Process(u32),
    /// A directory to unmount below and remove.
    Dir(PathBuf),
    /// A network namespace.
    Netns(String),
}

static ITEMS: Mutex<Vec<Item>> = Mutex::new(Vec::new());
static INSTALL: Once = Once::new();

/// Registers something to undo on a signal.
pub fn register(item: Item) {
    install();
    if let Ok(mut items) = ITEMS.lock() {
        items.push(item);
    }
}

/// Forgets something `Drop` has already undone.
pub fn forget(item: &Item) {
    if let Ok(mut items) = ITEMS.lock() {
        if let Some(i) = items.iter().rposition(|x| x == item) {
            items.remove(i);
        }
    }
}

/// Starts the signal watcher once.
pub fn install() {
    INSTALL.call_once(|| {
        use std::sync::atomic::{AtomicUsize, Ordering};
        use std::sync::Arc;
        let caught = Arc::new(AtomicUsize::new(0));
        for sig in [signal_hook::consts::SIGINT, signal_hook::consts::SIGTERM] {
            let _ = signal_hook::flag::register_usize(sig, caught.clone(), sig as usize);
        }
        std::thread::spawn(move || loop {
            std::thread::sleep(std::time::Duration::from_millis(100));
            let sig = caught.load(Ordering::Relaxed);
            if sig != 0 {
                eprintln!("\nsignal {sig}: removing everything the harness made");
                undo_all();
                std::process::exit(128 + sig as i32);
            }
        });
    });
}

/// Undoes every registered item, newest first. Processes go first, then mounts and
/// directories, then namespaces.
pub fn undo_all() {
    let items: Vec<Item> = ITEMS
        .lock()
        .map(|mut v| std::mem::take(&mut *v))
        .unwrap_or_default();
    for item in items.iter().rev() {
        if let Item::Process(pid) = item {
            crate::process::terminate(*pid, std::time::Duration::from_secs(10));
        }
    }
    for item in items.iter().rev() {
        if let Item::Dir(dir) = item {
            unmount_below(dir);
            let _ = std::fs::remove_dir_all(dir);
        }
    }
    for item in items.iter().rev() {
        if let Item::Netns(name) = item {
            let _ = Command::new("ip").args(["netns", "del", name]).status();
        }
    }
}

/// Unmounts whatever is mounted below `dir`, deepest first.
pub fn unmount_below(dir: &std::path::Path) {
    let mounts = std::fs::read_to_string("/proc/mounts").unwrap_or_default();
    let prefix = dir.to_string_lossy().into_owned();
    let mut points: Vec<&str> = mounts
        .lines()
        .filter_map(|l| l.split_whitespace().nth(1))
        .filter(|p| p.starts_with(&prefix))
        .collect();
    points.sort_by_key(|p| std::cmp::Reverse(p.len()));
    for p in points {
        let _ = Command::new("umount").args(["-l", p]).status();
    }
}
