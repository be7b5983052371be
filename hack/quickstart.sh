#!/usr/bin/env bash
# From a fresh clone to kubectl working against a virtual cluster: builds what is missing (cached
# outside the clone), starts the local dev host cluster, creates the virtual cluster "demo" on it,
# and runs a deployment there with plain kubectl. Harmless to run again.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

step() { printf '\n== %s\n' "$*" >&2; }
cache=${VKUBE_CACHE:-$HOME/.cache/vkube}
vkube=${CARGO_TARGET_DIR:-$PWD/target}/release/vkube
logs=$cache/work/logs
mkdir -p "$logs"
clog() { printf '[cargo %s] %s\n' "$(date +%H:%M:%S)" "$*" >&2; }
dur() { if [ "$1" -ge 60 ]; then printf '%dm%02ds' $(($1 / 60)) $(($1 % 60)); else printf '%ds' "$1"; fi; }

step "upstream binaries (Kubernetes, etcd, kwok, helm) and vkube, built side by side; first run ~18 min on 2 cores, then cached"
# The vkube release build (cargo's default profile; the image and hack/bench use the slower
# whole-program-optimized profile dist) runs beside the Go builds: either one alone leaves a core
# idle during downloads and links. Its own process group, so it can be stopped as a whole.
set -m
cargo build --release --bin vkube > "$logs/cargo-vkube.log" 2>&1 &
cargo_pid=$!
set +m
cargo_start=$SECONDS
clog "vkube (release): building (log: $logs/cargo-vkube.log)"
trap 'kill -TERM -- "-$cargo_pid" 2>/dev/null || true' EXIT
# The quick start's host has kwok nodes only: the real node's binaries are not needed.
hack/build-upstream.sh host
last_note=$SECONDS
while kill -0 "$cargo_pid" 2>/dev/null; do
  sleep 0.2
  if [ $((SECONDS - last_note)) -ge 60 ]; then
    last_note=$SECONDS; clog "still building: vkube ($(dur $((SECONDS - cargo_start))))"
  fi
done
trap - EXIT
if ! wait "$cargo_pid"; then
  clog "vkube (release): FAILED; last lines of $logs/cargo-vkube.log:"
  tail -n 40 "$logs/cargo-vkube.log" >&2
  exit 1
fi
clog "vkube (release): done in $(dur $((SECONDS - cargo_start)))"

step "local host cluster"
$vkube dev up
eval "$($vkube dev env)"
kubectl get nodes

step "virtual cluster demo"
$vkube create demo --local
$vkube list
state=${VKUBE_STATE:-$HOME/.local/state/vkube}
$vkube connect demo --print > "$state/demo.kubeconfig"
export KUBECONFIG=$state/demo.kubeconfig

step "kubectl against the virtual cluster"
kubectl create deployment hello --image=nginx --replicas=2 --dry-run=client -o yaml | kubectl apply -f -
kubectl rollout status deployment/hello --timeout=120s
kubectl get pods -o wide

cat >&2 <<EOT

The virtual cluster "demo" runs on the local host cluster. Try:
  export KUBECONFIG=$state/demo.kubeconfig
  kubectl get pods,services,nodes
  kubectl logs deploy/hello; kubectl exec deploy/hello -- echo hi
Its pods on the host:  $vkube dev env | grep KUBECONFIG; kubectl get pods -n vkube-demo
Clean up:              $vkube delete demo; $vkube dev down
EOT
