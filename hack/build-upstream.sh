#!/usr/bin/env bash
# Builds the pinned upstream binaries (Kubernetes, etcd, kwok, helm) from their Go modules into
# a cache outside the clone, keyed by version. Idempotent: a component whose binaries are already
# in the cache is skipped, so a second run takes well under a second.
#
#   VKUBE_CACHE   cache root (default ~/.cache/vkube)
#
# Layout: $VKUBE_CACHE/upstream/<component>-<version>/<binary>; the Go module and build caches
# live under $VKUBE_CACHE/go so a fresh clone reuses them.
set -euo pipefail

here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
# shellcheck source=versions.env
source "$here/versions.env"

cache=${VKUBE_CACHE:-$HOME/.cache/vkube}
upstream=$cache/upstream
export GOMODCACHE=$cache/go/mod
export GOCACHE=$cache/go/build
export GOFLAGS=-buildvcs=false
export CGO_ENABLED=0
export GOTOOLCHAIN=local
mkdir -p "$upstream" "$GOMODCACHE" "$GOCACHE"

log() { printf '[build-upstream %s] %s\n' "$(date +%H:%M:%S)" "$*" >&2; }

command -v go >/dev/null || { echo "go is required (Go 1.26): install it and run again" >&2; exit 1; }

# have DIR BIN... : true when every binary is present and executable.
have() {
  local dir=$1; shift
  for b in "$@"; do [ -x "$dir/$b" ] || return 1; done
}

# A wrapper module whose only job is to pin the requirements of the tools it builds.
# new_module DIR NAME
new_module() {
  rm -rf "$1"; mkdir -p "$1"
  (cd "$1" && go mod init "$2" >/dev/null 2>&1)
}

