#!/usr/bin/env bash
# Fetches Prometheus and promtool from Debian sid (3.x) into the cache: bookworm's Prometheus 2.42 is built
# without Kubernetes service discovery, sid's has it again (it needs only glibc, so it runs here). Nothing is
# installed system-wide. Idempotent: returns at once when cached.
#
# Output: $FLYWHEEL_CACHE/prometheus-sid/{prometheus,promtool,version}
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
cache="${FLYWHEEL_CACHE:-$HOME/.cache/flywheel}"
out="$cache/prometheus-sid"
recipe="$(cat "${BASH_SOURCE[0]}" "$here/sid-apt.sh" | sha256sum | cut -d' ' -f1)"
if [[ -x "$out/prometheus" && -x "$out/promtool" && "$(cat "$out/recipe" 2>/dev/null)" == "$recipe" ]]; then
  exit 0
fi

work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT
source "$here/sid-apt.sh"
sid_apt_setup "$work"
mkdir -p "$work/debs" "$work/root" "$out"
(cd "$work/debs" && apt-get "${sid_apt[@]}" -qq download prometheus promtool >/dev/null)
for deb in "$work"/debs/*.deb; do dpkg-deb -x "$deb" "$work/root"; done
for binary in prometheus promtool; do
  cp "$work/root/usr/bin/$binary" "$out/$binary.tmp"
  mv "$out/$binary.tmp" "$out/$binary"
done
"$out/prometheus" --version 2>&1 | awk 'NR == 1 {print $3}' >"$out/version"
echo "$recipe" >"$out/recipe"
echo "fetched Prometheus $(cat "$out/version") into $out"
