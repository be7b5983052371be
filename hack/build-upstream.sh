#!/usr/bin/env bash
# Builds the pinned upstream binaries (Kubernetes, etcd, kwok, helm, and for a real node kubelet,
# kube-proxy, pause, containerd, CoreDNS, the ingress controller traefik and metrics-server) from
# their Go modules into a cache outside the clone, keyed by version. Idempotent: a component whose
# binaries are already in the cache is skipped, so a second run takes well under a second.
#
#   hack/build-upstream.sh [all|host|COMPONENT...]   (host: what a kwok-only dev host needs)
#   components: kubernetes etcd kwok helm node containerd coredns traefik metrics-server, and
#   conformance (not in all: e2e.test, ginkgo and agnhost for hack/conformance)
#   VKUBE_CACHE   cache root (default ~/.cache/vkube)
#
# Layout: $VKUBE_CACHE/upstream/<component>-<version>/<binary>; the Go module and build caches
# live under $VKUBE_CACHE/go so a fresh clone reuses them. Missing components build at the same
# time, each logging to $VKUBE_CACHE/work/logs/<component>.log; this prints one line per component
# when it starts and ends, and every minute which ones are still building.
set -euo pipefail

here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
# shellcheck source=hack/versions.env
source "$here/versions.env"

cache=${VKUBE_CACHE:-$HOME/.cache/vkube}
upstream=$cache/upstream
export GOMODCACHE=$cache/go/mod
export GOCACHE=$cache/go/build
export GOFLAGS=-buildvcs=false
export CGO_ENABLED=0
export GOTOOLCHAIN=local
logs=$cache/work/logs
mkdir -p "$upstream" "$GOMODCACHE" "$GOCACHE" "$logs"

log() { printf '[build-upstream %s] %s\n' "$(date +%H:%M:%S)" "$*" >&2; }
# dur SECONDS: 1m42s
dur() { if [ "$1" -ge 60 ]; then printf '%dm%02ds' $(($1 / 60)) $(($1 % 60)); else printf '%ds' "$1"; fi; }

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

# Per component: its version, whether the cache already has it (the fast path: file tests only),
# and how to build it. The build functions run in a background subshell with output to a log.
kubernetes_bins=(kube-apiserver kube-controller-manager kube-scheduler kubectl kube-control-plane)
# A virtual cluster's kube-apiserver and kube-controller-manager in one process: our own small
# main (hack/kube-control-plane/main.go) built in the same module; its hash is the layout, so
# a change to it rebuilds the component (the Go build cache makes that a relink).
kubernetes_layout=$(sha256sum "$here/kube-control-plane/main.go" | cut -c1-16)
# The real node's Kubernetes side; pause is compiled from the module's C source (gcc).
node_bins=(kubelet kube-proxy pause)
containerd_bins=(containerd containerd-shim-runc-v2 ctr)
# hack/conformance: the suite, its runner and agnhost (the test image most specs run), with the
# certificate pair agnhost's image carries (specs fetch /localhost.crt from its web server).
conformance_bins=(e2e.test ginkgo agnhost localhost.crt localhost.key)
# Bump a layout when the files picked from the module or the build change, so caches get rebuilt.
kwok_layout=3
helm_layout=2
version_of() {
  case $1 in
    kubernetes) echo "$KUBERNETES_VERSION" ;; etcd) echo "$ETCD_VERSION" ;;
    kwok) echo "$KWOK_VERSION" ;; helm) echo "$HELM_VERSION" ;;
    node) echo "$KUBERNETES_VERSION" ;; containerd) echo "$CONTAINERD_VERSION" ;;
    coredns) echo "$COREDNS_VERSION" ;; conformance) echo "$KUBERNETES_VERSION" ;;
    traefik) echo "$TRAEFIK_VERSION" ;; metrics-server) echo "$METRICS_SERVER_VERSION" ;;
  esac
}
cached() {
  local out
  out=$upstream/$1-$(version_of "$1")
  case $1 in
    kubernetes) have "$out" "${kubernetes_bins[@]}" && [ "$(cat "$out/.layout" 2>/dev/null)" = "$kubernetes_layout" ] ;;
    etcd) have "$out" etcd etcdutl ;;
    kwok) have "$out" kwok && [ "$(cat "$out/.layout" 2>/dev/null)" = "$kwok_layout" ] ;;
    helm) have "$out" helm && [ "$(cat "$out/.layout" 2>/dev/null)" = "$helm_layout" ] ;;
    node) have "$out" "${node_bins[@]}" ;;
    containerd) have "$out" "${containerd_bins[@]}" ;;
    coredns) have "$out" coredns ;;
    traefik) have "$out" traefik ;;
    metrics-server) have "$out" metrics-server ;;
    conformance) have "$out" "${conformance_bins[@]}" ;;
  esac
}

