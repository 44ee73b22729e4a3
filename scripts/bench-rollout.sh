#!/usr/bin/env bash
# Rollout benchmark: rollback reaction times (Alertmanager webhook → canary weight 0; failing sample in
# Prometheus → weight 0) and ROLLOUTS Rollouts (default 1000) created at once, against a fresh local
# kube-apiserver, the release-built operator and Debian's Prometheus. Prints two tables.
#   scripts/bench-rollout.sh [ROLLOUTS]
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"
cd "$repo"
prepare_system
step "building the operator and the benchmark (release)"
cargo build --release --locked -p flywheel-operator -p flywheel-e2e --bins
export FLYWHEEL_BIN_DIR="$CARGO_TARGET_DIR/release"
step "benchmark"
"$FLYWHEEL_BIN_DIR/flywheel-bench-rollout" "${1:-1000}"
