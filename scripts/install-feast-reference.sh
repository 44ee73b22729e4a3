#!/usr/bin/env bash
# A Python venv with Feast (Redis online store, file offline store), pyarrow and pandas for the feature-store
# reference benchmark (bench/feast_reference.py; never for tests). Cached: a marker file names the pinned
# package set, so a re-run with the same pins is instant. Prints the venv's python.
set -euo pipefail
cache="${FLYWHEEL_CACHE:-$HOME/.cache/flywheel}"
venv="$cache/feast-venv"
packages=("feast[redis]==0.67.0" pyarrow pandas)
marker="$venv/.flywheel-installed"
if [[ ! -x "$venv/bin/python" || "$(cat "$marker" 2>/dev/null)" != "${packages[*]}" ]]; then
  [[ -x "$venv/bin/python" ]] || python3 -m venv "$venv"
  "$venv/bin/pip" install --quiet --disable-pip-version-check "${packages[@]}" >&2
  "$venv/bin/python" -c 'import feast, redis, pyarrow, pandas' >&2
  echo "${packages[*]}" >"$marker"
fi
echo "$venv/bin/python"
