#!/bin/sh
# The enclave image's entrypoint (nix/flake.nix), run by AWS's enclave init, which sets up no
# networking, not even lo. The start sequence the README recommends ("Starting in the enclave"),
# the same as the microVM test's /init (microvm/init):
#   1. enclave-proxy, and wait until it serves: it says READY=1 into a FIFO, read with a
#      blocking read (no sleeping, no polling of the network);
#   2. dockerd, with its default networking on iptables-legacy (the enclave kernel has no
#      nf_tables and no raw table; Docker 28 and later need DOCKER_INSECURE_NO_IPTABLES_RAW=1
#      to publish ports without the raw table);
#   3. the application: the command given as arguments, if any. As shipped the image passes
#      none, so it runs enclave-proxy and dockerd only: a template to add the application to.
# It exits (and the enclave stops) if enclave-proxy does not become ready, if dockerd does not
# start within 120 s, or when enclave-proxy exits.
set -eu
export PATH=/bin:/sbin:/usr/bin:/usr/sbin

mkdir -p /run /tmp /var/lib/docker /etc
# If enclave-proxy exits before it is ready, its exit status goes into the FIFO instead, so the
# wait ends at once.
mkfifo /run/enclave-proxy.ready
{ enclave-proxy --listen vsock:any:5000 --host vsock:3:5001 \
      --resolv-conf /etc/resolv.conf --ready-file /run/enclave-proxy.ready
  echo "EXITED=$?" > /run/enclave-proxy.ready; } &
proxy=$!
if ! timeout 60 sh -c 'read -r line < /run/enclave-proxy.ready && [ "$line" = READY=1 ]'; then
    echo "enclave-start: enclave-proxy did not become ready" >&2
    exit 1
fi

# cgroups as the init left them (AWS's init mounts v1 controllers), cgroup2 if it mounted none;
# Docker's storage on a tmpfs (overlay2 needs xattrs, which a ramfs root lacks).
mountpoint -q /sys/fs/cgroup || { mkdir -p /sys/fs/cgroup && mount -t cgroup2 cgroup2 /sys/fs/cgroup; }
mountpoint -q /var/lib/docker || mount -t tmpfs tmpfs /var/lib/docker
export DOCKER_INSECURE_NO_IPTABLES_RAW=1 DOCKER_RAMDISK=true
dockerd --host unix:///var/run/docker.sock > /run/dockerd.log 2>&1 &
n=0
until docker version > /dev/null 2>&1; do
    n=$((n + 1))
    if [ $n -gt 600 ]; then
        cat /run/dockerd.log >&2
        echo "enclave-start: dockerd did not start" >&2
        exit 1
    fi
    sleep 0.2
done

if [ $# -gt 0 ]; then
    "$@" &
fi
# enclave-proxy's end is the enclave's.
wait "$proxy"
echo "enclave-start: enclave-proxy exited" >&2
exit 1
