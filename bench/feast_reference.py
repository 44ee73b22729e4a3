"""Feast reference of Flywheel's feature store, for benchmarks only.

Runs stock Feast (the venv from scripts/install-feast-reference.sh) on the same inputs Flywheel's feature-store
bench writes: an events Parquet (`user_id` int64, `event_timestamp` timestamp[us, UTC], `price` float64,
`clicks` int64, `category` string) and a labels Parquet (`user_id`, `event_timestamp`, `label`). Writes a Feast
repo into --workdir (local provider, file registry, file/Dask offline store, Redis online store), applies an
Entity `user` and a FeatureView `user_features` over the events through the Python SDK, then times

- a cold materialization of all events into Redis (the Redis DB is flushed first); materialize_rows is the
  number of entity keys Feast wrote there (one hash per user), and
- a point-in-time join of the labels against the offline store (`get_historical_features(...).to_df()`).

Semantics of Feast's file (Dask) offline store, as observed with feast 0.67.0: a label row gets the latest event
with label_ts - ttl <= event_ts <= label_ts (both ends inclusive), and a label row with no such event is DROPPED
from the result (kept, with nulls, only when its user has no events at all), so pit_rows counts matched label rows,
not all of them. Materialization ignores the ttl: every user's latest event in the window is written.

With --repeat N each call is made N times in this process (Redis flushed before each materialization): the
first call is cold, as in a scheduled job's fresh process, the later ones warm. Prints one JSON line on stdout:
materialize_rows, materialize_runs (seconds of each call), pit_rows, pit_runs. Everything else (Feast's prints,
progress bars, warnings) goes to stderr.
"""

import argparse
import json
import logging
import os
import shutil
import sys
import time
import warnings
from datetime import timedelta
from pathlib import Path

PROJECT = "flywheel_bench"
FEATURES = ["user_features:price", "user_features:clicks", "user_features:category"]


def parse_args():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--events", required=True, help="events Parquet (user_id, event_timestamp, price, clicks, category)")
    parser.add_argument("--labels", required=True, help="labels Parquet (user_id, event_timestamp, label)")
    parser.add_argument("--redis", required=True, help="Redis HOST:PORT (its DB 0 is flushed)")
    parser.add_argument("--workdir", required=True, help="directory for the generated Feast repo")
    parser.add_argument("--ttl-seconds", type=int, default=86400, help="FeatureView ttl (default 86400)")
    parser.add_argument("--repeat", type=int, default=1, help="timed calls of each kind in this process")
    return parser.parse_args()


def write_repo(workdir, redis_addr):
    """A fresh feature_store.yaml (and no stale registry) in workdir."""
    workdir.mkdir(parents=True, exist_ok=True)
    shutil.rmtree(workdir / "data", ignore_errors=True)
    (workdir / "data").mkdir()
    (workdir / "feature_store.yaml").write_text(
        f"""project: {PROJECT}
provider: local
registry: data/registry.db
offline_store:
  type: file
online_store:
  type: redis
  connection_string: "{redis_addr},db=0"
entity_key_serialization_version: 3
"""
    )


def main():
    args = parse_args()
    # Feast prints to stdout (materialization banners) and libraries may write to fd 1 directly: point fd 1 at
    # stderr for the whole run and keep the real stdout for the one JSON line.
    json_out = os.fdopen(os.dup(1), "w")
    sys.stdout.flush()
    os.dup2(2, 1)
    warnings.simplefilter("ignore")
    logging.basicConfig(stream=sys.stderr, level=logging.WARNING)

    import pyarrow.compute as pc
    import pyarrow.parquet as pq
    import redis
    from feast import Entity, FeatureStore, FeatureView, Field, FileSource
    from feast.types import Float64, Int64, String
    from feast.value_type import ValueType

    events_path = str(Path(args.events).resolve())
    workdir = Path(args.workdir).resolve()
    write_repo(workdir, args.redis)

    user = Entity(name="user", join_keys=["user_id"], value_type=ValueType.INT64)
    source = FileSource(name="user_events", path=events_path, timestamp_field="event_timestamp")
    user_features = FeatureView(
        name="user_features",
        entities=[user],
        ttl=timedelta(seconds=args.ttl_seconds),
        schema=[Field(name="price", dtype=Float64), Field(name="clicks", dtype=Int64), Field(name="category", dtype=String)],
        source=source,
        online=True,
    )
    store = FeatureStore(repo_path=str(workdir))
    store.apply([user, source, user_features])

    # Materialization window: every event (Feast's file store filters start <= ts <= end, both inclusive).
    timestamps = pq.read_table(events_path, columns=["event_timestamp"])["event_timestamp"]
    bounds = pc.min_max(timestamps)
    start = bounds["min"].as_py() - timedelta(seconds=1)
    end = bounds["max"].as_py() + timedelta(seconds=1)

    host, port = args.redis.rsplit(":", 1)
    client = redis.Redis(host=host, port=int(port), db=0)
    materialize_runs = []
    for _ in range(args.repeat):
        client.flushdb()
        began = time.perf_counter()
        store.materialize(start_date=start, end_date=end, feature_views=["user_features"])
        materialize_runs.append(time.perf_counter() - began)
    # Feast's Redis layout: one hash per entity, key = serialized entity key followed by the project name.
    materialize_rows = sum(1 for _ in client.scan_iter(match=f"*{PROJECT}", count=10000))

    entity_df = pq.read_table(args.labels).to_pandas()
    pit_runs = []
    for _ in range(args.repeat):
        began = time.perf_counter()
        result = store.get_historical_features(entity_df=entity_df, features=FEATURES).to_df()
        pit_runs.append(time.perf_counter() - began)

    json_out.write(
        json.dumps(
            {
                "materialize_rows": materialize_rows,
                "materialize_runs": [round(t, 6) for t in materialize_runs],
                "pit_rows": len(result),
                "pit_runs": [round(t, 6) for t in pit_runs],
            }
        )
        + "\n"
    )
    json_out.flush()


if __name__ == "__main__":
    main()
