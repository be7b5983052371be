# syntax=docker/dockerfile:1
# The vkube image: one static-ish binary (glibc, rustls; no OpenSSL) on distroless, non-root,
# with the upstream components it runs as its children (`vkube run --supervise`, the Helm chart's
# one container): etcd, and kube-control-plane (kube-apiserver and kube-controller-manager in one
# process, hack/kube-control-plane) at the versions pinned in hack/versions.env (the ARGs below;
# a test keeps them in step).
#
#   docker build -t REGISTRY/vkube:TAG .
ARG KUBERNETES_VERSION=v1.37.2
ARG ETCD_TAG=3.6.16-0

FROM registry.k8s.io/etcd:${ETCD_TAG} AS etcd

# Built as hack/build-upstream.sh builds it for local clusters: the pinned k8s.io/kubernetes
# module and our small main.
# (It builds hack/versions.env's version, which the ARG above must match: a test checks.)
FROM golang:1.26-bookworm AS kube
WORKDIR /src
COPY hack/ hack/
RUN --mount=type=cache,target=/cache \
    VKUBE_CACHE=/cache bash hack/build-upstream.sh kubernetes \
    && . hack/versions.env \
    && install -D /cache/upstream/kubernetes-${KUBERNETES_VERSION}/kube-control-plane /usr/local/bin/kube-control-plane

FROM rust:1.95-bookworm AS build
WORKDIR /src
COPY . .
# Cache mounts: crates and incremental builds are reused across image builds (BuildKit).
RUN --mount=type=cache,target=/usr/local/cargo/registry \
    --mount=type=cache,target=/src/target \
    cargo build --profile dist --locked --bin vkube \
    && cp target/dist/vkube /vkube

FROM gcr.io/distroless/cc-debian12:nonroot
COPY --from=build /vkube /vkube
COPY --from=etcd /usr/local/bin/etcd /usr/local/bin/etcd
# `vkube restore` and `vkube reset` make etcd's data directory from a snapshot with it.
COPY --from=etcd /usr/local/bin/etcdutl /usr/local/bin/etcdutl
COPY --from=kube /usr/local/bin/kube-control-plane /usr/local/bin/kube-control-plane
# 65532, as the chart's pod security context.
USER nonroot:nonroot
ENTRYPOINT ["/vkube"]
