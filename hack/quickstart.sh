#!/usr/bin/env bash
# From a fresh clone to kubectl working against a virtual cluster: builds what is missing (cached
# outside the clone), starts the local dev host cluster, creates the virtual cluster "demo" on it,
# and runs a deployment there with plain kubectl. Harmless to run again.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

step() { printf '\n== %s\n' "$*" >&2; }

step "upstream binaries (Kubernetes, etcd, kwok, helm; first run ~12 min on 2 cores, then cached)"
hack/build-upstream.sh
step "vkube (release build; the image and hack/bench use the slower whole-program-optimized profile dist)"
cargo build --release --bin vkube
vkube=$PWD/target/release/vkube

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
