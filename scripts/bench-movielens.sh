#!/usr/bin/env bash
# Quality on real data: MovieLens-100k as CTR (rating >= 4 is a click, split by time), each architecture
# trained by the release trainer; prints a table of AUC, GAUC (by user), LogLoss and samples/s.
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"
cd "$repo"
data="$FLYWHEEL_CACHE/movielens"
scripts/fetch-movielens.sh "$data/raw" >/dev/null
cargo build --release --locked -p flywheel-trainer
trainer="$CARGO_TARGET_DIR/release/flywheel-trainer"
"$trainer" movielens --from "$data/raw" --out "$data/ctr"
echo "| model | epochs | AUC | GAUC | LogLoss | calibration | samples/s |"
echo "|---|---|---|---|---|---|---|"
for model in logistic wide_deep deepfm; do
  "$trainer" train --train "$data/ctr/train.parquet" --eval "$data/ctr/eval.parquet" --schema "$data/ctr/schema.json" \
    --architecture "$model" --embedding-dim 16 --hidden 64,32 --epochs 2 --batch-size 256 --seed 1 \
    --output "$data/models/$model" --termination-log "$data/models/$model.json" --progress-every 1000000 >/dev/null
  python3 - "$data/models/$model.json" "$model" <<'PY'
import json, sys
r = json.load(open(sys.argv[1])); m = r["metrics"]
print(f"| {sys.argv[2]} | 2 | {m['auc']:.4f} | {m['gauc']:.4f} | {m['logLoss']:.4f} | {m['calibration']:.3f} | {r['samplesPerSecond']:.0f} |")
PY
done