# kubernetes_module DIR: a wrapper module requiring k8s.io/kubernetes at the pinned version.
kubernetes_module() {
  local v=$KUBERNETES_VERSION
  new_module "$1" vkube.local/upstream-kubernetes
  cd "$1"
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
}

# kubernetes_build OUT BIN...: builds k8s.io/kubernetes/cmd/BIN into OUT with version stamps;
# kube-control-plane is the wrapper module's own ./cmd/kube-control-plane.
kubernetes_build() {
  local v=$KUBERNETES_VERSION out=$1; shift
  # One go get for all commands: each call loads the whole module graph again.
  local pkgs=() tools=()
  for b in "$@"; do
    if [ "$b" = kube-control-plane ]; then
      mkdir -p cmd/kube-control-plane
      cp "$here/kube-control-plane/main.go" cmd/kube-control-plane/
      pkgs+=(./cmd/kube-control-plane)
    else
      pkgs+=("k8s.io/kubernetes/cmd/$b"); tools+=("k8s.io/kubernetes/cmd/$b@$v")
    fi
  done
  go get -tool "${tools[@]}"
  local major=1 minor date
  minor=$(echo "$v" | cut -d. -f2)
  date=$(date -u +%Y-%m-%dT%H:%M:%SZ)
  local ld="-s -w"
  for p in k8s.io/component-base/version k8s.io/client-go/pkg/version; do
    ld+=" -X $p.gitVersion=$v -X $p.gitMajor=$major -X $p.gitMinor=$minor"
    ld+=" -X $p.gitTreeState=clean -X $p.buildDate=$date"
  done
  go build -trimpath -ldflags "$ld" -o "$out/" "${pkgs[@]}"
}

build_kubernetes() {
  local out=$upstream/kubernetes-$KUBERNETES_VERSION
  kubernetes_module "$cache/work/kubernetes-$KUBERNETES_VERSION"
  rm -rf "$out.tmp"; mkdir -p "$out.tmp"
  kubernetes_build "$out.tmp" "${kubernetes_bins[@]}"
  echo "$kubernetes_layout" > "$out.tmp/.layout"
  rm -rf "$out"; mv "$out.tmp" "$out"
}

build_node() {
  local out=$upstream/node-$KUBERNETES_VERSION
  kubernetes_module "$cache/work/node-$KUBERNETES_VERSION"
  rm -rf "$out.tmp"; mkdir -p "$out.tmp"
  kubernetes_build "$out.tmp" kubelet kube-proxy
  # The sandbox image's process: upstream's pause, a static C program that reaps children.
  local dir
  dir=$(go mod download -json "k8s.io/kubernetes@$KUBERNETES_VERSION" | sed -n 's/.*"Dir": "\(.*\)".*/\1/p')
  command -v gcc >/dev/null || { echo "gcc is required to build pause" >&2; exit 1; }
  gcc -Os -static -Wall -DVERSION="$KUBERNETES_VERSION" -o "$out.tmp/pause" "$dir/build/pause/linux/pause.c"
  rm -rf "$out"; mv "$out.tmp" "$out"
}

build_conformance() {
  local v=$KUBERNETES_VERSION out=$upstream/conformance-$KUBERNETES_VERSION
  kubernetes_module "$cache/work/conformance-$v"
  # -t: the suite is a test package, its test-only requirements must be in the build list too.
  go get -t "k8s.io/kubernetes/test/e2e@$v" "k8s.io/kubernetes/test/images/agnhost@$v"
  local ginkgo
  ginkgo=$(go list -m -f '{{.Version}}' github.com/onsi/ginkgo/v2)
  go get -tool "github.com/onsi/ginkgo/v2/ginkgo@$ginkgo"
  rm -rf "$out.tmp"; mkdir -p "$out.tmp"
  local p ld="-s -w"
  for p in k8s.io/component-base/version k8s.io/client-go/pkg/version; do
    ld+=" -X $p.gitVersion=$v -X $p.gitMajor=1 -X $p.gitMinor=$(echo "$v" | cut -d. -f2) -X $p.gitTreeState=clean"
  done
  go test -c -trimpath -ldflags "$ld" -o "$out.tmp/e2e.test" k8s.io/kubernetes/test/e2e
  go build -trimpath -ldflags "-s -w" -o "$out.tmp/ginkgo" github.com/onsi/ginkgo/v2/ginkgo
  go build -trimpath -ldflags "-s -w" -o "$out.tmp/agnhost" k8s.io/kubernetes/test/images/agnhost
  local dir
  dir=$(go mod download -json "k8s.io/kubernetes@$v" | sed -n 's/.*"Dir": "\(.*\)".*/\1/p')
  install -m 0755 "$dir"/test/images/agnhost/porter/localhost.{crt,key} "$out.tmp/"
  rm -rf "$out"; mv "$out.tmp" "$out"
}

