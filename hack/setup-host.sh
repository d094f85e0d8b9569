#!/usr/bin/env bash
# Host packages for daemonless image builds and the exec node's container runtime.
# Idempotent and quick once installed: apt runs only when a binary is missing.
set -euo pipefail
need=()
for pair in buildah:buildah podman:podman runc:runc mmdebstrap:mmdebstrap newuidmap:uidmap \
    fuse-overlayfs:fuse-overlayfs; do
  command -v "${pair%%:*}" >/dev/null 2>&1 || need+=("${pair#*:}")
done
if [ ${#need[@]} -gt 0 ]; then
  echo "[setup-host] installing ${need[*]}" >&2
  if [ "$(id -u)" -ne 0 ]; then
    echo "[setup-host] need root (or sudo apt-get install ${need[*]})" >&2
    exit 1
  fi
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq --no-install-recommends "${need[@]}" >/dev/null
fi
# One storage and one config for builds, the exec node and tests, under ~/.cache so warm CI
# runs keep their images. CONTAINERS_* env vars point podman/buildah here (hack/containers.env).
root=${TEMPER_CACHE:-$HOME/.cache/temper}/containers
mkdir -p "$root/storage" "$root/runroot"
cat > "$root/storage.conf.new" <<CONF
[storage]
driver = "overlay"
graphroot = "$root/storage"
runroot = "$root/runroot"
CONF
# runc, not crun: crun fails on hybrid cgroup hosts; cgroupfs: no systemd in CI; no default
# ulimits: raising nofile is refused inside this sandbox.
cat > "$root/containers.conf.new" <<CONF
[containers]
default_ulimits = []
[engine]
runtime = "runc"
cgroup_manager = "cgroupfs"
events_logger = "file"
CONF
for f in storage.conf containers.conf; do
  cmp -s "$root/$f.new" "$root/$f" 2>/dev/null && rm "$root/$f.new" || mv "$root/$f.new" "$root/$f"
done
echo "$root"
