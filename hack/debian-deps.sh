#!/usr/bin/env bash
# Installs the Debian packages the tests need (idempotent: nothing to do when they are all
# present): a real node's (the rest of it, kubelet, kube-proxy, containerd, CoreDNS, pause, is
# built by hack/build-upstream.sh), and headless Chromium for the dashboard's test.
#   runc                         the OCI runtime (Debian's crun refuses cgroup v1 hybrid layouts)
#   containernetworking-plugins  bridge, host-local, portmap, loopback (in /usr/lib/cni)
#   iptables nftables            kube-proxy's rules and the bridge plugin's masquerade
#   busybox-static               the root filesystem of the test image
#   iproute2 util-linux          the node's bridge and mounts
#   chromium-headless-shell      loads the dashboard's pages in the e2e tests
# and the packages named as arguments (hack/conformance: bash-static).
set -euo pipefail
pkgs=(runc containernetworking-plugins iptables nftables busybox-static iproute2 util-linux chromium-headless-shell "$@")
missing=()
for p in "${pkgs[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q 'install ok installed' || missing+=("$p")
done
[ ${#missing[@]} -eq 0 ] && exit 0
echo "[debian-deps] installing ${missing[*]}" >&2
sudo=(); [ "$(id -u)" -eq 0 ] || sudo=(sudo)
export DEBIAN_FRONTEND=noninteractive
"${sudo[@]}" apt-get update -qq >/dev/null || echo "[debian-deps] apt-get update failed; trying the install with the lists there are" >&2
"${sudo[@]}" apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
