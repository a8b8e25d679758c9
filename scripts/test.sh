#!/usr/bin/env bash
# Runs every check and test of enclave-net on a fresh Debian machine, as root:
#   sudo bash scripts/test.sh
# Installs what is missing first (apt-get update, then only the missing packages).
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/lib.sh
require_root

stage "dependencies"
ensure_packages "${PACKAGES[@]}"
ensure_cargo
ensure_tun

stage "format"
cargo fmt --all --check
stage "clippy"
cargo clippy --workspace --all-targets --locked -- -D warnings
stage "docs"
RUSTDOCFLAGS=-Dwarnings cargo doc --workspace --no-deps --locked
stage "nix flake and start scripts (parse only: nixpkgs cannot be fetched here)"
ensure_packages nix-bin
nix-instantiate --option build-users-group "" --parse nix/flake.nix > /dev/null
busybox sh -n nix/enclave-start.sh
busybox sh -n microvm/init
stage "build (release)"
cargo build --release --workspace --bins --locked
stage "microVM image (QEMU, kernel, vhost-device-vsock, static binaries, initramfs)"
bash scripts/microvm.sh
stage "tests (release, as root)"
cargo test --release --workspace --locked
stage "fuzz (60 s per target)"
bash scripts/fuzz.sh 60
