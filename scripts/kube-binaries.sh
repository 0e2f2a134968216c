#!/usr/bin/env bash
# Builds Kubernetes 1.20.2 from Debian's source package, offline, once: kube-apiserver and kube-controller-manager
# (the control plane of every integration test), and kubelet, kube-scheduler, kube-proxy and the pause container's
# static binary (the real node, tests/kubenode.py).
# Why: no reachable registry ships them (see docs/testing.md).
# Idempotent: prints the cache directory and exits at once when the binaries are already there; builds only the
# ones missing from the cache (a cache from before the node has the first two).
set -euo pipefail
CACHE="${MMGRAPH_CACHE:-$HOME/.cache/mmgraph}/kube-1.20.2"
BINARIES=(kube-apiserver kube-controller-manager kubelet kube-scheduler kube-proxy)
missing=()
for b in "${BINARIES[@]}"; do [[ -x "$CACHE/$b" ]] || missing+=("$b"); done
if ((${#missing[@]} == 0)) && [[ -x "$CACHE/pause" ]]; then
  echo "$CACHE"; exit 0
fi
SUDO=""; [[ $(id -u) -eq 0 ]] || SUDO="sudo"
need=()
for p in golang-go rsync jq etcd-server golang-github-modern-go-reflect2-dev openssl dpkg-dev make gcc libc6-dev; do
  dpkg -s "$p" >/dev/null 2>&1 || need+=("$p")
done
if ((${#need[@]})); then
  $SUDO apt-get update -qq >&2
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq "${need[@]}" >&2
fi
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
# A private apt configuration that knows the machine's own Debian entries as deb-src (no host file is written).
mkdir -p "$work/apt/lists/partial"
sed 's/^Types: deb$/Types: deb-src/' /etc/apt/sources.list.d/debian.sources > "$work/apt/src.sources"
opts=(-o "Dir::Etc::sourcelist=-" -o "Dir::Etc::sourceparts=$work/apt" -o "Dir::State::Lists=$work/apt/lists")
mv "$work/apt/src.sources" "$work/apt/debian-src.sources"
apt-get "${opts[@]}" update -qq >&2
(cd "$work" && apt-get "${opts[@]}" source --download-only kubernetes >&2)
(cd "$work" && dpkg-source -x --no-check kubernetes_*.dsc src >&2)
# The vendored reflect2 1.0.1 crashes the apiserver on Go 1.19 at the first custom-resource write.
rm -rf "$work/src/vendor/github.com/modern-go/reflect2"
cp -r /usr/share/gocode/src/github.com/modern-go/reflect2 "$work/src/vendor/github.com/modern-go/reflect2"
sed -i 's|^# github.com/modern-go/reflect2 v1.0.1|# github.com/modern-go/reflect2 v1.0.2|; s|github.com/modern-go/reflect2 v1.0.1|github.com/modern-go/reflect2 v1.0.2|' "$work/src/vendor/modules.txt" "$work/src/go.mod" || true
mkdir -p "$CACHE"
if ((${#missing[@]})); then
  (cd "$work/src" && GOFLAGS=-mod=vendor GOCACHE="$work/gocache" make WHAT="${missing[*]/#/cmd/}" >&2)
  for b in "${missing[@]}"; do cp "$work/src/_output/bin/$b" "$CACHE/"; done
fi
# The pod sandbox's process: the source's own pause.c, static (no registry holds the pause image; FACTS.md).
gcc -Os -static -DVERSION=v3.4.1-mmgraph -o "$CACHE/pause" "$work/src/build/pause/linux/pause.c"
echo "$CACHE"
