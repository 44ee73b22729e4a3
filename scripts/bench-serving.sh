#!/usr/bin/env bash
# Serving benchmark: trains a DeepFM (16-dim embeddings, MLP 256-128, 100k-row hashed tables) with the release
# trainer, then runs serving-image/benches/serving.rs: flywheel-serving on CPU 0 (one tokio thread, one scorer
# thread), the same model shape behind PyTorch + FastAPI (bench/torch_server.py) on CPU 0, the load generator
# and the router on CPU 1. Prints a table. Not part of the test command (it installs PyTorch, ~2.9 GB once).
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"
cd "$repo"

step "PyTorch reference environment (cached in $FLYWHEEL_CACHE)"
python=$(scripts/install-torch-reference.sh)
"$python" -c 'import fastapi, uvicorn, xxhash' 2>/dev/null ||
  "$python" -m pip install --quiet --disable-pip-version-check fastapi uvicorn xxhash

step "release builds"
cargo build --release --locked -p flywheel-trainer
bench=$(cargo bench --locked -p flywheel-serving --bench serving --no-run --message-format=json |
  python3 -c 'import json,sys
for line in sys.stdin:
    m = json.loads(line)
    if m.get("reason") == "compiler-artifact" and m["target"]["name"] == "serving" and m.get("executable"):
        print(m["executable"])')

work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
trainer="$CARGO_TARGET_DIR/release/flywheel-trainer"
step "training the benchmark model"
"$trainer" generate --rows 200000 --buckets 100000 --out "$work/data" >/dev/null
"$trainer" train --train "$work/data/train.parquet" --eval "$work/data/eval.parquet" \
  --schema "$work/data/schema.json" --embedding-dim 16 --hidden 256,128 --output "$work/model" | tail -1

step "benchmark"
FLYWHEEL_BENCH_MODEL="$work/model/model.fwm" FLYWHEEL_BENCH_SCHEMA="$work/data/schema.json" \
  FLYWHEEL_BENCH_PYTHON="$python" FLYWHEEL_BENCH_SERVER_CPU=0 taskset -c 1 "$bench"
