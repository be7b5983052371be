# syntax=docker/dockerfile:1
# The vkube image: one static-ish binary (glibc, rustls; no OpenSSL) on distroless, non-root,
# with the upstream components it runs as its children (`vkube run --supervise`, the Helm chart's
# one container): etcd, kube-apiserver and kube-controller-manager at the versions pinned in
# hack/versions.env (the ARGs below; a test keeps them in step).
#
#   docker build -t REGISTRY/vkube:TAG .
ARG KUBERNETES_VERSION=v1.37.2
ARG ETCD_TAG=3.6.16-0

FROM registry.k8s.io/etcd:${ETCD_TAG} AS etcd
FROM registry.k8s.io/kube-apiserver:${KUBERNETES_VERSION} AS kube-apiserver
FROM registry.k8s.io/kube-controller-manager:${KUBERNETES_VERSION} AS kube-controller-manager

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
COPY --from=kube-apiserver /usr/local/bin/kube-apiserver /usr/local/bin/kube-apiserver
COPY --from=kube-controller-manager /usr/local/bin/kube-controller-manager /usr/local/bin/kube-controller-manager
# 65532, as the chart's pod security context.
USER nonroot:nonroot
ENTRYPOINT ["/vkube"]
