#!/usr/bin/env bash
# Record the release a rollout of this tree meets: its commit and its worker and operator packages, in
# tests/dataplane/previous_release/, so the rollout tests need no git history (CI clones shallow).
# Usage, when cutting a release: scripts/previous-release.sh COMMIT
set -euo pipefail
cd "$(dirname "$0")/.."
commit=$(git rev-parse --verify "${1:?usage: scripts/previous-release.sh COMMIT}^{commit}")
out=tests/dataplane/previous_release
packages=()  # the release's Python packages (contract/ from 0.2 on)
for dir in contract operator workers; do
  git cat-file -e "$commit:$dir" 2>/dev/null && packages+=("$dir")
done
git archive --format=tar "$commit" "${packages[@]}" | gzip -9n > "$out/packages.tar.gz"
echo "$commit" > "$out/commit"
# the module its `mmgraph` command runs: how its image's entrypoint and the rollout tests start it
if [[ " ${packages[*]} " == *" contract "* ]]; then echo mmgraph_contract.cli; else echo mmgraph_operator.cli; fi > "$out/entry"
echo "previous release: $commit ($(du -h "$out/packages.tar.gz" | cut -f1))"
