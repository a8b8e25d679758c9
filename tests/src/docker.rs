//! An unmodified `dockerd` inside the emulated enclave, and registry-free images.
//!
//! dockerd runs with its default networking (bridge, its own NAT rules, `-p`), started with
//! `nsenter --net=` rather than `ip netns exec`, which would remount `/sys` and hide the cgroup
//! mounts (DESIGN.md). Like Nitro's enclave kernel, which has no nf_tables, it uses
//! iptables-legacy: a directory first on its `PATH` maps every iptables command to
//! `xtables-legacy-multi`. Its data root, exec root and socket live in a temporary directory.
//!
//! Everything is undone on drop: containers removed, dockerd stopped by its PID, leftover mounts
//! unmounted, the directory removed (and on Ctrl-C, by [`crate::cleanup`]).

use std::os::unix::fs::symlink;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::Duration;

use crate::netns::Netns;
use crate::process::Daemon;

/// The memcached image: busybox, memcached and its libraries.
pub const MEMCACHED_IMAGE: &str = "enclave-net/memcached";
/// The same root filesystem with a shell entry point, for busybox tools (nc, httpd).
pub const BUSYBOX_IMAGE: &str = "enclave-net/busybox";
/// busybox, iperf3 and its libraries; runs `iperf3 -s` (port 5201) unless given other
/// arguments. Not imported by [`Docker::start`]: call [`Docker::import_iperf3_image`].
pub const IPERF3_IMAGE: &str = "enclave-net/iperf3";

/// dockerd in a namespace.
#[derive(Debug)]
pub struct Docker {
    daemon: Option<Daemon>,
    dir: PathBuf,
    netns_path: String,
    /// dockerd's /etc/resolv.conf, if not the machine's.
    resolv_conf: Option<PathBuf>,
    /// More dockerd arguments.
    extra: Vec<String>,
}

fn short_dir() -> PathBuf {
    use std::sync::atomic::{AtomicU32, Ordering};
    static N: AtomicU32 = AtomicU32::new(0);
    // containerd's socket path lives under the exec root and must stay under 108 bytes.
    let dir = PathBuf::from(format!(
        "/tmp/enet-docker-{}-{}",
        std::process::id(),
        N.fetch_add(1, Ordering::Relaxed)
    ));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).expect("create docker dir");
    crate::cleanup::register(crate::cleanup::Item::Dir(dir.clone()));
    dir
}

impl Docker {
    /// Starts dockerd inside `ns` and imports the test images.
    pub fn start(ns: &Netns) -> Docker {
        Docker::start_with(ns, None, &[])
    }

    /// Like [`Docker::start`], with `resolv_conf` as dockerd's /etc/resolv.conf (bind-mounted in
    /// a mount namespace of its own), as in an enclave whose resolv.conf enclave-proxy wrote:
    /// containers on the default bridge inherit its nameserver. `extra` goes to dockerd.
    pub fn start_with(ns: &Netns, resolv_conf: Option<&Path>, extra: &[&str]) -> Docker {
        let dir = short_dir();
        let legacy = dir.join("iptables-legacy");
        std::fs::create_dir_all(&legacy).expect("mkdir");
        for tool in [
            "iptables",
            "iptables-save",
            "iptables-restore",
            "ip6tables",
            "ip6tables-save",
            "ip6tables-restore",
        ] {
            symlink("/usr/sbin/xtables-legacy-multi", legacy.join(tool)).expect("symlink");
        }
        let mut docker = Docker {
            daemon: None,
            dir,
            netns_path: ns.path(),
            resolv_conf: resolv_conf.map(Path::to_path_buf),
            extra: extra.iter().map(|s| s.to_string()).collect(),
        };
        docker.start_daemon();
        docker.import_images();
        docker
    }

