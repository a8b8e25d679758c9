//! The TAP device: frames in and out, with pooled buffers.
//!
//! Buffers are allocated once: one receive buffer and one transmit buffer of a full frame each,
//! reused for every packet. Each buffer starts with the `virtio_net_hdr` the TAP exchanges: on
//! transmit it is written once, marking every frame's checksums valid; on receive it is skipped.
//! Reads and writes are non-blocking; an error is counted and logged (rate-limited), never a
//! panic (smoltcp's own `TunTapInterface` allocates per packet and panics on errors).
//!
//! The shards speak IP ([`crate::shard`]); [`TapWire`] puts each of their packets in an Ethernet
//! frame from the stack's MAC to the enclave kernel's, whose MAC enclave-proxy sets itself.

use std::fs::File;
use std::io::{self, Read, Write};

use smoltcp::wire::{EthernetAddress, EthernetProtocol};
use tokio::io::unix::AsyncFd;

use crate::shard::Wire;
use crate::sys::{VNET_HDR_F_DATA_VALID, VNET_HDR_LEN};

/// Ethernet header length.
pub const ETH_HEADER: usize = 14;

/// Frames read from the TAP per stack iteration before connections get serviced again.
pub const RX_BUDGET: usize = 256;

/// The TAP device.
#[derive(Debug)]
pub struct Tap {
    fd: AsyncFd<File>,
    mtu: usize,
    rx: Box<[u8]>,
    tx: Box<[u8]>,
    /// The last read found the TAP empty: wait for readiness before reading again.
    pub rx_blocked: bool,
    /// Frames that could not be written to the TAP.
    pub tx_dropped: u64,
}

/// What the TAP sends shard packets with: the transmit half of a [`Tap`].
pub struct TapWire<'a> {
    file: &'a File,
    mtu: usize,
    tx: &'a mut [u8],
    dropped: &'a mut u64,
    src: EthernetAddress,
    dst: EthernetAddress,
}

impl Tap {
    /// Wraps an open TAP file descriptor (see [`crate::sys::open_tap`]).
    pub fn new(file: File, mtu: usize) -> io::Result<Tap> {
        let frame = VNET_HDR_LEN + ETH_HEADER + mtu;
        let mut tx = vec![0u8; frame].into_boxed_slice();
        tx[0] = VNET_HDR_F_DATA_VALID;
        Ok(Tap {
            fd: crate::sys::register_tap(file)?,
            mtu,
            rx: vec![0u8; frame].into_boxed_slice(),
            tx,
            rx_blocked: false,
            tx_dropped: 0,
        })
    }

    /// Waits until the TAP may have frames to read.
    pub async fn readable(&self) -> io::Result<()> {
        let mut guard = self.fd.readable().await?;
        // Readiness is cleared before reading: frames that arrive after this point raise a new
        // edge, and the stack reads until `WouldBlock` before waiting again.
        guard.clear_ready();
        Ok(())
    }

    /// Reads one frame; returns the Ethernet frame's range in [`Tap::split`]'s buffer, or
    /// `None` (and sets `rx_blocked`) when the TAP is empty or failed.
    pub fn read(&mut self) -> Option<std::ops::Range<usize>> {
        loop {
            let mut file = self.fd.get_ref();
            match file.read(&mut self.rx) {
                Ok(n) if n > VNET_HDR_LEN + ETH_HEADER => return Some(VNET_HDR_LEN..n),
                Ok(_) => continue,
                Err(e) => {
                    if e.kind() != io::ErrorKind::WouldBlock {
                        common::warn_limited!("TAP read failed: {e}");
                    }
                    self.rx_blocked = true;
                    return None;
                }
            }
        }
    }

    /// The receive buffer, and the transmit half for packets from `src` to `dst`.
    pub fn split(&mut self, src: EthernetAddress, dst: EthernetAddress) -> (&[u8], TapWire<'_>) {
        (
            &self.rx,
            TapWire {
                file: self.fd.get_ref(),
                mtu: self.mtu,
                tx: &mut self.tx,
                dropped: &mut self.tx_dropped,
                src,
                dst,
            },
        )
    }

    /// Writes one Ethernet frame straight to the TAP (ICMP errors, ARP replies).
    pub fn send_raw(&mut self, frame: &[u8]) {
        let Some(buf) = self.tx.get_mut(..VNET_HDR_LEN + frame.len()) else {
            self.tx_dropped += 1;
            return;
        };
        buf[VNET_HDR_LEN..].copy_from_slice(frame);
        write_frame(self.fd.get_ref(), buf, &mut self.tx_dropped);
    }
}

impl Wire for TapWire<'_> {
    fn tx_buffer(&mut self, len: usize) -> &mut [u8] {
        let at = VNET_HDR_LEN + ETH_HEADER;
        let end = (at + len).min(self.tx.len());
        &mut self.tx[at..end]
    }

    fn send(&mut self, len: usize) {
        let at = VNET_HDR_LEN + ETH_HEADER;
        let end = (at + len).min(self.tx.len());
        // The virtio header was written once, at creation; the Ethernet header is filled here.
        let ethertype = match self.tx.get(at).map(|b| b >> 4) {
            Some(6) => EthernetProtocol::Ipv6,
            _ => EthernetProtocol::Ipv4,
        };
        let eth = &mut self.tx[VNET_HDR_LEN..at];
        eth[..6].copy_from_slice(self.dst.as_bytes());
        eth[6..12].copy_from_slice(self.src.as_bytes());
        eth[12..].copy_from_slice(&u16::from(ethertype).to_be_bytes());
        write_frame(self.file, &self.tx[..end], self.dropped);
    }

    fn mtu(&self) -> usize {
        self.mtu
    }
}

fn write_frame(file: &File, frame: &[u8], dropped: &mut u64) {
    let mut f = file;
    match f.write(frame) {
        Ok(n) if n == frame.len() => {}
        Ok(n) => {
            *dropped += 1;
            common::warn_limited!("short TAP write: {n} of {} bytes", frame.len());
        }
        Err(e) => {
            *dropped += 1;
            if e.kind() != io::ErrorKind::WouldBlock {
                common::warn_limited!("TAP write failed: {e}");
            }
        }
    }
}
