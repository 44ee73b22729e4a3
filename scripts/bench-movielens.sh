#!/usr/bin/env bash
# Quality on real data: MovieLens-100k as CTR (rating >= 4 is a click, split by time), each architecture
# trained by the release trainer and by the PyTorch reference (bench/torch_reference.py) with the same
# hyperparameters on the same encoded features; prints a table of AUC, GAUC (by user), LogLoss and samples/s.
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"
cd "$repo"
data="$FLYWHEEL_CACHE/movielens"
scripts/fetch-movielens.sh "$data/raw" >/dev/null
python="$(scripts/install-torch-reference.sh)"
cargo build --release --locked -p flywheel-trainer
trainer="$CARGO_TARGET_DIR/release/flywheel-trainer"
"$trainer" movielens --from "$data/raw" --out "$data/ctr" >/dev/null
for split in train eval; do
  "$trainer" encode --data "$data/ctr/$split.parquet" --schema "$data/ctr/schema.json" \
    --out "$data/ctr/$split.encoded.parquet" >/dev/null
done
hyper=(--embedding-dim 16 --hidden 64,32 --epochs 2 --batch-size 256 --seed 1)
# The PyTorch reference trains every row for exactly these epochs and does not calibrate: so does Flywheel here.
flywheel_only=(--validation-fraction 0 --calibration none)
echo "| model | implementation | AUC | GAUC | LogLoss | calibration | samples/s |"
echo "|---|---|---|---|---|---|---|"
for model in logistic wide_deep deepfm; do
  "$trainer" train --train "$data/ctr/train.parquet" --eval "$data/ctr/eval.parquet" --schema "$data/ctr/schema.json" \
    --architecture "$model" "${hyper[@]}" "${flywheel_only[@]}" --output "$data/models/$model" \
    --termination-log "$data/models/$model.json" --progress-every 1000000 >/dev/null
  "$python" bench/torch_reference.py --train "$data/ctr/train.encoded.parquet" --eval "$data/ctr/eval.encoded.parquet" \
    --architecture "$model" "${hyper[@]}" >"$data/models/$model.torch.json"
  python3 - "$data/models/$model" "$model" <<'PY'
import json, sys
for implementation, path in (("Flywheel", sys.argv[1] + ".json"), ("PyTorch", sys.argv[1] + ".torch.json")):
    r = json.load(open(path)); m = r["metrics"]
    print(f"| {sys.argv[2]} | {implementation} | {m['auc']:.4f} | {m['gauc']:.4f} | {m['logLoss']:.4f} | "
          f"{m['calibration']:.3f} | {r['samplesPerSecond']:,.0f} |")
PY
done