build_containerd() {
  local v=$CONTAINERD_VERSION out=$upstream/containerd-$CONTAINERD_VERSION
  new_module "$cache/work/containerd-$v" vkube.local/upstream-containerd
  cd "$cache/work/containerd-$v"
  local m=github.com/containerd/containerd/v2
  go get -tool "$m/cmd/containerd@$v" "$m/cmd/containerd-shim-runc-v2@$v" "$m/cmd/ctr@$v"
  rm -rf "$out.tmp"; mkdir -p "$out.tmp"
  go build -trimpath -tags "no_btrfs no_devmapper no_zfs no_aufs urfave_cli_no_docs" \
    -ldflags "-s -w -X $m/version.Version=$v" -o "$out.tmp/" \
    "$m/cmd/containerd" "$m/cmd/containerd-shim-runc-v2" "$m/cmd/ctr"
  rm -rf "$out"; mv "$out.tmp" "$out"
}

build_coredns() {
  local v=$COREDNS_VERSION out=$upstream/coredns-$COREDNS_VERSION
  new_module "$cache/work/coredns-$v" vkube.local/upstream-coredns
  cd "$cache/work/coredns-$v"
  go get -tool "github.com/coredns/coredns@$v"
  rm -rf "$out.tmp"; mkdir -p "$out.tmp"
  go build -trimpath -ldflags "-s -w" -o "$out.tmp/coredns" github.com/coredns/coredns
  rm -rf "$out"; mv "$out.tmp" "$out"
}

build_traefik() {
  local v=$TRAEFIK_VERSION out=$upstream/traefik-$TRAEFIK_VERSION
  local src=$cache/work/traefik-$v dir
  # Its go.mod replaces modules with its own forks, which only a build of the module itself
  # honours (not a wrapper's, not `go install`): built in a copy of the module.
  # Outside any module the caller may be in (its go line would decide the toolchain).
  cd "$cache/work"
  dir=$(go mod download -json "github.com/traefik/traefik/v3@$v" | sed -n 's/.*"Dir": "\(.*\)".*/\1/p')
  rm -rf "$src"; cp -r "$dir" "$src"; chmod -R u+w "$src"
  cd "$src"
  rm -rf "$out.tmp"; mkdir -p "$out.tmp"
  go build -trimpath -ldflags "-s -w -X github.com/traefik/traefik/v3/pkg/version.Version=$v" -o "$out.tmp/traefik" ./cmd/traefik
  cd /; rm -rf "$src"
  rm -rf "$out"; mv "$out.tmp" "$out"
}

build_metrics_server() {
  local v=$METRICS_SERVER_VERSION out=$upstream/metrics-server-$METRICS_SERVER_VERSION
  new_module "$cache/work/metrics-server-$v" vkube.local/upstream-metrics-server
  cd "$cache/work/metrics-server-$v"
  go get -tool "sigs.k8s.io/metrics-server/cmd/metrics-server@$v"
  rm -rf "$out.tmp"; mkdir -p "$out.tmp"
  # Its Makefile's version stamps (what `metrics-server --version` and its /version say).
  local p=k8s.io/client-go/pkg/version
  go build -trimpath -ldflags "-s -w -X $p.gitVersion=$v -X $p.gitTreeState=clean -X $p.buildDate=$(date -u +%Y-%m-%dT%H:%M:%SZ)" \
    -o "$out.tmp/metrics-server" sigs.k8s.io/metrics-server/cmd/metrics-server
  rm -rf "$out"; mv "$out.tmp" "$out"
}

build_etcd() {
  local v=$ETCD_VERSION out=$upstream/etcd-$ETCD_VERSION
  local mod=$cache/work/etcd-$v
  new_module "$mod" vkube.local/upstream-etcd
  cd "$mod"
  go get -tool "go.etcd.io/etcd/server/v3@$v" "go.etcd.io/etcd/etcdutl/v3@$v"
  rm -rf "$out.tmp"; mkdir -p "$out.tmp"
  go build -trimpath -ldflags "-s -w" -o "$out.tmp/etcd" go.etcd.io/etcd/server/v3
  # etcdutl: `vkube restore` and `vkube reset` turn a snapshot into etcd's data directory.
  go build -trimpath -ldflags "-s -w" -o "$out.tmp/etcdutl" go.etcd.io/etcd/etcdutl/v3
  rm -rf "$out"; mv "$out.tmp" "$out"
}

