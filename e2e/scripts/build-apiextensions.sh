#!/usr/bin/env bash
# Builds the standalone apiextensions-apiserver of a current Kubernetes (the CRD server of Kubernetes 1.36:
# structural-schema checks, CEL compilation with Kubernetes' own libraries and cost budgets, validation of
# defaults, CEL evaluation on create and update) from Debian sid's Go source packages, and caches it. The local
# control plane is v1.20, which drops `x-kubernetes-validations`; this server is what checks our CEL rules.
# Nothing is installed system-wide: sid's packages are fetched with a private apt state and unpacked.
# Idempotent: returns at once when cached.
#
# Output: $FLYWHEEL_CACHE/apiextensions-apiserver/apiextensions-apiserver (and its version in `version`)
set -euo pipefail

cache="${FLYWHEEL_CACHE:-$HOME/.cache/flywheel}"
out="$cache/apiextensions-apiserver"
recipe="$(cat "${BASH_SOURCE[0]}" "$(dirname "${BASH_SOURCE[0]}")/sid-apt.sh" | sha256sum | cut -d' ' -f1)"
if [[ -x "$out/apiextensions-apiserver" && "$(cat "$out/recipe" 2>/dev/null)" == "$recipe" ]]; then
  exit 0
fi

work="$cache/apiextensions-build"
rm -rf "$work"
mkdir -p "$work"/{debs,root} "$out"
source "$(dirname "${BASH_SOURCE[0]}")/sid-apt.sh"
sid_apt_setup "$work"
apt_opts=("${sid_apt[@]}")

# The Go sources the server imports, and the Go sid builds them with.
go_version="$(apt-cache "${apt_opts[@]}" depends golang-go | awk '/Depends: golang-1\.[0-9]+-go/ {print $2; exit}')"
go_version="${go_version%-go}"
[[ -n "$go_version" ]] || { echo "no golang-1.N-go in sid's golang-go" >&2; exit 1; }
mapfile -t packages < <(apt-cache "${apt_opts[@]}" depends --recurse --no-recommends --no-suggests \
  --no-conflicts --no-breaks --no-replaces --no-enhances golang-k8s-apiextensions-apiserver-dev \
  | grep -E '^golang-[^ ]*-dev$' | LC_ALL=C sort -u)
packages+=("$go_version-go" "$go_version-src")
(cd "$work/debs" && apt-get "${apt_opts[@]}" -qq download "${packages[@]}" >/dev/null)
for deb in "$work"/debs/*.deb; do dpkg-deb -x "$deb" "$work/root"; done

version="$(dpkg-deb -f "$(ls "$work"/debs/golang-k8s-apiextensions-apiserver-dev_*.deb)" Version)"
root="$work/root"
export GOROOT="$root/usr/lib/go-${go_version#golang-}" GOPATH="$root/usr/share/gocode" GO111MODULE=off CGO_ENABLED=0 \
  GOPROXY=off GOFLAGS= GOTOOLCHAIN=local GOCACHE="$cache/go-build-cache-apiextensions"
cd "$GOPATH/src/k8s.io/apiextensions-apiserver"
"$GOROOT/bin/go" build -ldflags "-s -w" -o "$out/apiextensions-apiserver.tmp" .
mv "$out/apiextensions-apiserver.tmp" "$out/apiextensions-apiserver"
echo "$version" >"$out/version"
echo "$recipe" >"$out/recipe"
cd /
rm -rf "$work"
echo "built apiextensions-apiserver $version into $out"
