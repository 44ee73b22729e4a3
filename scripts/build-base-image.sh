#!/usr/bin/env bash
# Makes the runtime base of Flywheel's images from Debian packages, without any image registry: the few
# packages a distroless-like base needs (glibc, libgcc, OpenSSL for librdkafka's TLS, CA certificates, time
# zones, netbase) unpacked with dpkg-deb, a `nonroot` user (65532) and an empty /tmp, imported into Docker.
# Idempotent: a base made by this very script is kept.
#
# usage: scripts/build-base-image.sh [IMAGE]      (default flywheel-base:bookworm)
set -euo pipefail

image="${1:-flywheel-base:bookworm}"
docker="${DOCKER:-docker}"
recipe="$(sha256sum "${BASH_SOURCE[0]}" | cut -c1-16)"
if [[ "$("$docker" image inspect --format '{{index .Config.Labels "dev.flywheel.recipe"}}' "$image" 2>/dev/null)" == "$recipe" ]]; then
  exit 0
fi

work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT
mkdir -p "$work/debs" "$work/root"
packages=(libc6 libgcc-s1 libssl3 ca-certificates tzdata netbase)
if ! (cd "$work/debs" && apt-get download -qq -o APT::Sandbox::User=root "${packages[@]}" 2>/dev/null); then
  apt-get update -qq
  (cd "$work/debs" && apt-get download -qq -o APT::Sandbox::User=root "${packages[@]}")
fi
for deb in "$work"/debs/*.deb; do dpkg-deb -x "$deb" "$work/root"; done

root="$work/root"
# dpkg-deb runs no maintainer scripts: make what they would have made.
mkdir -p "$root/etc/ssl/certs" "$root/tmp" "$root/home/nonroot"
find "$root/usr/share/ca-certificates" -name '*.crt' -print0 | LC_ALL=C sort -z | xargs -0 cat \
  >"$root/etc/ssl/certs/ca-certificates.crt"
chmod 1777 "$root/tmp"
chown 65532:65532 "$root/home/nonroot"
cat >"$root/etc/passwd" <<'PASSWD'
root:x:0:0:root:/root:/sbin/nologin
nobody:x:65534:65534:nobody:/nonexistent:/sbin/nologin
nonroot:x:65532:65532:nonroot:/home/nonroot:/sbin/nologin
PASSWD
cat >"$root/etc/group" <<'GROUP'
root:x:0:
nogroup:x:65534:
nonroot:x:65532:
GROUP
ln -sf /usr/share/zoneinfo/Etc/UTC "$root/etc/localtime"
# Documentation and translations are not needed at run time.
rm -rf "$root/usr/share/doc" "$root/usr/share/man" "$root/usr/share/locale" "$root/usr/share/lintian"

tar -C "$root" -c . | "$docker" import \
  --change "LABEL dev.flywheel.recipe=$recipe" \
  --change "ENV PATH=/usr/local/bin:/usr/bin:/bin SSL_CERT_FILE=/etc/ssl/certs/ca-certificates.crt" \
  - "$image" >/dev/null
echo "made $image ($("$docker" image inspect --format '{{.Size}}' "$image") bytes)"
