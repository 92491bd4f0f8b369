#!/usr/bin/env bash
# Builds ghz (the gRPC load generator) from the Go module proxy once and caches it; prints its
# path. Used by scripts/bench.sh to measure one branch's customer API with an external tool.
set -euo pipefail
# shellcheck source=lib/go-tool.sh
source "$(dirname "${BASH_SOURCE[0]}")/lib/go-tool.sh"
version=${GHZ_VERSION:-v0.121.0}
go_tool ghz github.com/bojand/ghz/cmd/ghz "$version" ||
  { echo "ghz: no Go toolchain; install Go to build ghz $version" >&2; exit 1; }
