# Shared helpers for the project's scripts. Source it; do not run it.

stage() { printf '\n==> %s\n' "$*"; }

# Installs the Debian packages that are missing (apt-get update first, once).
ensure_packages() {
    local missing=()
    for p in "$@"; do
        dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
    done
    if [ ${#missing[@]} -eq 0 ]; then
        echo "all packages present: $*"
        return
    fi
    stage "installing ${missing[*]}"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -q
    # Packages such as docker-registry and docker.io start their services on install; the tests
    # start their own instances in namespaces, so none is started here (policy-rc.d, exit 101).
    local policy=/usr/sbin/policy-rc.d made_policy=0
    if [ ! -e "$policy" ]; then
        printf '#!/bin/sh\nexit 101\n' >"$policy" && chmod +x "$policy" && made_policy=1
    fi
    apt-get install -y -q --no-install-recommends "${missing[@]}" || { [ $made_policy = 1 ] && rm -f "$policy"; return 1; }
    if [ $made_policy = 1 ]; then rm -f "$policy"; fi
}

# Makes cargo available: the machine's rustup toolchain, or Debian's if that is new enough.
ensure_cargo() {
    if ! command -v cargo >/dev/null 2>&1; then
        for dir in "${HOME:-/root}/.cargo/bin" /root/.cargo/bin /usr/local/cargo/bin; do
            if [ -x "$dir/cargo" ]; then
                export PATH="$dir:$PATH"
                break
            fi
        done
    fi
    if ! command -v cargo >/dev/null 2>&1; then
        ensure_packages cargo rustc
    fi
    cargo --version
}

# TAP devices need /dev/net/tun.
ensure_tun() {
    if [ ! -c /dev/net/tun ]; then
        modprobe tun 2>/dev/null || true
        mkdir -p /dev/net
        [ -c /dev/net/tun ] || mknod /dev/net/tun c 10 200
    fi
}

require_root() {
    if [ "$(id -u)" -ne 0 ]; then
        echo "run as root: the tests and the demo create network namespaces and TAP devices" >&2
        exit 1
    fi
}

PACKAGES=(ca-certificates build-essential pkg-config iproute2 iptables nftables docker.io
          memcached libmemcached-tools iperf3 socat busybox-static slirp4netns passt procps
          dnsmasq-base docker-registry systemd prometheus qemu-system-x86 python3 nix-bin)
