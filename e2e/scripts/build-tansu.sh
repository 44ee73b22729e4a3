#!/usr/bin/env bash
# Builds `tansu`, a Kafka-protocol broker from the crates registry (no registry here ships Apache Kafka), into
# $FLYWHEEL_CACHE/tansu/bin. Its own target dir keeps it out of the workspace's; ≈ 10 min once, then cached.
# `libsql` gives it a storage that outlives the process (SQLite), so SASL users made before authentication is
# switched on are still there after.
set -euo pipefail
cache="${FLYWHEEL_CACHE:-$HOME/.cache/flywheel}"
version=0.6.0
features=dynostore,libsql
bin="$cache/tansu/bin/tansu"
stamp="$cache/tansu/features"
if [[ -x $bin ]] && [[ $("$bin" --version 2>/dev/null) == *"$version"* ]] &&
  [[ "$(cat "$stamp" 2>/dev/null)" == "$features" ]]; then
  exit 0
fi
CARGO_TARGET_DIR="$cache/tansu-target" cargo install tansu --version "$version" --locked \
  --features "$features" --root "$cache/tansu" --quiet --force
echo "$features" >"$stamp"
