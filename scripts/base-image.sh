#!/usr/bin/env bash
# A Debian bookworm base image made from Debian's own packages, for machines that reach no image registry: what
# Dockerfile.operator and Dockerfile.worker-cpu take as BASE (Python 3.11, venv, libsndfile for librosa, CA
# certificates). Idempotent: an image of that name already there is kept.
# Usage: ENGINE=podman scripts/base-image.sh NAME
set -euo pipefail
NAME=${1:?usage: base-image.sh NAME}
ENGINE=${ENGINE:-podman}
if $ENGINE image exists "$NAME" 2>/dev/null; then echo "$NAME"; exit 0; fi
SUDO=""; [[ $(id -u) -eq 0 ]] || SUDO="sudo"
dpkg -s mmdebstrap >/dev/null 2>&1 || DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq mmdebstrap >&2
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
$SUDO mmdebstrap --quiet --variant=minbase --mode=root \
  --include=python3,python3-venv,ca-certificates,libsndfile1 bookworm "$work/rootfs.tar" >&2
$ENGINE import "$work/rootfs.tar" "$NAME" >&2
echo "$NAME"
