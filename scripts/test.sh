#!/usr/bin/env bash
# Runs every check and test: formatting, clippy, docs and unit tests first (they need only the Rust toolchain,
# so a mistake fails in minutes), then installs the system parts and runs the tests against a real
# kube-apiserver (started per test binary), a current CRD server, and a real node running the built images.
# Installs what it needs; caches builds under ~/.cache/flywheel.
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"
cd "$repo"
start=$SECONDS

ensure_build_packages

step "cargo fmt --check"
cargo fmt --all -- --check

step "cargo clippy"
cargo clippy --workspace --all-targets --locked -- -D warnings

step "cargo clippy --features cuda (the GPU trainer compiles offline, without a CUDA toolkit)"
cargo clippy -p flywheel-trainer --features cuda --all-targets --locked -- -D warnings

step "cargo doc (warnings denied)"
RUSTDOCFLAGS="-D warnings" cargo doc --workspace --no-deps --locked

step "unit tests (libraries and binaries; no server) and the module-cycle check"
cargo test --workspace --locked --lib --bins
cargo test -p flywheel-e2e --locked --test module_cycles

prepare_system

step "cargo build (binaries the e2e tests run)"
cargo build --workspace --bins --locked

step "images (flywheel-operator, -trainer, -serving) from the dev binaries, for the real node's pods"
scripts/build-images.sh --profile dev

step "integration tests (real API servers, the real node, real brokers and stores)"
cargo test --workspace --locked --test '*'

step "all checks passed in $((SECONDS - start)) s"
