#!/usr/bin/env bash
# Fails when k8s/ is not what scripts/render-k8s.sh renders from the chart now:
#   1. re-renders into k8s/ (so a failing run leaves the fix in the work tree),
#   2. `git diff --exit-code -- k8s/` (changed or deleted files) and no untracked files in k8s/.
# Outside a git work tree it compares against a fresh render in a temporary directory instead.
#
# Usage: scripts/check-k8s-drift.sh      (env HELM as for render-k8s.sh)
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"

if ! git rev-parse --is-inside-work-tree >/dev/null 2>&1; then
  tmp="$(mktemp -d "${TMPDIR:-/tmp}/distbank-drift.XXXXXX")"
  trap 'rm -rf "$tmp"' EXIT
  scripts/render-k8s.sh "$tmp/k8s"
  if ! diff -ru k8s "$tmp/k8s"; then
    echo "check-k8s-drift: k8s/ differs from the chart: run scripts/render-k8s.sh" >&2
    exit 1
  fi
  echo "check-k8s-drift: k8s/ is up to date (no git: compared with a fresh render)" >&2
  exit 0
fi

scripts/render-k8s.sh
status=0
if ! git --no-pager diff --exit-code --stat -- k8s/; then
  git --no-pager diff -- k8s/ | head -n 200
  echo "check-k8s-drift: k8s/ was stale; it has been re-rendered: review and commit it" >&2
  status=1
fi
untracked="$(git ls-files --others --exclude-standard -- k8s/)"
if [[ -n "$untracked" ]]; then
  echo "check-k8s-drift: files in k8s/ not tracked by git (git add them):" >&2
  while IFS= read -r f; do printf '  %s\n' "$f"; done <<<"$untracked" >&2
  status=1
fi
[[ $status -eq 0 ]] && echo "check-k8s-drift: k8s/ is up to date" >&2
exit "$status"
