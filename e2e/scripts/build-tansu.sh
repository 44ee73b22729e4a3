#!/usr/bin/env bash
# Builds `tansu`, a Kafka-protocol broker from the crates registry (no registry here ships Apache Kafka), into
# $FLYWHEEL_CACHE/tansu/bin. Its own target dir keeps it out of the workspace's; ≈ 10 min once, then cached.
set -euo pipefail
cache="${FLYWHEEL_CACHE:-$HOME/.cache/flywheel}"
version=0.6.0
bin="$cache/tansu/bin/tansu"
if [[ -x $bin ]] && [[ $("$bin" --version 2>/dev/null) == *"$version"* ]]; then
  exit 0
fi
CARGO_TARGET_DIR="$cache/tansu-target" cargo install tansu --version "$version" --locked \
  --features dynostore --root "$cache/tansu" --quiet
