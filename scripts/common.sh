# Shared by scripts/test.sh and scripts/demo.sh: caches outside the clone, system packages, the control-plane
# binaries. Source it; it sets FLYWHEEL_CACHE and CARGO_TARGET_DIR.
set -euo pipefail

repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
export FLYWHEEL_CACHE="${FLYWHEEL_CACHE:-$HOME/.cache/flywheel}"
# One target dir outside the clone, so a fresh clone (CI) reuses earlier builds.
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$FLYWHEEL_CACHE/target}"
export FLYWHEEL_BIN_DIR="$CARGO_TARGET_DIR/debug"
mkdir -p "$FLYWHEEL_CACHE"

step() { printf '\n==> %s\n' "$*"; }

prepare_system() {
  step "system packages (etcd, Go, Prometheus, …)"
  "$repo/e2e/scripts/install-system-deps.sh"
  step "kube-apiserver, kube-controller-manager, kubectl v1.20.2 (cached in $FLYWHEEL_CACHE)"
  "$repo/e2e/scripts/build-kube.sh"
  step "tansu (Kafka-protocol broker for the serving tests; cached in $FLYWHEEL_CACHE)"
  "$repo/e2e/scripts/build-tansu.sh"
  step "tritonclient (an off-the-shelf Open Inference Protocol client for the serving tests)"
  "$repo/e2e/scripts/install-tritonclient.sh" >/dev/null
}
