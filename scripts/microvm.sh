#!/usr/bin/env bash
# Builds what the microVM tests (tests/tests/microvm.rs) boot, into .microvm/ (or
# $MICROVM_DIR), as root:
#   - QEMU (Debian's qemu-system-x86), cpio-free initramfs tooling (Python), busybox-static;
#   - Debian's cloud kernel (linux-image-cloud-amd64: virtio-vsock, tun and netfilter as
#     modules), unpacked with dpkg-deb, not installed;
#   - vhost-device-vsock 0.3.0 (crates.io), with `cargo install` into .microvm/tools;
#   - both daemons and the test probe as static-pie binaries;
#   - the initramfs: busybox, the modules the guest loads, those binaries, microvm/init;
#   - a second, larger one for the Docker guest: also Debian's dockerd, containerd, runc and
#     docker CLI with their libraries, iptables-legacy, the bridge and NAT modules (not
#     iptable_raw, nothing of nf_tables: the enclave kernel has neither), and a memcached image.
# Idempotent: each step is skipped when its result is already there and up to date.
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/lib.sh
require_root

DIR=${MICROVM_DIR:-$PWD/.microvm}
mkdir -p "$DIR"
ensure_packages qemu-system-x86 busybox-static python3 docker.io memcached iptables \
    build-essential libc6-dev
ensure_cargo

