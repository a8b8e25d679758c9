#!/usr/bin/env bash
# The main job, on a fresh Debian machine as root:
#   sudo bash scripts/demo.sh
# Installs what is missing, builds in release mode, brings up the emulated enclave (network
# namespaces, enclave-proxy, an unmodified dockerd, memcached behind `docker run -p`), runs the
# pair, prints memcached throughput through the pair next to DIRECT, and tears everything down.
# Extra arguments go to enclave-bench (e.g. --runs 1).
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/lib.sh
require_root
started=$SECONDS

stage "1/3 dependencies"
ensure_packages "${PACKAGES[@]}"
ensure_cargo
ensure_tun

stage "2/3 release build (first build takes a few minutes)"
build_started=$SECONDS
cargo build --release --locked --workspace --bins
echo "built in $((SECONDS - build_started)) s"

stage "3/3 emulated enclave, the pair, dockerd, memcached; memcaslap DIRECT vs ENCLAVE-NET"
./target/release/enclave-bench --demo "$@"
echo "done in $((SECONDS - started)) s; everything the demo made has been removed"
