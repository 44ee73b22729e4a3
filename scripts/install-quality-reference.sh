#!/usr/bin/env bash
# A Python venv with scikit-learn, pandas and pyarrow for the real-data quality benchmark (never for tests).
# Prints the venv's python.
set -euo pipefail
cache="${FLYWHEEL_CACHE:-$HOME/.cache/flywheel}"
venv="$cache/quality-venv"
packages=(scikit-learn==1.9.1 pandas==3.1.1 pyarrow==26.0.1)
if ! "$venv/bin/python" -c 'import sklearn, pandas, pyarrow' >/dev/null 2>&1; then
  python3 -m venv "$venv"
  "$venv/bin/pip" install --quiet --disable-pip-version-check "${packages[@]}" >&2
fi
echo "$venv/bin/python"
