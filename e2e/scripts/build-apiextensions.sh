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
recipe="$(sha256sum "${BASH_SOURCE[0]}" | cut -d' ' -f1)"
if [[ -x "$out/apiextensions-apiserver" && "$(cat "$out/recipe" 2>/dev/null)" == "$recipe" ]]; then
  exit 0
fi

work="$cache/apiextensions-build"
rm -rf "$work"
mkdir -p "$work"/{apt/lists/partial,apt/cache/archives/partial,debs,root} "$out"

# sid from the same mirror as the machine's own Debian entry.
mirror=""
if [[ -f /etc/apt/sources.list.d/debian.sources ]]; then
  mirror="$(awk '/^URIs:/ {print $2; exit}' /etc/apt/sources.list.d/debian.sources)"
fi
if [[ -z "$mirror" ]]; then
  mirror="$(awk '$1 == "deb" && $0 !~ /security/ {for (i = 2; i <= NF; i++) if ($i ~ /^[a-z]+:\/\//) {print $i; exit}}' \
    /etc/apt/sources.list 2>/dev/null || true)"
fi
[[ -n "$mirror" ]] || { echo "no Debian mirror found in the apt sources" >&2; exit 1; }
echo "deb [signed-by=/usr/share/keyrings/debian-archive-keyring.gpg] $mirror sid main" >"$work/apt/sources.list"
: >"$work/apt/status"
apt_opts=(-o "Dir::Etc::sourcelist=$work/apt/sources.list" -o Dir::Etc::sourceparts=/dev/null
  -o "Dir::State::Lists=$work/apt/lists" -o "Dir::Cache=$work/apt/cache" -o "Dir::State::status=$work/apt/status"
  -o APT::Architecture=amd64 -o Debug::NoLocking=1 -o APT::Sandbox::User=root)
apt-get "${apt_opts[@]}" -qq update

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
