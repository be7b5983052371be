# syntax=docker/dockerfile:1
# The vkube image: one static-ish binary (glibc, rustls; no OpenSSL) on distroless, non-root.
# The Helm chart (charts/vkube) runs it as `vkube prepare` (init) and `vkube run`.
#
#   docker build -t REGISTRY/vkube:TAG .

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
# 65532, as the chart's pod security context.
USER nonroot:nonroot
ENTRYPOINT ["/vkube"]
