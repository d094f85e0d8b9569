#!/usr/bin/env bash
# Builds the hermetic control plane (etcd, kube-apiserver, kube-controller-manager,
# kube-scheduler, kubectl), kwok and helm, plus the Kueue manager (with its config/ manifests),
# Prometheus and promtool, from the Go module proxy into versioned caches. Idempotent: a
# binary already in the cache is never rebuilt.
set -euo pipefail

K8S_VERSION=${K8S_VERSION:-v1.36.3}
ETCD_VERSION=${ETCD_VERSION:-v3.6.16}
KWOK_VERSION=${KWOK_VERSION:-v0.8.0}
HELM_VERSION=${HELM_VERSION:-v3.19.0}
KUBE_SCORE_VERSION=${KUBE_SCORE_VERSION:-v1.20.0}
KUEUE_VERSION=${KUEUE_VERSION:-v0.17.0}
PROMETHEUS_VERSION=${PROMETHEUS_VERSION:-v0.316.0}
CACHE_ROOT=${TEMPER_CACHE:-$HOME/.cache/temper}
BIN=${TEMPER_BIN:-$CACHE_ROOT/k8s-$K8S_VERSION/bin}
SRC=$CACHE_ROOT/src
KUEUE_DIR=${TEMPER_KUEUE_DIR:-$CACHE_ROOT/kueue-$KUEUE_VERSION}
PROMETHEUS_BIN=${TEMPER_PROMETHEUS_BIN:-$CACHE_ROOT/prometheus-$PROMETHEUS_VERSION/bin}
export GOFLAGS=${GOFLAGS:--mod=mod}
export GOTOOLCHAIN=${GOTOOLCHAIN:-auto}
# Staging modules are published as v0.N.P for kubernetes v1.N.P.
STAGING_VERSION=v0.${K8S_VERSION#v1.}

mkdir -p "$BIN" "$SRC"
log() { printf '[build-tools %(%H:%M:%S)T] %s\n' -1 "$*" >&2; }
have() { [ -x "$BIN/$1" ]; }

build_etcd() {
  have etcd && return 0
  log "building etcd $ETCD_VERSION"
  local dir=$SRC/etcd-$ETCD_VERSION
  mkdir -p "$dir"
  cat >"$dir/main.go" <<'GO'
// Wrapper so etcd's server module, which carries replace directives, can be built
// from the module proxy.
package main

import (
	"os"

	"go.etcd.io/etcd/server/v3/etcdmain"
)

func main() { etcdmain.Main(os.Args) }
GO
  (cd "$dir" && rm -f go.mod go.sum && go mod init temper.local/etcd >/dev/null 2>&1 &&
    go get "go.etcd.io/etcd/server/v3@$ETCD_VERSION" >/dev/null 2>&1 &&
    for m in api/v3 client/pkg/v3 client/v3 pkg/v3; do go mod edit -require="go.etcd.io/etcd/$m@$ETCD_VERSION"; done &&
    go mod tidy >/dev/null &&
    go build -trimpath -o "$BIN/etcd.tmp" . && mv "$BIN/etcd.tmp" "$BIN/etcd")
}

build_kubernetes() {
  local missing=0
  for c in kube-apiserver kube-controller-manager kube-scheduler kubectl; do have $c || missing=1; done
  [ $missing = 0 ] && return 0
  log "building kubernetes $K8S_VERSION (staging $STAGING_VERSION)"
  local dir=$SRC/kubernetes-$K8S_VERSION
  mkdir -p "$dir"
  cd "$dir"
  rm -f go.mod go.sum
  go mod init temper.local/kubernetes >/dev/null 2>&1
  # The staging list comes from kubernetes' own go.mod, so it cannot drift from the release.
  local gomod
  gomod=$(go mod download -json "k8s.io/kubernetes@$K8S_VERSION" | python3 -c 'import json,sys; print(json.load(sys.stdin)["GoMod"])')
  local staging
  staging=$(awk '$2=="=>" && $3 ~ /^\.\/staging\// {print $1}' "$gomod")
  [ -n "$staging" ] || { log "no staging replaces found in $gomod"; exit 1; }
  log "$(echo "$staging" | wc -l) staging modules"
  local args=()
  for m in $staging; do args+=("-replace=$m=$m@$STAGING_VERSION"); done
  go mod edit -require="k8s.io/kubernetes@$K8S_VERSION" "${args[@]}"
  # Carry over kubernetes' other (non-staging) replaces as well, if it has any.
  awk '$2=="=>" && $3 !~ /^\.\// && NF==4 {print $1"="$3"@"$4}' "$gomod" | while read -r r; do go mod edit -replace="$r"; done
  cat > tools.go <<'GO'
//go:build tools

package tools
GO
  local ver=${K8S_VERSION#v}
  local ldflags="-s -w -X k8s.io/component-base/version.gitVersion=$K8S_VERSION \
    -X k8s.io/component-base/version.gitMajor=${ver%%.*} \
    -X k8s.io/component-base/version.gitMinor=$(echo "$ver" | cut -d. -f2) \
    -X k8s.io/component-base/version.gitTreeState=clean \
    -X k8s.io/component-base/version.buildDate=1970-01-01T00:00:00Z \
    -X k8s.io/client-go/pkg/version.gitVersion=$K8S_VERSION"
  for c in kube-apiserver kube-controller-manager kube-scheduler kubectl; do
    have $c && continue
    log "  go build $c"
    go get "k8s.io/kubernetes/cmd/$c@$K8S_VERSION" >/dev/null 2>&1 || true
    go build -trimpath -tags selinux,notest -ldflags "$ldflags" -o "$BIN/$c.tmp" "k8s.io/kubernetes/cmd/$c"
    mv "$BIN/$c.tmp" "$BIN/$c"
  done
  cd - >/dev/null
}

build_go_install() { # name module version
  have "$1" && return 0
  log "go install $2@$3"
  GOBIN=$BIN go install -trimpath "$2@$3"
}

# nss_wrapper (Debian's libnss-wrapper) lets the exec node give its pods cluster DNS names
# without root: extracted into the cache from the .deb, so nothing system-wide changes.
install_nss_wrapper() {
  local dest=$CACHE_ROOT/nss-wrapper
  compgen -G "/usr/lib/*/libnss_wrapper.so" >/dev/null && return 0
  compgen -G "$dest/usr/lib/*/libnss_wrapper.so" >/dev/null && return 0
  log "fetching libnss-wrapper"
  mkdir -p "$dest/deb" && cd "$dest/deb"
  apt-get download libnss-wrapper >/dev/null 2>&1 || { apt-get update -qq >/dev/null && apt-get download libnss-wrapper >/dev/null; }
  dpkg-deb -x libnss-wrapper_*.deb "$dest"
  cd - >/dev/null
}

install_nss_wrapper
build_etcd
build_kubernetes
build_go_install kwok sigs.k8s.io/kwok/cmd/kwok "$KWOK_VERSION"
# Stamp helm's default .Capabilities.KubeVersion (else v1.20, below the chart's kubeVersion).
HELM_K8S_MINOR=${K8S_VERSION#v1.} && HELM_K8S_MINOR=${HELM_K8S_MINOR%%.*}
have helm || { log "go install helm $HELM_VERSION (KubeVersion v1.$HELM_K8S_MINOR)"; GOBIN=$BIN go install -trimpath -ldflags "-X helm.sh/helm/v3/pkg/chartutil.k8sVersionMajor=1 -X helm.sh/helm/v3/pkg/chartutil.k8sVersionMinor=$HELM_K8S_MINOR" "helm.sh/helm/v3/cmd/helm@$HELM_VERSION"; }

# The outside linter for the chart and the Jobs temper builds (tests/unit/test_kube_score.py).
build_go_install kube-score github.com/zegl/kube-score/cmd/kube-score "$KUBE_SCORE_VERSION"

build_kueue() {
  # The manager binary plus the CRDs and webhook manifests of the same release, so the
  # harness never needs the Go module cache.
  [ -x "$KUEUE_DIR/bin/kueue" ] && [ -f "$KUEUE_DIR/config/done" ] && return 0
  log "go install sigs.k8s.io/kueue/cmd/kueue@$KUEUE_VERSION"
  mkdir -p "$KUEUE_DIR/bin"
  GOBIN=$KUEUE_DIR/bin go install -trimpath \
    -ldflags "-s -w -X sigs.k8s.io/kueue/pkg/version.GitVersion=$KUEUE_VERSION" \
    "sigs.k8s.io/kueue/cmd/kueue@$KUEUE_VERSION"
  local mod
  mod=$(go mod download -json "sigs.k8s.io/kueue@$KUEUE_VERSION" | python3 -c 'import json,sys; print(json.load(sys.stdin)["Dir"])')
  rm -rf "$KUEUE_DIR/config" && mkdir -p "$KUEUE_DIR/config"
  cp -r "$mod/config/components/crd/bases" "$KUEUE_DIR/config/crd"
  cp -r "$mod/config/components/webhook" "$KUEUE_DIR/config/webhook"
  cp -r "$mod/config/components/rbac" "$KUEUE_DIR/config/rbac"
  chmod -R u+w "$KUEUE_DIR/config"
  echo "$KUEUE_VERSION" >"$KUEUE_DIR/config/done"
}

build_prometheus() {
  # Only the kubernetes service discovery is compiled in: the other SD plugins (cloud SDKs)
  # would triple the build time and the hermetic cluster has no use for them.
  local c
  for c in prometheus promtool; do
    [ -x "$PROMETHEUS_BIN/$c" ] && continue
    log "go install github.com/prometheus/prometheus/cmd/$c@$PROMETHEUS_VERSION"
    mkdir -p "$PROMETHEUS_BIN"
    GOBIN=$PROMETHEUS_BIN go install -trimpath -tags remove_all_sd,enable_kubernetes_sd \
      -ldflags "-s -w -X github.com/prometheus/common/version.Version=${PROMETHEUS_VERSION#v}" \
      "github.com/prometheus/prometheus/cmd/$c@$PROMETHEUS_VERSION"
  done
}

build_kueue
build_prometheus
log "tools ready in $BIN, $KUEUE_DIR, $PROMETHEUS_BIN"
echo "$BIN"
