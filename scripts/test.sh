#!/usr/bin/env bash
# Runs every check and test: formatting, clippy, unit tests, CRD freshness, the tests against a real
# kube-apiserver (started per test binary), a current CRD server, and a real node running the built images.
# Installs what it needs; caches builds under ~/.cache/flywheel.
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"
cd "$repo"
start=$SECONDS

prepare_system

step "cargo fmt --check"
cargo fmt --all -- --check

step "cargo clippy"
cargo clippy --workspace --all-targets --locked -- -D warnings

step "cargo clippy --features cuda (the GPU trainer compiles offline, without a CUDA toolkit)"
cargo clippy -p flywheel-trainer --features cuda --all-targets --locked -- -D warnings

step "cargo build (binaries the e2e tests run)"
cargo build --workspace --bins --locked

step "images (flywheel-operator, -trainer, -serving) from the dev binaries, for the real node's pods"
scripts/build-images.sh --profile dev

step "cargo test"
cargo test --workspace --locked

step "all checks passed in $((SECONDS - start)) s"