build_kwok() {
  local v=$KWOK_VERSION out=$upstream/kwok-$KWOK_VERSION
  local mod=$cache/work/kwok-$v
  new_module "$mod" vkube.local/upstream-kwok
  cd "$mod"
  go get -tool "sigs.k8s.io/kwok/cmd/kwok@$v"
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
  echo "$kwok_layout" > "$out.tmp/.layout"
  rm -rf "$out"; mv "$out.tmp" "$out"
}

build_helm() {
  local v=$HELM_VERSION out=$upstream/helm-$HELM_VERSION
  local mod=$cache/work/helm-$v
  new_module "$mod" vkube.local/upstream-helm
  cd "$mod"
  go get -tool "helm.sh/helm/v3/cmd/helm@$v"
  rm -rf "$out.tmp"; mkdir -p "$out.tmp"
  # Without these, `helm template` and `helm lint` assume Kubernetes v1.20.
  local minor
  minor=$(echo "$KUBERNETES_VERSION" | cut -d. -f2)
  local ld="-s -w -X helm.sh/helm/v3/internal/version.version=$v"
  for p in helm.sh/helm/v3/pkg/chartutil helm.sh/helm/v3/pkg/lint/rules; do
    ld+=" -X $p.k8sVersionMajor=1 -X $p.k8sVersionMinor=$minor"
  done
  go build -trimpath -ldflags "$ld" -o "$out.tmp/helm" helm.sh/helm/v3/cmd/helm
  echo "$helm_layout" > "$out.tmp/.layout"
  rm -rf "$out"; mv "$out.tmp" "$out"
}

comps=()
for arg in "${@:-all}"; do
  case $arg in
    # Kubernetes first: it is the longest, so its downloads should start at once.
    all) comps+=(kubernetes etcd kwok helm node containerd coredns traefik metrics-server) ;;
    host) comps+=(kubernetes etcd kwok helm) ;;
    kubernetes|etcd|kwok|helm|node|containerd|coredns|traefik|metrics-server|conformance) comps+=("$arg") ;;
    *) echo "usage: $0 [all|host|kubernetes|etcd|kwok|helm|node|containerd|coredns|traefik|metrics-server|conformance]..." >&2
       exit 2 ;;
  esac
done
start=$SECONDS

# Every job gets its own process group (job control), so a failure or Ctrl-C can stop the whole
# go build under it, not just the subshell.
set -m
declare -A pid=() began=()
stop_all() {
  local c
  for c in "${!pid[@]}"; do kill -TERM -- "-${pid[$c]}" 2>/dev/null || true; done
  # Reaped here, quietly: job control would otherwise report each one as "Terminated".
  for c in "${!pid[@]}"; do wait "${pid[$c]}" 2>/dev/null || true; done
}
trap 'stop_all' EXIT
trap 'stop_all; exit 130' INT TERM

for c in "${comps[@]}"; do
  v=$(version_of "$c")
  if cached "$c"; then log "$c $v: cached"; continue; fi
  # Kubernetes is the critical path: the others yield the CPU to it and fill the gaps left by its
  # downloads and links (2 cores; Go builds each use them all).
  prio=10; [ "$c" = kubernetes ] && prio=0
  # A function name has no hyphen: build_metrics_server for metrics-server.
  (renice -n "$prio" "$BASHPID" >/dev/null; "build_${c//-/_}") > "$logs/$c.log" 2>&1 &
  pid[$c]=$!; began[$c]=$SECONDS
  log "$c $v: building (log: $logs/$c.log)"
done

# Poll rather than `wait -n`: it has no timeout, and the minute lines need one.
last_note=$SECONDS
while [ ${#pid[@]} -gt 0 ]; do
  sleep 1
  for c in "${!pid[@]}"; do
    kill -0 "${pid[$c]}" 2>/dev/null && continue
    rc=0; wait "${pid[$c]}" || rc=$?
    unset "pid[$c]"
    v=$(version_of "$c")
    if [ "$rc" -ne 0 ]; then
      log "$c $v: FAILED (exit $rc) after $(dur $((SECONDS - began[$c]))); last lines of $logs/$c.log:"
      tail -n 40 "$logs/$c.log" >&2
      [ ${#pid[@]} -eq 0 ] || log "stopping the others: ${!pid[*]}"
      stop_all
      exit 1
    fi
    log "$c $v: done in $(dur $((SECONDS - began[$c])))"
  done
  if [ ${#pid[@]} -gt 0 ] && [ $((SECONDS - last_note)) -ge 60 ]; then
    last_note=$SECONDS
    still=()
    for c in "${comps[@]}"; do [ -n "${pid[$c]:-}" ] && still+=("$c ($(dur $((SECONDS - began[$c]))))"); done
    printf -v line '%s, ' "${still[@]}"
    log "still building: ${line%, }"
  fi
done
trap - EXIT
log "all upstream binaries ready under $upstream ($(dur $((SECONDS - start))))"
