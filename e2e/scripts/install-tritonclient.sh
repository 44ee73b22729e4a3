#!/usr/bin/env bash
# A venv with the off-the-shelf Triton client (tritonclient[grpc,http] from PyPI) for the serving
# compatibility test; cached. Prints the venv's python.
set -euo pipefail
cache="${FLYWHEEL_CACHE:-$HOME/.cache/flywheel}"
venv="$cache/client-venv"
if ! "$venv/bin/python" -c 'import tritonclient.grpc, tritonclient.http' >/dev/null 2>&1; then
  python3 -m venv "$venv"
  "$venv/bin/pip" install --quiet --disable-pip-version-check "tritonclient[grpc,http]==2.*" >&2
fi
echo "$venv/bin/python"
