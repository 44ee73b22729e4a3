#!/usr/bin/env bash
# Model-quality benchmark: how close training gets to the Bayes-optimal AUC of generated data (the generator knows
# every impression's true click probability), as the data grows. The gap left is estimation error (too few
# impressions per user and item for their latent factors), so it shrinks with data; the table shows where it
# falls under 0.01. One process (burn flex, all cores), release build; prints a Markdown table.
# Environment: SIZES (generated rows, default "1500000 3000000 6000000"; 80% train, the last 20% of time eval),
# USERS (1000), ITEMS (200), MODEL (deepfm), DIM (8), HIDDEN (64,64), SPARSE_LR (0.2), EPOCHS (4).
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"
cd "$repo"
read -r -a sizes <<<"${SIZES:-1500000 3000000 6000000}"
users="${USERS:-1000}" items="${ITEMS:-200}" model="${MODEL:-deepfm}" dim="${DIM:-8}" hidden="${HIDDEN:-64,64}"
sparse_lr="${SPARSE_LR:-0.2}" epochs="${EPOCHS:-4}"
cargo build --release --locked -p flywheel-trainer
trainer="$CARGO_TARGET_DIR/release/flywheel-trainer"
work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT

echo "$model ${dim}-d, MLP $hidden, sparse Adagrad lr $sparse_lr, batch 1024, $epochs epochs; $users users, $items items"
echo "| generated rows | train rows | eval Bayes AUC | AUC | Bayes gap | GAUC | LogLoss | calibration | samples/s |"
echo "|---|---|---|---|---|---|---|---|---|"
for rows in "${sizes[@]}"; do
  data="$work/data-$rows"
  "$trainer" generate --rows "$rows" --users "$users" --items "$items" --out "$data" >"$work/generated.json"
  "$trainer" train --train "$data/train.parquet" --eval "$data/eval.parquet" --schema "$data/schema.json" \
    --architecture "$model" --embedding-dim "$dim" --hidden "$hidden" --sparse-learning-rate "$sparse_lr" \
    --epochs "$epochs" --seed 7 --progress-every 1000000000 --output "$work/model-$rows" \
    --termination-log "$work/result.json" >/dev/null
  python3 - "$rows" "$work/generated.json" "$work/result.json" <<'PY'
import json, sys
rows, generated, result = sys.argv[1], json.loads(open(sys.argv[2]).read().splitlines()[-1]), json.load(open(sys.argv[3]))
m, bayes = result["metrics"], generated["evalBayesAuc"]
print(f"| {int(rows):,} | {generated['trainRows']:,} | {bayes:.4f} | {m['auc']:.4f} | {bayes - m['auc']:.4f} | "
      f"{m['gauc']:.4f} | {m['logLoss']:.4f} | {m['calibration']:.3f} | {result['samplesPerSecond']:,.0f} |")
PY
  rm -rf "$data" "$work/model-$rows"
done
