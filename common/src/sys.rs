//! Process-wide settings no safe API covers. The only `unsafe` in this crate.
#![allow(unsafe_code)]

/// Allocations at least this large get pages of their own from the kernel.
pub const MMAP_THRESHOLD: usize = 64 * 1024;

/// Pins glibc's mmap threshold so that every large buffer (each connection's socket rings and
/// copy buffers) is a fresh anonymous mapping: its pages cost no memory until data touches them,
/// and go back to the kernel when the connection ends. Without this, glibc raises the threshold
/// after the first large free, later buffers come from recycled heap memory that `calloc` must
/// zero, and every idle connection costs its full buffer size in RSS.
pub fn pin_mmap_threshold() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: mallopt only changes allocator tuning; it is called before any other thread runs
    // (from main, before the runtime starts) and takes plain integers.
    unsafe {
        libc::mallopt(libc::M_MMAP_THRESHOLD, MMAP_THRESHOLD as libc::c_int);
    }
}
