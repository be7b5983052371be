#!/usr/bin/env bash
# The whole test suite: builds the pinned upstream binaries if the cache lacks them, checks lints,
# then runs every unit and end-to-end test against real API servers. CI runs exactly this.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

step() { printf '\n== %s\n' "$*" >&2; }

step "upstream binaries (cached under ${VKUBE_CACHE:-~/.cache/vkube}) and the real node's Debian packages"
hack/build-upstream.sh
hack/debian-deps.sh

step "build"
cargo build --workspace --bins --tests

step "lints"
cargo clippy --workspace --all-targets --quiet -- -D warnings
cargo fmt --all --check

step "tests"
cargo test --workspace -- --test-threads="${VKUBE_TEST_THREADS:-2}"
