#!/usr/bin/env bash
# Admission benchmark: JOBS TrainingJobs (default 1000) applied at once against a fresh local kube-apiserver,
# the release-built operator; the admitted gangs' pods are created and stay Pending (no node). Prints one table.
#   scripts/bench-admission.sh [JOBS]
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"
cd "$repo"
prepare_system
step "building the operator and the benchmark (release)"
cargo build --release --locked -p flywheel-operator -p flywheel-e2e --bins
export FLYWHEEL_BIN_DIR="$CARGO_TARGET_DIR/release"
step "applying ${1:-1000} TrainingJobs"
"$FLYWHEEL_BIN_DIR/flywheel-bench-admission" "${1:-1000}"