    fn start_daemon(&mut self) {
        let path = format!(
            "{}:{}",
            self.dir.join("iptables-legacy").display(),
            std::env::var("PATH").unwrap_or_else(|_| "/usr/sbin:/usr/bin:/sbin:/bin".into())
        );
        let mut cmd = match &self.resolv_conf {
            None => Command::new("nsenter"),
            Some(resolv) => {
                // unshare and nsenter both exec, so the PID is dockerd's.
                let mut c = Command::new("unshare");
                c.args(["--mount", "--propagation", "private", "--", "sh", "-c"])
                    .arg(r#"mount --bind "$0" /etc/resolv.conf && exec nsenter "$@""#)
                    .arg(resolv);
                c
            }
        };
        cmd.arg(format!("--net={}", self.netns_path))
            .arg("/usr/sbin/dockerd")
            .arg("--data-root")
            .arg(self.dir.join("data"))
            .arg("--exec-root")
            .arg(self.dir.join("exec"))
            .arg("-H")
            .arg(format!("unix://{}", self.socket().display()))
            .arg("--pidfile")
            .arg(self.dir.join("dockerd.pid"))
            .args(&self.extra)
            .env("PATH", path);
        self.daemon = Some(Daemon::start_with(
            "dockerd",
            cmd,
            self.dir.join("dockerd.log"),
            "API listen on",
            Duration::from_secs(20),
        ));
    }

    /// The API socket.
    pub fn socket(&self) -> PathBuf {
        self.dir.join("docker.sock")
    }

    /// Runs the docker CLI against this daemon.
    pub fn try_cli(&self, args: &[&str]) -> Output {
        Command::new("/usr/bin/docker")
            .arg("-H")
            .arg(format!("unix://{}", self.socket().display()))
            .args(args)
            .output()
            .expect("run /usr/bin/docker")
    }

    /// Runs the docker CLI and returns its stdout, failing the test if it fails.
    pub fn cli(&self, args: &[&str]) -> String {
        let out = self.try_cli(args);
        assert!(
            out.status.success(),
            "docker {args:?} failed: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// Stops and starts dockerd again with the same state.
    pub fn restart(&mut self) {
        if let Some(mut d) = self.daemon.take() {
            d.stop();
        }
        self.start_daemon();
    }

    /// dockerd's log so far.
    pub fn log_text(&self) -> String {
        self.daemon
            .as_ref()
            .map(Daemon::log_text)
            .unwrap_or_default()
    }

    /// Builds the root filesystem and `docker import`s both images (about 0.1 s each).
    fn import_images(&self) {
        let root = self.dir.join("rootfs");
        build_rootfs(&root);
        for (name, changes) in [
            (
                MEMCACHED_IMAGE,
                r#"-c 'ENTRYPOINT ["/usr/bin/memcached"]' -c 'CMD ["-u","nobody","-m","64","-t","2"]'"#,
            ),
            (BUSYBOX_IMAGE, r#"-c 'CMD ["/bin/sh"]'"#),
        ] {
            let script = format!(
                "tar -C {root} -c . | /usr/bin/docker -H unix://{sock} import {changes} - {name}",
                root = root.display(),
                sock = self.socket().display(),
            );
            crate::netns::sh(&["bash", "-c", &script]);
        }
    }
}

impl Docker {
    /// Builds and `docker import`s [`IPERF3_IMAGE`] the same way as the memcached image:
    /// Debian's binaries and the libraries `ldd` lists for them, no registry.
    pub fn import_iperf3_image(&self) {
        let root = self.dir.join("rootfs-iperf3");
        for d in ["bin", "usr/bin", "etc", "tmp"] {
            std::fs::create_dir_all(root.join(d)).expect("mkdir rootfs");
        }
        // iperf3 makes its buffers from a temporary file.
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(root.join("tmp"), std::fs::Permissions::from_mode(0o1777))
            .expect("chmod tmp");
        std::fs::copy("/bin/busybox", root.join("bin/busybox"))
            .expect("busybox-static is installed");
        symlink("busybox", root.join("bin/sh")).expect("symlink sh");
        add_binary(&root, "/usr/bin/iperf3");
        std::fs::write(root.join("etc/passwd"), "root:x:0:0:root:/:/bin/sh\n").expect("passwd");
        std::fs::write(root.join("etc/group"), "root:x:0:\n").expect("group");
        let script = format!(
            "tar -C {root} -c . | /usr/bin/docker -H unix://{sock} import \
             -c 'ENTRYPOINT [\"/usr/bin/iperf3\"]' -c 'CMD [\"-s\"]' - {IPERF3_IMAGE}",
            root = root.display(),
            sock = self.socket().display(),
        );
        crate::netns::sh(&["bash", "-c", &script]);
    }
}

/// The `udp-echo` test binary (UDP echo on the port given as its argument).
pub const UDP_ECHO_IMAGE: &str = "enclave-net/udp-echo";

impl Docker {
    /// Builds and `docker import`s [`UDP_ECHO_IMAGE`]: the workspace's `udp-echo` binary and the
    /// libraries `ldd` lists for it.
    pub fn import_udp_echo_image(&self) {
        let root = self.dir.join("rootfs-udp-echo");
        let binary = crate::process::bin("udp-echo");
        let binary = binary.to_str().expect("utf-8 path");
        add_binary(&root, binary);
        let script = format!(
            "tar -C {root} -c . | /usr/bin/docker -H unix://{sock} import \
             -c 'ENTRYPOINT [\"{binary}\"]' - {UDP_ECHO_IMAGE}",
            root = root.display(),
            sock = self.socket().display(),
        );
        crate::netns::sh(&["bash", "-c", &script]);
    }
}

/// Copies `binary` into `root` at the same path, with every library `ldd` lists for it.
pub fn add_binary(root: &Path, binary: &str) {
    let dst = root.join(binary.trim_start_matches('/'));
    std::fs::create_dir_all(dst.parent().expect("binary dir")).expect("mkdir binary dir");
    std::fs::copy(binary, &dst).unwrap_or_else(|e| panic!("copy {binary}: {e}"));
    let ldd = Command::new("ldd").arg(binary).output().expect("ldd");
    for lib in String::from_utf8_lossy(&ldd.stdout)
        .split_whitespace()
        .filter(|w| w.starts_with('/'))
    {
        let dst = root.join(lib.trim_start_matches('/'));
        std::fs::create_dir_all(dst.parent().expect("lib dir")).expect("mkdir lib");
        std::fs::copy(lib, &dst).unwrap_or_else(|e| panic!("copy {lib}: {e}"));
    }
}

/// Busybox from Debian's busybox-static, memcached, the libraries `ldd` lists for it, and
/// `nobody` in /etc/passwd and /etc/group.
pub fn build_rootfs(root: &Path) {
    for d in ["bin", "usr/bin", "etc", "tmp", "www/cgi-bin"] {
        std::fs::create_dir_all(root.join(d)).expect("mkdir rootfs");
    }
    std::fs::copy("/bin/busybox", root.join("bin/busybox")).expect("busybox-static is installed");
    for applet in [
        "sh", "nc", "httpd", "cat", "echo", "printenv", "sleep", "wget", "env", "ls",
    ] {
        symlink("busybox", root.join("bin").join(applet)).expect("symlink applet");
    }
    std::fs::copy("/usr/bin/memcached", root.join("usr/bin/memcached"))
        .expect("memcached is installed");
    let ldd = Command::new("ldd")
        .arg("/usr/bin/memcached")
        .output()
        .expect("ldd");
    for lib in String::from_utf8_lossy(&ldd.stdout)
        .split_whitespace()
        .filter(|w| w.starts_with('/'))
    {
        let dst = root.join(lib.trim_start_matches('/'));
        std::fs::create_dir_all(dst.parent().expect("lib dir")).expect("mkdir lib");
        std::fs::copy(lib, &dst).unwrap_or_else(|e| panic!("copy {lib}: {e}"));
    }
    std::fs::write(
        root.join("etc/passwd"),
        "root:x:0:0:root:/:/bin/sh\nnobody:x:65534:65534:nobody:/nonexistent:/bin/false\n",
    )
    .expect("passwd");
    std::fs::write(root.join("etc/group"), "root:x:0:\nnogroup:x:65534:\n").expect("group");
    // A CGI script that prints the client address busybox httpd saw.
    let cgi = root.join("www/cgi-bin/ip");
    std::fs::write(
        &cgi,
        "#!/bin/sh\necho 'Content-Type: text/plain'\necho\necho \"$REMOTE_ADDR\"\n",
    )
    .expect("cgi");
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(&cgi, std::fs::Permissions::from_mode(0o755)).expect("chmod cgi");
}

impl Drop for Docker {
    fn drop(&mut self) {
        if self.daemon.is_some() {
            let ids = self.try_cli(&["ps", "-aq"]);
            let ids = String::from_utf8_lossy(&ids.stdout);
            let ids: Vec<&str> = ids.split_whitespace().collect();
            if !ids.is_empty() {
                let mut args = vec!["rm", "-f"];
                args.extend(ids);
                let _ = self.try_cli(&args);
            }
        }
        if let Some(mut d) = self.daemon.take() {
            if std::thread::panicking() {
                eprintln!("dockerd log:\n{}", d.log_text());
            }
            d.stop();
        }
        // Unmount whatever dockerd left mounted below the directory.
        crate::cleanup::unmount_below(&self.dir);
        let _ = std::fs::remove_dir_all(&self.dir);
        crate::cleanup::forget(&crate::cleanup::Item::Dir(self.dir.clone()));
    }
}
