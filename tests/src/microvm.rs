//! MicroVM guests with real AF_VSOCK (DESIGN.md, "Real vsock"): QEMU under TCG booting Debian's
//! cloud kernel and the initramfs `scripts/microvm.sh` builds, its vsock served on the host by
//! `vhost-device-vsock`, which shows it as hybrid vsock on a Unix socket.
//!
//! The guest's `/init` (microvm/init) starts enclave-proxy or host-proxy, then the test probe
//! (`enclave-net-probe`), which answers this side's commands on vsock port [`PROBE_PORT`].
//! Everything a guest starts dies with it; the guest, vhost-device-vsock and the directory are
//! stopped and removed on drop, by PID.

use std::path::PathBuf;
use std::process::Command;
use std::time::{Duration, Instant};

use common::transport::LinkAddr;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::process::Daemon;
use crate::topology::TempDir;

/// The vsock port the guest's probe answers on.
pub const PROBE_PORT: u32 = 7000;

/// Where `scripts/microvm.sh` put the kernel, initramfs and vhost-device-vsock.
pub fn dir() -> PathBuf {
    let dir = std::env::var_os("MICROVM_DIR").map_or_else(
        || PathBuf::from(concat!(env!("CARGO_MANIFEST_DIR"), "/../.microvm")),
        PathBuf::from,
    );
    assert!(
        ["initramfs.cpio.gz", "initramfs-docker.cpio"]
            .iter()
            .all(|image| dir.join(image).exists()),
        "{} has no microVM images: run scripts/microvm.sh first (scripts/test.sh does)",
        dir.display()
    );
    dir
}

/// One vhost-device-vsock serving guests, each with its CID.
#[derive(Debug)]
pub struct Vsock {
    daemon: Daemon,
    /// The hybrid vsock socket of each guest, by CID.
    pub guests: Vec<(u32, PathBuf, PathBuf)>,
}

impl Vsock {
    /// vhost-device-vsock for guests of these CIDs: each gets a vhost-user socket (for QEMU) and
    /// a hybrid vsock socket (for the host) in `dir`. Several guests of one instance reach each
    /// other over real AF_VSOCK.
    pub fn start(dir: &TempDir, cids: &[u32]) -> Vsock {
        let mut cmd = Command::new(self::dir().join("tools/bin/vhost-device-vsock"));
        let mut guests = Vec::new();
        for &cid in cids {
            let vhost = dir.0.join(format!("vhost-{cid}.sock"));
            let uds = dir.0.join(format!("vsock-{cid}.sock"));
            cmd.arg("--vm").arg(format!(
                "guest-cid={cid},socket={},uds-path={}",
                vhost.display(),
                uds.display()
            ));
            guests.push((cid, vhost, uds));
        }
        let log = dir.0.join("vhost-device-vsock.log");
        // It says nothing when ready; its sockets appear once it listens.
        let daemon = Daemon::start_within(
            "vhost-device-vsock",
            cmd,
            log,
            "",
            Duration::from_secs(5),
            Duration::from_secs(2),
        );
        let deadline = Instant::now() + Duration::from_secs(10);
        while !guests.iter().all(|(_, vhost, _)| vhost.exists()) {
            assert!(
                Instant::now() < deadline,
                "vhost-device-vsock made no sockets"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
        Vsock { daemon, guests }
    }

    /// The vhost-user socket and hybrid vsock socket of guest `cid`.
    pub fn guest(&self, cid: u32) -> (PathBuf, PathBuf) {
        let (_, vhost, uds) = self
            .guests
            .iter()
            .find(|(c, ..)| *c == cid)
            .expect("a guest CID");
        (vhost.clone(), uds.clone())
    }

    /// vhost-device-vsock's log.
    pub fn log_text(&self) -> String {
        self.daemon.log_text()
    }
}

/// A booted guest.
#[derive(Debug)]
pub struct Guest {
    qemu: Daemon,
    /// Its hybrid vsock socket.
    pub uds: PathBuf,
    /// How long it took from starting QEMU to the probe being up.
    pub boot: Duration,
}

impl Guest {
    /// Boots guest `cid` of `vsock` with `params` on the kernel command line (`enet.role=...`,
    /// see microvm/init); returns once its probe serves.
    pub fn boot(dir: &TempDir, vsock: &Vsock, cid: u32, params: &str) -> Guest {
        Guest::boot_image(dir, vsock, cid, params, "initramfs.cpio.gz", 512)
    }

    /// Like [`Guest::boot`], from the Docker image (`initramfs-docker.cpio`), with room for
    /// the image unpacked, dockerd and a container.
    pub fn boot_docker(dir: &TempDir, vsock: &Vsock, cid: u32, params: &str) -> Guest {
        Guest::boot_image(dir, vsock, cid, params, "initramfs-docker.cpio", 1536)
    }

    fn boot_image(
        dir: &TempDir,
        vsock: &Vsock,
        cid: u32,
        params: &str,
        initramfs: &str,
        mem_mib: u32,
    ) -> Guest {
        let image = self::dir();
        let (vhost, uds) = vsock.guest(cid);
        let mut cmd = Command::new("qemu-system-x86_64");
        let mem = format!("{mem_mib}M");
        cmd.args(["-accel", "tcg", "-machine", "pc", "-m", &mem, "-smp", "1"]);
        cmd.args([
            "-nographic",
            "-nic",
            "none",
            "-no-reboot",
            "-monitor",
            "none",
        ]);
        cmd.args(["-serial", "stdio"]);
        cmd.arg("-kernel").arg(image.join("kernel/vmlinuz"));
        cmd.arg("-initrd").arg(image.join(initramfs));
        cmd.arg("-append")
            .arg(format!("console=ttyS0 panic=-1 quiet {params}"));
        cmd.args([
            "-object",
            &format!("memory-backend-memfd,id=mem,size={mem},share=on"),
            "-numa",
            "node,memdev=mem",
        ]);
        cmd.arg("-chardev")
            .arg(format!("socket,id=vsock,path={}", vhost.display()));
        cmd.args(["-device", "vhost-user-vsock-pci,chardev=vsock"]);
        // Entropy: without it getrandom() can wait for seconds under TCG.
        cmd.args(["-device", "virtio-rng-pci"]);
        let started = Instant::now();
        let qemu = Daemon::start_within(
            "qemu",
            cmd,
            dir.0.join(format!("guest-{cid}.log")),
            "probe agent on vsock port",
            Duration::from_secs(300),
            Duration::from_secs(5),
        );
        Guest {
            qemu,
            uds,
            boot: started.elapsed(),
        }
    }

    /// Runs one probe command in the guest; its one-line answer.
    pub async fn probe(&self, command: &str) -> String {
        let addr = LinkAddr::Hybrid {
            path: self.uds.clone(),
            port: PROBE_PORT,
        };
        let mut stream = addr.connect().await.expect("the guest's probe");
        stream
            .write_all(format!("{command}\n").as_bytes())
            .await
            .unwrap();
        let mut answer = String::new();
        stream.read_to_string(&mut answer).await.unwrap();
        answer.trim().to_string()
    }

    /// The guest's console so far.
    pub fn console(&self) -> String {
        self.qemu.log_text()
    }
}
