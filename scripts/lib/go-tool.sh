# Shared by scripts/ghz.sh and scripts/grpcurl-check.sh: a Go program built once from the Go
# module proxy (`go install module/cmd/x@version`) and cached under
# ${DISTBANK_TOOLS_DIR:-${XDG_CACHE_HOME:-~/.cache}/distbank-tools}/NAME-VERSION/.
# shellcheck shell=bash

# go_tool NAME PACKAGE VERSION: prints the binary's path, building it first if needed; returns
# 1 (printing nothing) when it is not built and Go is not installed.
go_tool() {
  local name=$1 package=$2 version=$3
  local dir="${DISTBANK_TOOLS_DIR:-${XDG_CACHE_HOME:-$HOME/.cache}/distbank-tools}/$name-$version"
  if [[ ! -x "$dir/$name" ]]; then
    command -v go >/dev/null 2>&1 || return 1
    echo "building $name $version from the Go module proxy into $dir (once)" >&2
    GOBIN="$dir" nice go install "$package@$version" >&2
  fi
  echo "$dir/$name"
}
