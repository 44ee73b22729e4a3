#!/usr/bin/env bash
# Builds Flywheel's three images — flywheel-operator, flywheel-trainer, flywheel-serving — tagged with the
# version, and pushes them when given a registry. No image registry is needed to build: the binaries are
# compiled once here and copied onto a base made from Debian packages (scripts/build-base-image.sh).
#
# usage: scripts/build-images.sh [REGISTRY] [--profile release|dev] [--binaries DIR]
#   REGISTRY    push to it (e.g. registry.example.com/ml); without it the images are only tagged locally as
#               ghcr.io/flywheel-dev/NAME:VERSION, the chart's default `image.registry`
#   --profile   the Cargo profile to compile (default release; the tests use dev, which they have built anyway)
#   --binaries  take the three binaries from DIR instead of compiling them
#
# Needs a Docker daemon and a client that builds with BuildKit (Docker 20.10+ with DOCKER_BUILDKIT=1, or
# buildx); set DOCKER to pick the client. Prints each image's size.
set -euo pipefail

repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
usage="usage: scripts/build-images.sh [REGISTRY] [--profile release|dev] [--binaries DIR]"
registry=""
profile=release
binaries_dir=""
while [[ $# -gt 0 ]]; do
  case "$1" in
    --profile) profile="${2:?$usage}"; shift 2 ;;
    --binaries) binaries_dir="${2:?$usage}"; shift 2 ;;
    -h|--help) echo "$usage"; exit 0 ;;
    -*) echo "$usage" >&2; exit 2 ;;
    *) registry="$1"; shift ;;
  esac
done
push=""
[[ -n "$registry" ]] && push=1
registry="${registry:-ghcr.io/flywheel-dev}"
registry="${registry%/}"

docker="${DOCKER:-docker}"
command -v "$docker" >/dev/null || { echo "no Docker client ($docker); install Docker or set DOCKER" >&2; exit 1; }
version="$(awk -F'"' '/^\[workspace.package\]/ {in_package = 1} in_package && /^version/ {print $2; exit}' \
  "$repo/Cargo.toml")"
cache="${FLYWHEEL_CACHE:-$HOME/.cache/flywheel}"
target="${CARGO_TARGET_DIR:-$repo/target}"
profile_dir="$profile"
[[ "$profile" == dev ]] && profile_dir=debug

base=flywheel-base:bookworm
DOCKER="$docker" "$repo/scripts/build-base-image.sh" "$base"

binaries=(flywheel-operator flywheel-trainer flywheel-serving)
if [[ -z "$binaries_dir" ]]; then
  (cd "$repo" && cargo build --locked --profile "$profile" -p flywheel-operator -p flywheel-trainer \
    -p flywheel-serving --bins)
  binaries_dir="$target/$profile_dir"
fi

# A build context with nothing but the binaries: the Dockerfiles' `prebuilt` stage copies them from it.
context="$cache/image-context/$$"
rm -rf "$context"
mkdir -p "$context"
for binary in "${binaries[@]}"; do
  cp "$binaries_dir/$binary" "$context/$binary"
done

declare -A dockerfile=(
  [flywheel-operator]=operator/Dockerfile
  [flywheel-trainer]=trainer-image/Dockerfile
  [flywheel-serving]=serving-image/Dockerfile
)
for binary in "${binaries[@]}"; do
  DOCKER_BUILDKIT=1 "$docker" build --quiet -f "$repo/${dockerfile[$binary]}" \
    --build-arg BINARY=prebuilt --build-arg "BASE=$base" \
    --label "org.opencontainers.image.version=$version" \
    -t "$registry/$binary:$version" "$context" >/dev/null
done
rm -rf "$context"
# Every build leaves its binaries' layers in BuildKit's cache; a machine that rebuilds all day fills its disk.
"$docker" builder prune --force --filter until=24h >/dev/null 2>&1 || true

printf '%-52s %10s\n' IMAGE SIZE
for binary in "${binaries[@]}"; do
  image="$registry/$binary:$version"
  size="$("$docker" image inspect --format '{{.Size}}' "$image")"
  printf '%-52s %8d MB\n' "$image" "$((size / 1000000))"
  [[ -n "$push" ]] && "$docker" push --quiet "$image" >/dev/null
done
[[ -n "$push" ]] && echo "pushed to $registry"
exit 0
