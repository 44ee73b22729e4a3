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

# Debian's Docker client builds with BuildKit by itself (DOCKER_BUILDKIT=1); a client elsewhere on PATH may
# need the buildx plugin instead.
if [[ -z "${DOCKER:-}" && -x /usr/bin/docker ]]; then export DOCKER=/usr/bin/docker; fi

# The C libraries the crates link before anything else runs: librdkafka's TLS and SASL SCRAM use the system
# OpenSSL. Debian's machines usually carry them; a bare one gets them here.
ensure_build_packages() {
  if ! pkg-config --exists openssl 2>/dev/null; then
    step "build packages (libssl-dev, pkg-config)"
    local sudo=""
    [[ $(id -u) -eq 0 ]] || sudo="sudo"
    $sudo apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq --no-install-recommends libssl-dev pkg-config >/dev/null
  fi
}

prepare_system() {
  step "system packages (etcd, Go, Prometheus, …)"
  "$repo/e2e/scripts/install-system-deps.sh"
  step "kube-apiserver, kube-controller-manager, kubectl v1.20.2 (cached in $FLYWHEEL_CACHE)"
  "$repo/e2e/scripts/build-kube.sh"
  step "Prometheus 3 with Kubernetes discovery, from Debian sid (cached in $FLYWHEEL_CACHE)"
  "$repo/e2e/scripts/install-prometheus.sh"
  step "apiextensions-apiserver of Kubernetes 1.36 (checks the CRDs' CEL rules; cached in $FLYWHEEL_CACHE)"
  "$repo/e2e/scripts/build-apiextensions.sh"
  step "the node: Docker, CNI plugins, iptables, conntrack, dnsmasq; a Docker daemon"
  "$repo/e2e/scripts/install-node-deps.sh"
  export DOCKER="${DOCKER:-/usr/bin/docker}"
  "$repo/e2e/scripts/ensure-docker.sh"
  step "tansu (Kafka-protocol broker for the serving tests; cached in $FLYWHEEL_CACHE)"
  "$repo/e2e/scripts/build-tansu.sh"
  step "tritonclient (an off-the-shelf Open Inference Protocol client for the serving tests)"
  "$repo/e2e/scripts/install-tritonclient.sh" >/dev/null
}