build_kubernetes() {
  local v=$KUBERNETES_VERSION out=$upstream/kubernetes-$KUBERNETES_VERSION
  local bins=(kube-apiserver kube-controller-manager kube-scheduler kubectl)
  if have "$out" "${bins[@]}"; then log "kubernetes $v: cached"; return; fi
  log "kubernetes $v: building ${bins[*]} (cold: tens of minutes on 2 cores)"
  local mod=$cache/work/kubernetes-$v
  new_module "$mod" vkube.local/upstream-kubernetes
  cd "$mod"
  go mod download -json "k8s.io/kubernetes@$v" >/dev/null
  # k8s.io/kubernetes requires its staging modules at v0.0.0 and replaces them with local paths,
  # which a dependent module ignores: replace each with its tagged release (v1.X.Y -> v0.X.Y).
  local staging_v=v0.${v#v1.}
  local gomod
  gomod=$(go mod download -json "k8s.io/kubernetes@$v" | sed -n 's/.*"GoMod": "\(.*\)".*/\1/p')
  local args=()
  while read -r m; do args+=("-replace=$m=$m@$staging_v"); done \
    < <(grep -E '=> \./staging/src/' "$gomod" | awk '{print $1}')
  [ ${#args[@]} -gt 20 ] || { echo "could not read the staging modules from $gomod" >&2; exit 1; }
  go mod edit "${args[@]}"
  for b in "${bins[@]}"; do go get -tool "k8s.io/kubernetes/cmd/$b@$v" >/dev/null 2>&1 || go get -tool "k8s.io/kubernetes/cmd/$b@$v"; done
  local major=1 minor date
  minor=$(echo "$v" | cut -d. -f2)
  date=$(date -u +%Y-%m-%dT%H:%M:%SZ)
  local ld="-s -w"
  for p in k8s.io/component-base/version k8s.io/client-go/pkg/version; do
    ld+=" -X $p.gitVersion=$v -X $p.gitMajor=$major -X $p.gitMinor=$minor"
    ld+=" -X $p.gitTreeState=clean -X $p.buildDate=$date"
  done
  mkdir -p "$out.tmp"
  local pkgs=()
  for b in "${bins[@]}"; do pkgs+=("k8s.io/kubernetes/cmd/$b"); done
  go build -trimpath -ldflags "$ld" -o "$out.tmp/" "${pkgs[@]}"
  rm -rf "$out"; mv "$out.tmp" "$out"
  log "kubernetes $v: done"
}

build_etcd() {
  local v=$ETCD_VERSION out=$upstream/etcd-$ETCD_VERSION
  if have "$out" etcd; then log "etcd $v: cached"; return; fi
  log "etcd $v: building"
  local mod=$cache/work/etcd-$v
  new_module "$mod" vkube.local/upstream-etcd
  cd "$mod"
  go get -tool "go.etcd.io/etcd/server/v3@$v" >/dev/null 2>&1 || go get -tool "go.etcd.io/etcd/server/v3@$v"
  mkdir -p "$out.tmp"
  go build -trimpath -ldflags "-s -w" -o "$out.tmp/etcd" go.etcd.io/etcd/server/v3
  rm -rf "$out"; mv "$out.tmp" "$out"
  log "etcd $v: done"
}

build_kwok() {
  local v=$KWOK_VERSION out=$upstream/kwok-$KWOK_VERSION
  # Bump the layout when the files picked from the module change, so caches get rebuilt.
  local layout=3
  if have "$out" kwok && [ "$(cat "$out/.layout" 2>/dev/null)" = "$layout" ]; then log "kwok $v: cached"; return; fi
  log "kwok $v: building"
  local mod=$cache/work/kwok-$v
  new_module "$mod" vkube.local/upstream-kwok
  cd "$mod"
  go get -tool "sigs.k8s.io/kwok/cmd/kwok@$v" >/dev/null 2>&1 || go get -tool "sigs.k8s.io/kwok/cmd/kwok@$v"
  rm -rf "$out.tmp"; mkdir -p "$out.tmp/stages"
  go build -trimpath -ldflags "-s -w -X sigs.k8s.io/kwok/pkg/consts.Version=${v#v}" -o "$out.tmp/kwok" sigs.k8s.io/kwok/cmd/kwok
  # kwok exits with "no stages found" without stage configs: keep the module's own stages,
  # the "fast" pod lifecycle (Running at once, deleted at once) for quick tests and benchmarks.
  local dir
  dir=$(go mod download -json "sigs.k8s.io/kwok@$v" | sed -n 's/.*"Dir": "\(.*\)".*/\1/p')
  cp "$dir"/kustomize/stage/node/fast/node-initialize.yaml \
     "$dir"/kustomize/stage/node/heartbeat-with-lease/node-heartbeat-with-lease.yaml \
     "$dir"/kustomize/stage/pod/fast/pod-*.yaml "$out.tmp/stages/"
  # Report each running container's resources as a kubelet does since in-place resize: the API
  # server refuses to resize a pod whose running containers report none.
  awk '!done && /startedAt: \{\{ \$now \| Quote \}\}/ {
         print; print "        {{ with .resources }}"; print "        resources: {{ toJson . }}"; print "        {{ end }}"
         done = 1; next } { print }' "$out.tmp/stages/pod-ready.yaml" > "$out.tmp/pod-ready.yaml"
  grep -q 'resources: {{ toJson . }}' "$out.tmp/pod-ready.yaml" || { echo "kwok $v: pod-ready stage not patched" >&2; exit 1; }
  mv "$out.tmp/pod-ready.yaml" "$out.tmp/stages/pod-ready.yaml"
  # The debugging CRDs let tests give one pod its own logs, exec or port-forward target.
  mkdir -p "$out.tmp/crds"
  for crd in logs clusterlogs execs clusterexecs portforwards clusterportforwards attaches clusterattaches; do
    cp "$dir/kustomize/crd/bases/kwok.x-k8s.io_$crd.yaml" "$out.tmp/crds/"
  done
  chmod -R u+w "$out.tmp"
  echo "$layout" > "$out.tmp/.layout"
  rm -rf "$out"; mv "$out.tmp" "$out"
  log "kwok $v: done"
}

build_helm() {
  local v=$HELM_VERSION out=$upstream/helm-$HELM_VERSION
  # Bump the layout when the build changes, so caches get rebuilt.
  local layout=2
  if have "$out" helm && [ "$(cat "$out/.layout" 2>/dev/null)" = "$layout" ]; then log "helm $v: cached"; return; fi
  log "helm $v: building"
  local mod=$cache/work/helm-$v
  new_module "$mod" vkube.local/upstream-helm
  cd "$mod"
  go get -tool "helm.sh/helm/v3/cmd/helm@$v" >/dev/null 2>&1 || go get -tool "helm.sh/helm/v3/cmd/helm@$v"
  rm -rf "$out.tmp"; mkdir -p "$out.tmp"
  # Without these, `helm template` and `helm lint` assume Kubernetes v1.20.
  local minor
  minor=$(echo "$KUBERNETES_VERSION" | cut -d. -f2)
  local ld="-s -w -X helm.sh/helm/v3/internal/version.version=$v"
  for p in helm.sh/helm/v3/pkg/chartutil helm.sh/helm/v3/pkg/lint/rules; do
    ld+=" -X $p.k8sVersionMajor=1 -X $p.k8sVersionMinor=$minor"
  done
  go build -trimpath -ldflags "$ld" -o "$out.tmp/helm" helm.sh/helm/v3/cmd/helm
  echo "$layout" > "$out.tmp/.layout"
  rm -rf "$out"; mv "$out.tmp" "$out"
  log "helm $v: done"
}

only=${1:-all}
start=$SECONDS
case $only in
  all) build_etcd; build_kwok; build_helm; build_kubernetes ;;
  kubernetes|etcd|kwok|helm) "build_$only" ;;
  *) echo "usage: $0 [all|kubernetes|etcd|kwok|helm]" >&2; exit 2 ;;
esac
log "all upstream binaries ready under $upstream ($((SECONDS - start)) s)"
