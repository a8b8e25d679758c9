//! The ioctls no well-kept crate covers for us: attaching to a TAP device and choosing its
//! offloads.
//!
//! This is the only module where `unsafe` is allowed; every block says why it is sound.
#![allow(unsafe_code)]

use std::fs::{File, OpenOptions};
use std::io;
use std::os::fd::AsRawFd;
use std::os::unix::fs::OpenOptionsExt;

/// Longest interface name the kernel takes, without the trailing NUL.
pub const IFNAMSIZ_MAX: usize = libc::IFNAMSIZ - 1;

/// Length of the `virtio_net_hdr` that prefixes every frame read from or written to the TAP.
pub const VNET_HDR_LEN: usize = 10;

/// `TUNSETOFFLOAD` flags: the kernel may hand us frames with partial checksums.
pub const TUN_F_CSUM: u32 = libc::TUN_F_CSUM;
/// `TUNSETOFFLOAD` flags: the kernel may hand us TCP/IPv4 super-frames (TSO) for us to segment.
pub const TUN_F_TSO4: u32 = libc::TUN_F_TSO4;
/// `TUNSETOFFLOAD` flags: the same for TCP/IPv6.
pub const TUN_F_TSO6: u32 = libc::TUN_F_TSO6;

/// Opens `/dev/net/tun` and attaches it to the TAP device `name` (creating it if needed), in
/// non-blocking mode. Each read or write is one [`VNET_HDR_LEN`]-byte `virtio_net_hdr` followed
/// by one Ethernet frame, and the device does checksum offload ([`TUN_F_CSUM`]): the kernel does
/// not compute checksums for frames it sends us (we do not verify them: they never crossed a
/// wire). [`set_offload`] may then add TSO.
pub fn open_tap(name: &str) -> io::Result<File> {
    if name.is_empty() || name.len() > IFNAMSIZ_MAX || name.as_bytes().contains(&0) {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("{name:?} is not a valid interface name (1 to {IFNAMSIZ_MAX} bytes)"),
        ));
    }
    let file = OpenOptions::new()
        .read(true)
        .write(true)
        .custom_flags(libc::O_NONBLOCK | libc::O_CLOEXEC)
        .open("/dev/net/tun")?;
    // SAFETY: `ifreq` is a plain C struct of integers and arrays, for which all-zero bytes are a
    // valid value.
    let mut req: libc::ifreq = unsafe { std::mem::zeroed() };
    for (dst, src) in req.ifr_name.iter_mut().zip(name.as_bytes()) {
        *dst = *src as libc::c_char;
    }
    // The name was checked above to leave room for the NUL that `zeroed` put at the end.
    req.ifr_ifru.ifru_flags =
        (libc::IFF_TAP | libc::IFF_NO_PI | libc::IFF_VNET_HDR) as libc::c_short;
    // SAFETY: the fd is an open `/dev/net/tun` that outlives the call, and TUNSETIFF reads and
    // writes exactly one `ifreq`, which `req` is, borrowed mutably for the call's duration.
    let rc = unsafe { libc::ioctl(file.as_raw_fd(), libc::TUNSETIFF, &mut req) };
    if rc < 0 {
        return Err(io::Error::last_os_error());
    }
    let hdr_len = VNET_HDR_LEN as libc::c_int;
    // SAFETY: TUNSETVNETHDRSZ reads one `int` through the pointer, which points at `hdr_len`,
    // alive for the call.
    let rc = unsafe { libc::ioctl(file.as_raw_fd(), libc::TUNSETVNETHDRSZ, &hdr_len) };
    if rc < 0 {
        return Err(io::Error::last_os_error());
    }
    set_offload(&file, TUN_F_CSUM)?;
    Ok(file)
}

/// Sets the TAP's offloads (`TUNSETOFFLOAD`): what the kernel may leave to us in the frames it
/// sends, a combination of the `TUN_F_*` flags above. The TSO flags need [`TUN_F_CSUM`]. They
/// only govern the kernel-to-us direction: the kernel takes super-frames *from* us, marked in
/// their `virtio_net_hdr`, whatever is set here.
pub fn set_offload(tap: &File, flags: u32) -> io::Result<()> {
    // SAFETY: TUNSETOFFLOAD takes its flags by value; no memory is passed. The fd is an open TUN
    // descriptor borrowed for the call.
    let rc = unsafe {
        libc::ioctl(
            tap.as_raw_fd(),
            libc::TUNSETOFFLOAD,
            libc::c_ulong::from(flags),
        )
    };
    if rc < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// Registers the TAP with the tokio reactor for read readiness.
pub fn register_tap(file: File) -> io::Result<tokio::io::unix::AsyncFd<File>> {
    common::sys::register(file, tokio::io::Interest::READABLE)
}
