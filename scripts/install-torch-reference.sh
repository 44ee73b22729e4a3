#!/usr/bin/env bash
# A Python venv with CPU-usable PyTorch, pyarrow and numpy for the reference benchmarks (never for tests).
# PyPI's Linux torch wheel is the CUDA build and does not import without its CUDA runtime wheels, so the whole
# dependency set is downloaded once (~2.9 GB, cached) and installed offline from there. Prints the venv's python.
set -euo pipefail
cache="${FLYWHEEL_CACHE:-$HOME/.cache/flywheel}"
wheels="$cache/pip-torch" venv="$cache/torch-venv"
packages=(torch==2.15.0 pyarrow numpy)
if ! "$venv/bin/python" -c 'import torch, pyarrow, numpy' >/dev/null 2>&1; then
  mkdir -p "$wheels"
  python3 -m pip download --quiet --disable-pip-version-check -d "$wheels" "${packages[@]}" >&2
  python3 -m venv "$venv"
  "$venv/bin/pip" install --quiet --disable-pip-version-check --no-index --find-links "$wheels" "${packages[@]}" >&2
fi
echo "$venv/bin/python"
