#!/usr/bin/env bash
# Builds temper-operator and temper-trainer daemonlessly (buildah) from the repo's Dockerfiles
# into the podman storage under ~/.cache/temper/containers. Content-hash cached: an image whose
# Dockerfile, build context and base are unchanged is never rebuilt.
#
# No registry serves base images here, so the base is a Debian 12 + Python 3.11 rootfs from
# mmdebstrap (the OS and Python of python:3.11-slim-bookworm), swapped in by build arg only.
# Usage: hack/build-images.sh [operator|trainer ...]   (default: both)
set -euo pipefail
cd "$(dirname "$0")/.."
bash hack/setup-host.sh >/dev/null
. hack/containers-env.sh
TAG=${TEMPER_IMAGE_TAG:-dev}
BASE=localhost/temper-base:bookworm-py311
BASE_RECIPE="mmdebstrap --variant=minbase --include=python3,python3-venv,python-is-python3,ca-certificates bookworm"
CACHE=${TEMPER_CACHE:-$HOME/.cache/temper}
# Host CA bundle and pip settings reach RUN steps as read-only mounts, never a layer.
CA=${TEMPER_CA_BUNDLE:-/etc/ssl/certs/ca-certificates.crt}
# Bump when a change here changes what goes into the images (the hash covers everything else).
RECIPE=2
STAMPS=$CACHE/containers/built
log() { echo "[build-images] $*" >&2; }

base_image() {
  local key
  key=$(echo "$BASE_RECIPE v1" | sha256sum | cut -c1-16)
  if [ "$(podman image inspect --format '{{index .Labels "temper.dev/recipe"}}' "$BASE" 2>/dev/null)" = "$key" ]; then
    return
  fi
  log "base image $BASE from: $BASE_RECIPE"
  local tmp; tmp=$(mktemp -d "$CACHE/base.XXXX")
  trap 'rm -rf "$tmp"' RETURN
  # Docs, man pages and locales are what python:*-slim leaves out too.
  $BASE_RECIPE --quiet --dpkgopt='path-exclude=/usr/share/doc/*' --dpkgopt='path-exclude=/usr/share/man/*' \
    --dpkgopt='path-exclude=/usr/share/locale/*' --dpkgopt='path-exclude=/usr/share/info/*' \
    --customize-hook='rm -rf "$1"/var/lib/apt/lists/* "$1"/var/cache/apt/*' "$tmp/rootfs.tar"
  local ctr; ctr=$(buildah from scratch)
  buildah add --quiet "$ctr" "$tmp/rootfs.tar" / >/dev/null
  buildah config --env LANG=C.UTF-8 --env PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin \
    --cmd python3 --label "temper.dev/recipe=$key" "$ctr"
  buildah commit --quiet --rm "$ctr" "$BASE" >/dev/null
}

# The hash of everything the build reads: Dockerfile, context files (after .containerignore's
# allowlist), this script and the base image.
context_hash() {
  local dockerfile=$1; shift
  {
    podman image inspect --format '{{.Id}}' "$BASE"
    echo "recipe $RECIPE"
    sha256sum .containerignore "$dockerfile"
    git ls-files -co --exclude-standard -- "$@" | grep -v -e '__pycache__' -e '\.pyc$' | LC_ALL=C sort \
      | while read -r f; do [ -f "$f" ] && sha256sum "$f"; done
  } | sha256sum | cut -c1-16
}

build() {
  local name=$1 dockerfile=$2; shift 2
  local hash; hash=$(context_hash "$dockerfile" "$@")
  local image=localhost/temper-$name stamp=$STAMPS/temper-$name-$TAG
  # Current when the stamp names this hash and the image it recorded is still the tag's.
  if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$hash $(podman image inspect --format '{{.Id}}' "$image:$TAG" 2>/dev/null)" ]; then
    log "temper-$name:$TAG is current ($hash)"
    return
  fi
  log "building temper-$name:$TAG ($hash) from $dockerfile"
  local started=$SECONDS pipconf=$CACHE/containers/pip.conf
  # Fixed paths and no --label: anything that varies between builds would bust the layer cache.
  printf '[global]\ncert = /etc/ssl/certs/ca-certificates.crt\ndisable-pip-version-check = true\n' > "$pipconf"
  mkdir -p "$CACHE/buildah-tmp"
  # The `deps` stage is tagged by pyproject's hash, so pruning keeps it: it is the layer cache
  # that spares a code change the ~3 GB of wheels. TMPDIR holds buildah's RUN cache mounts.
  local deps; deps=$(sha256sum pyproject.toml "$dockerfile" | sha256sum | cut -c1-16)
  local args=(--quiet --layers --network host --build-arg "PYTHON_IMAGE=$BASE"
    -v "$CA:/etc/ssl/certs/ca-certificates.crt:ro" -v "$pipconf:/etc/pip.conf:ro" -f "$dockerfile")
  if ! { TMPDIR="$CACHE/buildah-tmp" nice -n 10 buildah bud "${args[@]}" --target deps \
        -t "$image-deps:$deps" . >/dev/null \
      && TMPDIR="$CACHE/buildah-tmp" nice -n 10 buildah bud "${args[@]}" -t "$image:$TAG" . >/dev/null; }; then
    log "building temper-$name failed"; return 1
  fi
  mkdir -p "$STAMPS"
  echo "$hash $(podman image inspect --format '{{.Id}}' "$image:$TAG")" > "$stamp"
  podman images --format '{{.Repository}}:{{.Tag}}' "$image-deps" | grep -v ":$deps$" \
    | xargs -r podman rmi --force >/dev/null 2>&1 || true
  local size; size=$(podman image inspect --format '{{.Size}}' "$image:$TAG")
  log "built temper-$name:$TAG in $((SECONDS - started))s, $((size / 1000000)) MB"
}

base_image
targets=("${@:-operator trainer}")
for target in ${targets[*]}; do
  case $target in
    operator) build operator operator/Dockerfile pyproject.toml operator/temper ;;
    trainer) build trainer trainer_image/Dockerfile pyproject.toml operator/temper trainer_image/temper_trainer ;;
    *) log "unknown image $target (operator, trainer)"; exit 2 ;;
  esac
done
# Superseded images and stage layers would otherwise fill the cache across CI runs.
podman image prune --force >/dev/null 2>&1 || true