# Debian's cloud kernel, as a package file unpacked into $DIR/kernel.
if [ ! -f "$DIR/kernel/vmlinuz" ]; then
    stage "microVM kernel (linux-image-cloud-amd64)"
    latest() { apt-cache depends linux-image-cloud-amd64 2>/dev/null | awk '/Depends: linux-image-/ {print $2; exit}' || true; }
    pkg=$(latest)
    [ -n "$pkg" ] || { apt-get update -q && pkg=$(latest); }
    [ -n "$pkg" ] || { echo "no linux-image-cloud-amd64 in the package lists" >&2; exit 1; }
    work=$(mktemp -d)
    trap 'rm -rf "$work"' EXIT
    (cd "$work" && apt-get download -q "$pkg" && dpkg-deb -x ./*.deb root)
    rm -rf "$DIR/kernel.new" && mkdir -p "$DIR/kernel.new/modules"
    cp "$work"/root/boot/vmlinuz-* "$DIR/kernel.new/vmlinuz"
    mv "$work"/root/lib/modules/* "$DIR/kernel.new/modules/"
    rm -rf "$DIR/kernel" && mv "$DIR/kernel.new" "$DIR/kernel"
    rm -rf "$work"
    trap - EXIT
fi
echo "kernel: $(ls "$DIR/kernel/modules")"

# vhost-device-vsock: the host side of the guests' vsock (hybrid vsock on Unix sockets).
if [ ! -x "$DIR/tools/bin/vhost-device-vsock" ]; then
    stage "vhost-device-vsock 0.3.0"
    cargo install --quiet --locked vhost-device-vsock --version 0.3.0 --root "$DIR/tools"
fi

# The daemons and the probe, static: nothing to copy into the image but the binaries.
stage "static binaries"
STATIC_TARGET=x86_64-unknown-linux-gnu
CARGO_PROFILE_RELEASE_DEBUG=0 CARGO_PROFILE_RELEASE_STRIP=debuginfo \
    RUSTFLAGS='-C target-feature=+crt-static' cargo build --release --locked --target $STATIC_TARGET \
    -p enclave-proxy -p host-proxy -p enclave-net-tests --bin enclave-proxy --bin host-proxy \
    --bin enclave-net-probe
BIN=$PWD/target/$STATIC_TARGET/release
for b in enclave-proxy host-proxy enclave-net-probe; do
    ldd "$BIN/$b" 2>&1 | grep -qE 'not a dynamic|statically linked' \
        || { echo "$BIN/$b is not static" >&2; exit 1; }
done

# The initramfs, rebuilt when any input is newer.
IMAGE=$DIR/initramfs.cpio.gz
MODULES=(vmw_vsock_virtio_transport virtio_pci virtio_rng tun)
inputs=(microvm/init scripts/microvm-initramfs.py scripts/microvm.sh "$DIR/kernel/vmlinuz"
        "$BIN/enclave-proxy" "$BIN/host-proxy" "$BIN/enclave-net-probe" /bin/busybox)
stale=0
[ -f "$IMAGE" ] || stale=1
for f in "${inputs[@]}"; do [ "$f" -nt "$IMAGE" ] && stale=1; done
if [ $stale = 1 ]; then
    stage "initramfs"
    python3 scripts/microvm-initramfs.py "$IMAGE" "$(ls -d "$DIR"/kernel/modules/*)" microvm/init \
        /bin/busybox=/bin/busybox "$BIN/enclave-proxy=/usr/bin/enclave-proxy" \
        "$BIN/host-proxy=/usr/bin/host-proxy" "$BIN/enclave-net-probe=/usr/bin/enclave-net-probe" \
        -- "${MODULES[@]}"
fi
# The Docker guest's image: uncompressed, as the guest unpacks it faster than it inflates it.
DOCKER_IMAGE=$DIR/initramfs-docker.cpio
DOCKER_MODULES=(bridge veth br_netfilter iptable_nat iptable_filter xt_conntrack xt_MASQUERADE
                xt_addrtype xt_nat xt_tcpudp overlay)
DOCKER_BINARIES=(/usr/sbin/dockerd /usr/bin/containerd /usr/bin/containerd-shim-runc-v2
                 /usr/sbin/runc /usr/bin/docker /usr/sbin/docker-proxy /usr/sbin/xtables-legacy-multi)
stale=0
[ -f "$DOCKER_IMAGE" ] || stale=1
for f in "${inputs[@]}" "${DOCKER_BINARIES[@]}" /usr/bin/memcached /usr/bin/docker-init; do
    [ "$f" -nt "$DOCKER_IMAGE" ] && stale=1
done
if [ $stale = 1 ]; then
    stage "initramfs with Docker"
    rootfs=$(mktemp -d)
    trap 'rm -rf "$rootfs"' EXIT
    mkdir -p "$rootfs"/{bin,usr/bin,etc,tmp}
    cp /bin/busybox "$rootfs/bin/" && ln -s busybox "$rootfs/bin/sh"
    cp /usr/bin/memcached "$rootfs/usr/bin/"
    for lib in $(ldd /usr/bin/memcached | grep -o '/[^ ]*'); do
        mkdir -p "$rootfs$(dirname "$lib")" && cp "$lib" "$rootfs$lib"
    done
    printf 'root:x:0:0:root:/:/bin/sh\nnobody:x:65534:65534:nobody:/nonexistent:/bin/false\n' >"$rootfs/etc/passwd"
    printf 'root:x:0:\nnogroup:x:65534:\n' >"$rootfs/etc/group"
    tar -C "$rootfs" -cf "$DIR/memcached.tar" .
    rm -rf "$rootfs"
    trap - EXIT
    entries=()
    for b in "${DOCKER_BINARIES[@]}"; do entries+=("+$b"); done
    python3 scripts/microvm-initramfs.py "$DOCKER_IMAGE" "$(ls -d "$DIR"/kernel/modules/*)" microvm/init \
        /bin/busybox=/bin/busybox "$BIN/enclave-proxy=/usr/bin/enclave-proxy" \
        "$BIN/host-proxy=/usr/bin/host-proxy" "$BIN/enclave-net-probe=/usr/bin/enclave-net-probe" \
        "$DIR/memcached.tar=/images/memcached.tar" /usr/bin/docker-init=/usr/bin/docker-init \
        "${entries[@]}" /usr/lib/x86_64-linux-gnu/xtables/ -- "${MODULES[@]}" "${DOCKER_MODULES[@]}"
fi
echo "microVM ready in $DIR"
