#!/usr/bin/env bash
# Feature-store benchmark: Flywheel (`flywheel-trainer materialize` / `build-dataset`, release build) side by side
# with stock Feast 0.67 (bench/feast_reference.py) on the same generated Parquet and the same Redis. Prints a
# table of materialization (events/s, Parquet → Redis) and point-in-time join (label rows/s). Not part of the
# test command (it installs Feast, ~0.6 GB once). Each system runs REPEAT times (default 9) and the medians are
# compared, because a single run of a few tens of milliseconds moves by ±20% on a shared 2-core machine. Every
# Flywheel run is a fresh process (Redis flushed, offline table removed), as a scheduled materialization Job is;
# Feast runs in a fresh process each time too, timed on its first call of each kind (cold, as a scheduled job
# runs it) and on a second call in the same process (warm), and both are shown.
# Usage: [REPEAT=N] scripts/bench-features.sh [EVENTS USERS LABELS]...
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"
cd "$repo"

step "Feast reference environment (cached in $FLYWHEEL_CACHE)"
python=$(scripts/install-feast-reference.sh)

step "release build"
cargo build --release --locked -p flywheel-trainer
trainer="$CARGO_TARGET_DIR/release/flywheel-trainer"

work=$(mktemp -d)
port=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')
redis-server --port "$port" --bind 127.0.0.1 --save '' --appendonly no >"$work/redis.log" 2>&1 &
redis_pid=$!
trap 'kill $redis_pid 2>/dev/null; rm -rf "$work"' EXIT
until redis-cli -p "$port" ping >/dev/null 2>&1; do sleep 0.1; done

# Seconds since $1 (an $EPOCHREALTIME), measured without starting another process.
elapsed() {
  local now=${EPOCHREALTIME/[.,]/} began=${1/[.,]/}
  printf '%d.%06d\n' $(((now - began) / 1000000)) $(((now - began) % 1000000))
}

repeat="${REPEAT:-9}"
# The median of the numbers on stdin.
median() { sort -g | awk '{v[NR] = $1} END {print (NR % 2) ? v[(NR + 1) / 2] : (v[NR / 2] + v[NR / 2 + 1]) / 2}'; }

sizes=("$@")
[[ ${#sizes[@]} -gt 0 ]] || sizes=("200000 5000 50000" "1000000 20000 200000")
printf '\nmedians of %s runs each\n' "$repeat"
printf '\n| events | users | labels | system | materialize s | events/s | PIT join s | label rows/s | rows out |\n'
printf '|---|---|---|---|---|---|---|---|---|\n'
for size in "${sizes[@]}"; do
  read -r events users labels <<<"$size"
  data="$work/data-$events"
  "$trainer" generate-events --events "$events" --users "$users" --labels "$labels" --out "$data" >/dev/null
  cat >"$work/view.json" <<JSON
{"apiVersion": "flywheel.dev/v1alpha1", "kind": "FeatureView", "metadata": {"name": "bench", "namespace": "bench"},
 "spec": {"entities": [{"name": "user", "joinKey": "user_id", "valueType": "Int64"}],
  "source": {"batch": {"uri": "file://$data/events.parquet", "timestampField": "event_timestamp"}},
  "features": [{"name": "price", "valueType": "Float64"}, {"name": "clicks", "valueType": "Int64"},
               {"name": "category", "valueType": "String"}],
  "ttl": "1d", "offline": {"uri": "file://$work/offline-$events"},
  "online": {"redis": {"address": "127.0.0.1:$port"}}}}
JSON
  materialize_runs=() pit_runs=()
  for ((run = 0; run < repeat; run++)); do
    redis-cli -p "$port" flushall >/dev/null
    rm -rf "$work/offline-$events"
    start=$EPOCHREALTIME
    "$trainer" materialize --view "$work/view.json" --termination-log "$work/term" >/dev/null
    materialize_runs+=("$(elapsed "$start")")
  done
  for ((run = 0; run < repeat; run++)); do
    start=$EPOCHREALTIME
    "$trainer" build-dataset --view "$work/view.json" --events "$data/labels.parquet" \
      --out "$work/train-$events.parquet" >"$work/ds.json"
    pit_runs+=("$(elapsed "$start")")
  done
  ours_m=$(printf '%s\n' "${materialize_runs[@]}" | median)
  ours_p=$(printf '%s\n' "${pit_runs[@]}" | median)
  ours_rows=$(python3 -c 'import json,sys; print(json.load(open(sys.argv[1]))["withFeatures"])' "$work/ds.json")
  feast_runs=()
  for ((run = 0; run < repeat; run++)); do
    feast=$(cd bench && "$python" feast_reference.py --events "$data/events.parquet" \
      --labels "$data/labels.parquet" --redis "127.0.0.1:$port" --workdir "$work/feast-$events" \
      --ttl-seconds 86400 --repeat 2 2>"$work/feast.log")
    [[ -n "$feast" ]] || { cat "$work/feast.log" >&2; exit 1; }
    feast_runs+=("$feast")
  done
  python3 - "$events" "$users" "$labels" "$ours_m" "$ours_p" "$ours_rows" "${feast_runs[@]}" <<'PY'
import json, statistics, sys
events, users, labels = map(int, sys.argv[1:4])
ours_m, ours_p, ours_rows = float(sys.argv[4]), float(sys.argv[5]), int(sys.argv[6])
feast = [json.loads(run) for run in sys.argv[7:]]
def median(kind, call):
    return statistics.median(run[kind][call] for run in feast)
cold = (median("materialize_runs", 0), median("pit_runs", 0))
warm = (median("materialize_runs", 1), median("pit_runs", 1))
rows = [("flywheel (process wall time)", ours_m, ours_p, ours_rows),
        ("feast 0.67, first call in its process", *cold, feast[0]["pit_rows"]),
        ("feast 0.67, second call (warm)", *warm, feast[0]["pit_rows"])]
for name, m, p, out in rows:
    print(f"| {events:,} | {users:,} | {labels:,} | {name} | {m:.3f} | {events / m:,.0f} | {p:.3f} | {labels / p:,.0f} | {out:,} |")
for name, (m, p) in (("first call", cold), ("warm call", warm)):
    print(f"| | | | **speed-up vs Feast's {name}** | | **{m / ours_m:.1f}×** | | **{p / ours_p:.1f}×** | |")
PY
done
