#!/usr/bin/env bash
# Builds the control plane (kube-apiserver, kube-controller-manager, kubectl), the node (kubelet with its
# built-in dockershim, kube-scheduler, kube-proxy) and the pause container's binary, v1.20.2, from Debian's
# `kubernetes` source package (no registry ships these binaries) and caches them. Idempotent: returns at once
# when cached.
#
# Output: $FLYWHEEL_CACHE/kube-v1.20.2/{kube-apiserver,kube-controller-manager,kubectl,kubelet,kube-scheduler,
#         kube-proxy,pause}
set -euo pipefail

cache="${FLYWHEEL_CACHE:-$HOME/.cache/flywheel}"
out="$cache/kube-v1.20.2"
# The cached binaries are reused only if this very script built them.
recipe="$(sha256sum "${BASH_SOURCE[0]}" | cut -d' ' -f1)"
commands=(kube-apiserver kube-controller-manager kubectl kubelet kube-scheduler kube-proxy)
cached=1
for cmd in "${commands[@]}" pause; do [[ -x "$out/$cmd" ]] || cached=""; done
if [[ -n "$cached" && "$(cat "$out/recipe" 2>/dev/null)" == "$recipe" ]]; then
  exit 0
fi

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
"$here/install-system-deps.sh"

work="$cache/kube-build"
rm -rf "$work"
mkdir -p "$work/src" "$out"
cd "$work/src"

# apt-get source needs a deb-src entry mirroring the system's deb entry.
if ! grep -rqs '^Types:.*deb-src' /etc/apt/sources.list.d/ && ! grep -qs '^deb-src' /etc/apt/sources.list; then
  if [[ -f /etc/apt/sources.list.d/debian.sources ]]; then
    sed 's/^Types: deb$/Types: deb-src/' /etc/apt/sources.list.d/debian.sources \
      >/etc/apt/sources.list.d/flywheel-deb-src.sources
  else
    grep '^deb ' /etc/apt/sources.list | sed 's/^deb /deb-src /' >/etc/apt/sources.list.d/flywheel-deb-src.list
  fi
  apt-get update -qq
fi
apt-get source --download-only -qq kubernetes
tar -xf kubernetes_*.orig.tar.* 
tree="$(find . -maxdepth 1 -mindepth 1 -type d | head -n1)"

# GOPATH mode, as upstream's hack/lib/init.sh does for 1.20 (module mode wants go.mod updates).
export GOPATH="$work/gopath" GO111MODULE=off CGO_ENABLED=0 GOPROXY=off GOFLAGS= GOCACHE="$cache/go-build-cache"
mkdir -p "$GOPATH/src/k8s.io"
ln -s "$work/src/$tree" "$GOPATH/src/k8s.io/kubernetes"
cd "$GOPATH/src/k8s.io/kubernetes"

# vendored reflect2 v1.0.1 panics under Go >= 1.18 on every CRD create; Debian ships 1.0.2.
rm -rf vendor/github.com/modern-go/reflect2
mkdir -p vendor/github.com/modern-go/reflect2
cp /usr/share/gocode/src/github.com/modern-go/reflect2/*.go /usr/share/gocode/src/github.com/modern-go/reflect2/*.s \
  vendor/github.com/modern-go/reflect2/ 2>/dev/null || \
  cp /usr/share/gocode/src/github.com/modern-go/reflect2/*.go vendor/github.com/modern-go/reflect2/
rm -f vendor/github.com/modern-go/reflect2/*_test.go

# The tarball lacks the generated OpenAPI definitions; generate them as upstream's Makefile does.
go build -o "$work/openapi-gen" ./vendor/k8s.io/kube-openapi/cmd/openapi-gen
dirs="$(grep -rl --include='*.go' '+k8s:openapi-gen=' pkg cmd staging/src 2>/dev/null \
  | grep -v '_test.go$' | xargs -n1 dirname | LC_ALL=C sort -u \
  | sed 's|^staging/src/|vendor/|' | grep -v -e code-generator -e sample-apiserver \
  | sed 's|^|k8s.io/kubernetes/|' | paste -sd, -)"
"$work/openapi-gen" --input-dirs "$dirs" \
  -p k8s.io/kubernetes/pkg/generated/openapi -O zz_generated.openapi \
  -h vendor/k8s.io/code-generator/hack/boilerplate.go.txt \
  -r /dev/null

# This machine's containers may not lower their OOM score (no CAP_SYS_RESOURCE), and runc fails any container
# asked to: dockershim gives pod sandboxes -998 and Guaranteed containers -997. Keep both at 0.
sed -i 's/defaultSandboxOOMAdj int = -998/defaultSandboxOOMAdj int = 0/' pkg/kubelet/dockershim/docker_sandbox.go
sed -i 's/guaranteedOOMScoreAdj int = -997/guaranteedOOMScoreAdj int = 0/' pkg/kubelet/qos/policy.go
grep -q 'defaultSandboxOOMAdj int = 0' pkg/kubelet/dockershim/docker_sandbox.go
grep -q 'guaranteedOOMScoreAdj int = 0' pkg/kubelet/qos/policy.go

# The pod sandbox's process, as upstream's build/pause does.
gcc -Os -static -Wall -Werror -DVERSION=v3.2-flywheel -o "$out/pause.tmp" build/pause/linux/pause.c
mv "$out/pause.tmp" "$out/pause"

# Both version packages, as upstream's hack/lib/version.sh does: the API server reports client-go's.
ldflags="-s -w"
for pkg in k8s.io/kubernetes/vendor/k8s.io/component-base/version k8s.io/kubernetes/vendor/k8s.io/client-go/pkg/version; do
  ldflags+=" -X $pkg.gitVersion=v1.20.2 -X $pkg.gitMajor=1 -X $pkg.gitMinor=20 -X $pkg.gitTreeState=clean"
done
for cmd in "${commands[@]}"; do
  go build -tags selinux,notest -ldflags "$ldflags" -o "$out/$cmd.tmp" "./cmd/$cmd"
  mv "$out/$cmd.tmp" "$out/$cmd"
done

echo "$recipe" >"$out/recipe"
cd /
rm -rf "$work"
echo "built kube v1.20.2 into $out"
