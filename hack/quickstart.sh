#!/usr/bin/env bash
# From a fresh clone to kubectl working against the local dev host cluster: builds what is
# missing (cached outside the clone), starts the host, and shows kubectl using it.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

hack/build-upstream.sh
cargo build --release --bin vkube
vkube=target/release/vkube

$vkube dev up
eval "$($vkube dev env)"
echo "+ kubectl get nodes" >&2
kubectl get nodes
