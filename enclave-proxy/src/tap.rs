//! The TAP device as a smoltcp [`Device`], with the SYN filter in front of the stack.
//!
//! Buffers are allocated once: one receive buffer and one transmit buffer of a full frame each,
//! reused for every packet. Each buffer starts with the `virtio_net_hdr` the TAP exchanges: on
//! transmit it is written once, marking every frame's checksums valid; on receive it is skipped. Reads and writes are non-blocking; an error is counted and logged,
//! never a panic (smoltcp's own `TunTapInterface` allocates per packet and panics on errors).

use std::collections::{HashMap, VecDeque};
use std::fs::File;
use std::io::{self, Read, Write};

use smoltcp::phy::{self, Checksum, ChecksumCapabilities, Device, DeviceCapabilities, Medium};
use smoltcp::time::Instant;
use tokio::io::unix::AsyncFd;

use crate::packet::{classify, FlowKey, Frame};
use crate::sys::{VNET_HDR_F_DATA_VALID, VNET_HDR_LEN};

/// Ethernet header length.
pub const ETH_HEADER: usize = 14;

/// Frames read from the TAP per stack iteration before connections get serviced again.
pub const RX_BUDGET: usize = 256;

/// Where a flow is in its life, as the SYN filter needs to know.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FlowState {
    /// Waiting on host-proxy: the first SYN is held and retransmissions are dropped.
    Pending,
    /// Has a smoltcp socket: every frame goes to smoltcp.
    Active,
}

/// A SYN held while host-proxy is asked for the connection.
#[derive(Debug)]
pub struct HeldSyn {
    /// The flow it opens.
    pub key: FlowKey,
    /// The frame, to replay into smoltcp or to quote in an ICMP error.
    pub frame: Vec<u8>,
}

/// The TAP device.
#[derive(Debug)]
pub struct Tap {
    fd: AsyncFd<File>,
    mtu: usize,
    rx: Box<[u8]>,
    tx: Box<[u8]>,
    /// Frames to hand to smoltcp before reading the TAP again (replayed SYNs).
    pub inject: VecDeque<Vec<u8>>,
    /// Every flow with a pending stream or a socket.
    pub flows: HashMap<FlowKey, FlowState>,
    /// New SYNs seen since the stack last looked (at most one read budget's worth): the stack
    /// applies its caps to each and fails the ones past them at once, never silently.
    pub held: Vec<HeldSyn>,
    /// Frames left in this iteration's read budget.
    pub rx_budget: usize,
    /// The last read found the TAP empty: wait for readiness before reading again.
    pub rx_blocked: bool,
    /// Frames that could not be written to the TAP.
    pub tx_dropped: u64,
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
            inject: VecDeque::new(),
            flows: HashMap::new(),
            held: Vec::new(),
            rx_budget: RX_BUDGET,
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

    /// Writes one frame straight to the TAP (for frames smoltcp does not make).
    pub fn send_raw(&mut self, frame: &[u8]) {
        let Some(buf) = self.tx.get_mut(..VNET_HDR_LEN + frame.len()) else {
            self.tx_dropped += 1;
            return;
        };
        buf[VNET_HDR_LEN..].copy_from_slice(frame);
        write_frame(self.fd.get_ref(), buf, &mut self.tx_dropped);
    }

    /// Marks a held flow as having a socket now.
    pub fn activate(&mut self, key: FlowKey) {
        self.flows.insert(key, FlowState::Active);
    }

    /// Forgets a flow (its socket is gone, or its set-up failed).
    pub fn forget(&mut self, key: &FlowKey) {
        self.flows.remove(key);
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

/// A received frame: borrowed from the device's buffer, or a replayed SYN.
pub enum RxToken<'a> {
    /// Read from the TAP into the device buffer.
    Borrowed(&'a [u8]),
    /// A replayed frame.
    Owned(Vec<u8>),
}

impl phy::RxToken for RxToken<'_> {
    fn consume<R, F: FnOnce(&[u8]) -> R>(self, f: F) -> R {
        match self {
            RxToken::Borrowed(b) => f(b),
            RxToken::Owned(v) => f(&v),
        }
    }
}

/// Transmits into the device's one transmit buffer, then writes it to the TAP.
pub struct TxToken<'a> {
    file: &'a File,
    buf: &'a mut [u8],
    dropped: &'a mut u64,
}

impl phy::TxToken for TxToken<'_> {
    fn consume<R, F: FnOnce(&mut [u8]) -> R>(self, len: usize, f: F) -> R {
        let len = (VNET_HDR_LEN + len).min(self.buf.len());
        let buf = &mut self.buf[..len];
        // The header before the frame was written once, at creation.
        let r = f(&mut buf[VNET_HDR_LEN..]);
        write_frame(self.file, buf, self.dropped);
        r
    }
}

impl Device for Tap {
    type RxToken<'a> = RxToken<'a>;
    type TxToken<'a> = TxToken<'a>;

    fn receive(&mut self, _now: Instant) -> Option<(RxToken<'_>, TxToken<'_>)> {
        let frame = match self.inject.pop_front() {
            Some(f) => RxToken::Owned(f),
            None => loop {
                if self.rx_budget == 0 || self.rx_blocked {
                    return None;
                }
                self.rx_budget -= 1;
                let mut file = self.fd.get_ref();
                let n = match file.read(&mut self.rx) {
                    Ok(n) if n > VNET_HDR_LEN + ETH_HEADER => n,
                    Ok(_) => continue,
                    Err(e) => {
                        if e.kind() != io::ErrorKind::WouldBlock {
                            common::warn_limited!("TAP read failed: {e}");
                        }
                        self.rx_blocked = true;
                        return None;
                    }
                };
                let frame = VNET_HDR_LEN..n;
                let Frame::Syn(key) = classify(&self.rx[frame.clone()]) else {
                    break RxToken::Borrowed(&self.rx[frame]);
                };
                match self.flows.get(&key) {
                    Some(FlowState::Active) => break RxToken::Borrowed(&self.rx[frame]),
                    Some(FlowState::Pending) => continue,
                    None => {
                        self.flows.insert(key, FlowState::Pending);
                        self.held.push(HeldSyn {
                            key,
                            frame: self.rx[frame].to_vec(),
                        });
                    }
                }
            },
        };
        let tx = TxToken {
            file: self.fd.get_ref(),
            buf: &mut self.tx,
            dropped: &mut self.tx_dropped,
        };
        Some((frame, tx))
    }

    fn transmit(&mut self, _now: Instant) -> Option<TxToken<'_>> {
        Some(TxToken {
            file: self.fd.get_ref(),
            buf: &mut self.tx,
            dropped: &mut self.tx_dropped,
        })
    }

    fn capabilities(&self) -> DeviceCapabilities {
        let mut caps = DeviceCapabilities::default();
        caps.medium = Medium::Ethernet;
        caps.max_transmission_unit = self.mtu + ETH_HEADER;
        // Frames from the TAP never crossed a wire, and with checksum offload the kernel leaves
        // their TCP checksums partial, so they are not verified. Frames we send carry correct
        // checksums (they are marked valid in the virtio header, and must be).
        let mut checksum = ChecksumCapabilities::default();
        checksum.ipv4 = Checksum::Tx;
        checksum.tcp = Checksum::Tx;
        caps.checksum = checksum;
        caps
    }
}
