#!/usr/bin/env bash
# Builds ghz (the gRPC load generator) from the Go module proxy once and caches it; prints its
# path. Used by scripts/bench.sh to measure one branch's customer API with an external tool.
set -euo pipefail
version=${GHZ_VERSION:-v0.121.0}
tools="${XDG_CACHE_HOME:-$HOME/.cache}/distbank-tools"
bin="$tools/ghz-$version/ghz"
if [[ ! -x $bin ]]; then
  command -v go >/dev/null || { echo "ghz: no Go toolchain; install Go to build ghz $version" >&2; exit 1; }
  echo "building ghz $version from the Go module proxy (cached in $tools)" >&2
  GOBIN="$tools/ghz-$version" nice go install "github.com/bojand/ghz/cmd/ghz@$version" >&2
fi
echo "$bin"
