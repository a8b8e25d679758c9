//! Settings no safe API covers: the allocator's mmap threshold and vsock buffer sizes. The only
//! `unsafe` in this crate.
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

/// `SO_VM_SOCKETS_BUFFER_SIZE` and `SO_VM_SOCKETS_BUFFER_MAX_SIZE` from `linux/vm_sockets.h`
/// (libc does not carry them); the level is `AF_VSOCK`.
const SO_VM_SOCKETS_BUFFER_SIZE: libc::c_int = 0;
const SO_VM_SOCKETS_BUFFER_MAX_SIZE: libc::c_int = 2;

/// Sets a vsock socket's buffer (the credit it grants its peer) to `bytes`, raising the maximum
/// first: the kernel clamps the size to it, and both default to 256 KiB.
pub fn set_vsock_buffer(fd: std::os::fd::BorrowedFd<'_>, bytes: u64) -> std::io::Result<()> {
    use std::os::fd::AsRawFd;
    for opt in [SO_VM_SOCKETS_BUFFER_MAX_SIZE, SO_VM_SOCKETS_BUFFER_SIZE] {
        // SAFETY: `fd` is a live descriptor for the duration of the borrow; the option value is
        // a u64 on the stack whose size is passed with it, as vm_sockets(7) specifies.
        let rc = unsafe {
            libc::setsockopt(
                fd.as_raw_fd(),
                libc::AF_VSOCK,
                opt,
                (&bytes as *const u64).cast(),
                std::mem::size_of::<u64>() as libc::socklen_t,
            )
        };
        if rc != 0 {
            return Err(std::io::Error::last_os_error());
        }
    }
    Ok(())
}

/// Reads a vsock socket's buffer size (for tests and logs).
pub fn vsock_buffer(fd: std::os::fd::BorrowedFd<'_>) -> std::io::Result<u64> {
    use std::os::fd::AsRawFd;
    let mut bytes: u64 = 0;
    let mut len = std::mem::size_of::<u64>() as libc::socklen_t;
    // SAFETY: as above; `bytes` and `len` are valid for writes of the sizes given.
    let rc = unsafe {
        libc::getsockopt(
            fd.as_raw_fd(),
            libc::AF_VSOCK,
            SO_VM_SOCKETS_BUFFER_SIZE,
            (&mut bytes as *mut u64).cast(),
            &mut len,
        )
    };
    if rc != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(bytes)
}

/// Registers an owned descriptor with tokio's reactor for `interest` only.
///
/// `T` owns its descriptor (it converts to and from [`std::os::fd::OwnedFd`]: a `File`, a
/// socket, an `OwnedFd`), so the descriptor stays open and unchanged for as long as the
/// `AsyncFd` holds it, which is what registering requires.
pub fn register<T>(
    inner: T,
    interest: tokio::io::Interest,
) -> std::io::Result<tokio::io::unix::AsyncFd<T>>
where
    T: std::os::fd::AsRawFd + Into<std::os::fd::OwnedFd> + From<std::os::fd::OwnedFd>,
{
    // SAFETY: `inner` owns its descriptor (the bound above) and the `AsyncFd` owns `inner`, so
    // the descriptor is open, and the same one, for the registration's whole life.
    unsafe { tokio::io::unix::AsyncFd::register_with_interest(inner, interest) }
        .map_err(std::io::Error::from)
}

#[cfg(test)]
mod tests {
    /// No vsock transport is needed to create an unconnected AF_VSOCK socket and set its buffer;
    /// where even that is missing (no vsock module), there is nothing to check.
    #[test]
    fn vsock_buffer_is_raised_past_the_default_maximum() {
        use std::os::fd::{AsFd, FromRawFd, OwnedFd};
        // SAFETY: socket(2) returns a new descriptor or -1; a new one is owned by OwnedFd.
        let fd = unsafe { libc::socket(libc::AF_VSOCK, libc::SOCK_STREAM, 0) };
        if fd < 0 {
            eprintln!("no AF_VSOCK here: {}", std::io::Error::last_os_error());
            return;
        }
        // SAFETY: `fd` was just returned by socket(2) and is owned by nobody else.
        let fd = unsafe { OwnedFd::from_raw_fd(fd) };
        super::set_vsock_buffer(fd.as_fd(), 2 << 20).unwrap();
        assert_eq!(super::vsock_buffer(fd.as_fd()).unwrap(), 2 << 20);
    }
}
