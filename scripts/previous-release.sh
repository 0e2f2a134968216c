#!/usr/bin/env bash
# Record the release a rollout of this tree meets: its commit and its worker and operator packages, in
# tests/dataplane/previous_release/, so the rollout tests need no git history (CI clones shallow).
# Usage, when cutting a release: scripts/previous-release.sh COMMIT
set -euo pipefail
cd "$(dirname "$0")/.."
commit=$(git rev-parse --verify "${1:?usage: scripts/previous-release.sh COMMIT}^{commit}")
out=tests/dataplane/previous_release
git archive --format=tar "$commit" workers operator | gzip -9n > "$out/packages.tar.gz"
echo "$commit" > "$out/commit"
echo "previous release: $commit ($(du -h "$out/packages.tar.gz" | cut -f1))"
