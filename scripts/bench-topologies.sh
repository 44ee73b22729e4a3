#!/usr/bin/env bash
# Training throughput and quality by topology on the same generated data: one process, and parameter servers
# (S shards + W workers as separate processes on 127.0.0.1). Prints a table; `ROWS`, `SHARDS`, `WORKERS` override
# the defaults. Data-parallel is not implemented yet.
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"
cd "$repo"
rows="${ROWS:-400000}" shards="${SHARDS:-2}" workers="${WORKERS:-2}"
cargo build --release --locked -p flywheel-trainer
trainer="$CARGO_TARGET_DIR/release/flywheel-trainer"
work="$(mktemp -d)"
trap 'kill $(jobs -p) 2>/dev/null; rm -rf "$work"' EXIT
"$trainer" generate --rows "$rows" --users 5000 --items 1000 --out "$work/data" >"$work/generated.json"
common=(--train "$work/data/train.parquet" --eval "$work/data/eval.parquet" --schema "$work/data/schema.json"
  --architecture deepfm --embedding-dim 16 --hidden 400,400 --batch-size 1024 --seed 7 --progress-every 1000000)
free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'; }

"$trainer" train "${common[@]}" --output "$work/single" --termination-log "$work/single.json" >/dev/null

addrs=()
for ((i = 0; i < shards; i++)); do
  port="$(free_port)"
  addrs+=("127.0.0.1:$port")
  "$trainer" ps --listen "127.0.0.1:$port" --shard "$i" --workers "$workers" --embedding-dim 16 --seed 7 >/dev/null &
done
peers="$(IFS=,; echo "${addrs[*]}")"
started=$(date +%s.%N)
for ((r = 1; r < workers; r++)); do
  "$trainer" train "${common[@]}" --ps "$peers" --rank "$r" --workers "$workers" --output "$work/w$r" \
    --termination-log "$work/w$r.json" >/dev/null &
done
"$trainer" train "${common[@]}" --ps "$peers" --rank 0 --workers "$workers" --output "$work/w0" \
  --termination-log "$work/ps.json" >/dev/null
wait
elapsed=$(python3 -c "import time; print(time.time() - $started)")

python3 - "$work" "$rows" "$shards" "$workers" "$elapsed" <<'PY'
import json, sys
work, rows, shards, workers, elapsed = sys.argv[1], int(sys.argv[2]), sys.argv[3], sys.argv[4], float(sys.argv[5])
generated = [json.loads(l) for l in open(f"{work}/generated.json")][-1]
single, ps = json.load(open(f"{work}/single.json")), json.load(open(f"{work}/ps.json"))
train_rows = generated["trainRows"]
print(f"rows {rows} ({train_rows} train), DeepFM 16-d, MLP 400-400, batch 1024, eval Bayes AUC {generated['evalBayesAuc']:.4f}")
print("| topology | processes | samples/s (all workers) | AUC | GAUC |")
print("|---|---|---|---|---|")
print(f"| single | 1 | {single['samplesPerSecond']:.0f} | {single['metrics']['auc']:.4f} | {single['metrics']['gauc']:.4f} |")
print(f"| parameter server {shards}x{workers} | {int(shards) + int(workers)} | {train_rows / elapsed:.0f} | {ps['metrics']['auc']:.4f} | {ps['metrics']['gauc']:.4f} |")
PY
