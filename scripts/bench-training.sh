#!/usr/bin/env bash
# Training benchmark: samples/s and quality of each topology on the same generated data, side by side with the
# PyTorch reference (bench/torch_reference.py) of the same model and hyperparameters, in the same run.
#   single           one process (burn flex backend, all cores)
#   parameter server SHARDS shard processes + WORKERS asynchronous workers on 127.0.0.1
#   data-parallel    WORKERS synchronous ranks on 127.0.0.1, gradients reduced every step
#   PyTorch          one process, sparse embedding gradients + sparse Adagrad, Adam for the dense part
# Environment: ROWS (default 1000000), USERS (1000), ITEMS (200), SHARDS (2), WORKERS (2), MODEL (deepfm),
# HIDDEN (MLP widths, several separated by spaces: one table each; default "64,64 400,400", a narrow and a wide
# MLP), BATCH (1024), EPOCHS (1), DEVICE (cpu; `cuda` trains the single process on GPU 0, data-parallel
# rank r on GPU r, and PyTorch on GPU 0: needs a GPU machine and builds the trainer with --features cuda).
# Prints a Markdown table per MLP.
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"
cd "$repo"
rows="${ROWS:-1000000}" users="${USERS:-1000}" items="${ITEMS:-200}" shards="${SHARDS:-2}" workers="${WORKERS:-2}"
model="${MODEL:-deepfm}" hiddens="${HIDDEN:-64,64 400,400}" batch="${BATCH:-1024}" epochs="${EPOCHS:-1}"
device="${DEVICE:-cpu}"
python="$(scripts/install-torch-reference.sh)"
features=()
[[ "$device" == cpu ]] || features=(--features cuda)
cargo build --release --locked -p flywheel-trainer "${features[@]}"
trainer="$CARGO_TARGET_DIR/release/flywheel-trainer"
work="$(mktemp -d)"
trap 'kill $(jobs -p) 2>/dev/null; rm -rf "$work"' EXIT
"$trainer" generate --rows "$rows" --users "$users" --items "$items" --out "$work/data" >"$work/generated.json"
free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'; }
now() { date +%s.%N; }

# One process per GPU: rank r of a data-parallel gang trains on GPU r.
device_of() { if [[ "$device" == cpu ]]; then echo cpu; else echo "cuda:$1"; fi; }
"$trainer" encode --data "$work/data/train.parquet" --schema "$work/data/schema.json" --out "$work/train.encoded.parquet" >/dev/null
"$trainer" encode --data "$work/data/eval.parquet" --schema "$work/data/schema.json" --out "$work/eval.encoded.parquet" >/dev/null

# One table per MLP: every topology and PyTorch on the same data.
bench_mlp() {
  local hidden="$1"
  common=(--train "$work/data/train.parquet" --eval "$work/data/eval.parquet" --schema "$work/data/schema.json"
    --architecture "$model" --embedding-dim 16 --hidden "$hidden" --batch-size "$batch" --epochs "$epochs" --seed 7
    --validation-fraction 0 --calibration none
    --progress-every 1000000)
  "$trainer" train "${common[@]}" --device "$(device_of 0)" --output "$work/single" \
    --termination-log "$work/single.json" >/dev/null

  addrs=()
  for ((i = 0; i < shards; i++)); do
    port="$(free_port)"
    addrs+=("127.0.0.1:$port")
    "$trainer" ps --listen "127.0.0.1:$port" --shard "$i" --workers "$workers" --architecture "$model" \
      --embedding-dim 16 --seed 7 >/dev/null &
  done
  peers="$(IFS=,; echo "${addrs[*]}")"
  started=$(now)
  for ((r = 1; r < workers; r++)); do
    "$trainer" train "${common[@]}" --ps "$peers" --rank "$r" --workers "$workers" --output "$work/w$r" \
      --termination-log "$work/w$r.json" >/dev/null &
  done
  "$trainer" train "${common[@]}" --ps "$peers" --rank 0 --workers "$workers" --output "$work/w0" \
    --termination-log "$work/ps.json" >/dev/null
  wait
  ps_seconds=$(python3 -c "import time; print(time.time() - $started)")

  port="$(free_port)"
  for ((r = 1; r < workers; r++)); do
    "$trainer" train "${common[@]}" --data-parallel "127.0.0.1:$port" --rank "$r" --workers "$workers" \
      --device "$(device_of "$r")" --output "$work/d$r" --termination-log "$work/d$r.json" >/dev/null &
  done
  "$trainer" train "${common[@]}" --data-parallel "127.0.0.1:$port" --listen "127.0.0.1:$port" --rank 0 \
    --workers "$workers" --device "$(device_of 0)" --output "$work/d0" --termination-log "$work/dp.json" >/dev/null
  wait

  "$python" bench/torch_reference.py --train "$work/train.encoded.parquet" --eval "$work/eval.encoded.parquet" \
    --architecture "$model" --embedding-dim 16 --hidden "$hidden" --batch-size "$batch" --epochs "$epochs" \
    --seed 7 --device "$(device_of 0)" >"$work/torch.json"

  python3 - "$work" "$shards" "$workers" "$ps_seconds" "$model" "$hidden" "$batch" "$epochs" <<'PY'
import json, sys
work, shards, workers, ps_seconds, model, hidden, batch, epochs = sys.argv[1:]
generated = [json.loads(l) for l in open(f"{work}/generated.json")][-1]
load = lambda name: json.load(open(f"{work}/{name}.json"))
single, ps, dp, torch = load("single"), load("ps"), load("dp"), load("torch")
samples = generated["trainRows"] * int(epochs)
bayes = generated["evalBayesAuc"]
print(f"{generated['trainRows']} train / {generated['evalRows']} eval rows, {model} 16-d, MLP {hidden}, "
      f"batch {batch}, {epochs} epoch(s); eval Bayes-optimal AUC {bayes:.4f}; PyTorch {torch['torch']} "
      f"({torch['threads']} threads)")
print("| topology | processes | samples/s | vs PyTorch | AUC | Bayes gap | GAUC | LogLoss | calibration |")
print("|---|---|---|---|---|---|---|---|---|")
def row(name, processes, rate, m):
    print(f"| {name} | {processes} | {rate:,.0f} | {rate / torch['samplesPerSecond']:.2f}x | {m['auc']:.4f} | "
          f"{bayes - m['auc']:.4f} | {m['gauc']:.4f} | {m['logLoss']:.4f} | {m['calibration']:.3f} |")
row("Flywheel single", 1, single["samplesPerSecond"], single["metrics"])
row(f"Flywheel parameter server {shards}x{workers}", int(shards) + int(workers), samples / float(ps_seconds), ps["metrics"])
row(f"Flywheel data-parallel x{workers}", int(workers), dp["samplesPerSecond"], dp["metrics"])
row("PyTorch reference", 1, torch["samplesPerSecond"], torch["metrics"])
PY
}

for hidden in $hiddens; do bench_mlp "$hidden"; done
