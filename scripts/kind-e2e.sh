#!/usr/bin/env bash
# The whole local-cluster flow on kind, end to end:
#   1. create a kind cluster (kubelet maxPods raised so 100 branches fit on one node),
#   2. build the image (docker build, or podman + scripts/build-image.sh),
#   3. kind load it (fixed tag + IfNotPresent, so the loaded image is used),
#   4. helm upgrade --install the chart with the course input, in a namespace that enforces the
#      "restricted" Pod Security Standard,
#   5. wait for the branches and for the replay Job, run `helm test`,
#   6. fetch output.json from the ConfigMap <release>-output and compare it with the expected one.
#
# Needs: kind, kubectl, helm (3.8+ or 4), python3, and docker (or podman with
# CONTAINER_TOOL=podman; kind then runs with KIND_EXPERIMENTAL_PROVIDER=podman).
#
# Usage: scripts/kind-e2e.sh [options]
#   --input FILE       input.json   (default tests/fixtures/course_50_input.json, the course grader input)
#   --expected FILE    expected output.json (default: the matching *_output.json; "none" to skip)
#   --cluster NAME     kind cluster name (default distbank; reused if it exists)
#   --namespace NS     namespace (default distbank)
#   --release NAME     Helm release (default distbank)
#   --image IMAGE      image (default distbank:0.1.0)
#   --skip-build       use an image that is already built locally
#   --output FILE      where to write the fetched output.json (default ./output.json)
#   --delete-cluster   delete the kind cluster at the end (default: keep it for inspection)
#   --timeout SECONDS  budget for each wait (default 900)
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
INPUT="$ROOT/tests/fixtures/course_50_input.json"
EXPECTED=""
CLUSTER="distbank"
NAMESPACE="distbank"
RELEASE="distbank"
IMAGE="distbank:0.1.0"
OUTPUT="$PWD/output.json"
BUILD=1
DELETE=0
TIMEOUT=900
CONTAINER_TOOL="${CONTAINER_TOOL:-docker}"

log() { printf '\n[kind-e2e] %s\n' "$*" >&2; }
abspath() { case "$1" in /*) printf '%s\n' "$1" ;; *) printf '%s/%s\n' "$PWD" "$1" ;; esac; }
die() { printf '[kind-e2e] ERROR: %s\n' "$*" >&2; exit 1; }

while [[ $# -gt 0 ]]; do
  case "$1" in
    --input) INPUT="$(abspath "${2:?--input needs a file}")"; shift ;;
    --expected) EXPECTED="${2:?--expected needs a file or none}"; [[ "$EXPECTED" == none ]] || EXPECTED="$(abspath "$EXPECTED")"; shift ;;
    --cluster) CLUSTER="${2:?}"; shift ;;
    --namespace) NAMESPACE="${2:?}"; shift ;;
    --release) RELEASE="${2:?}"; shift ;;
    --image) IMAGE="${2:?}"; shift ;;
    --output) OUTPUT="$(abspath "${2:?}")"; shift ;;
    --skip-build) BUILD=0 ;;
    --delete-cluster) DELETE=1 ;;
    --timeout) TIMEOUT="${2:?}"; shift ;;
    -h|--help) sed -n '2,/^set -euo pipefail/{/^set -euo/d;s/^# \{0,1\}//;p;}' "$0"; exit 0 ;;
    *) die "unknown argument: $1 (see --help)" ;;
  esac
  shift
done

[[ -f "$INPUT" ]] || die "no input file $INPUT"
if [[ -z "$EXPECTED" ]]; then
  EXPECTED="${INPUT%_input.json}_output.json"
  [[ "$EXPECTED" != "$INPUT" && -f "$EXPECTED" ]] || EXPECTED="none"
fi
[[ "$EXPECTED" == none || -f "$EXPECTED" ]] || die "no expected output file $EXPECTED"
[[ "$IMAGE" == *:* && "$IMAGE" != *:latest ]] || die "use a fixed image tag (not latest): IfNotPresent must find the loaded image"

for tool in kind kubectl helm python3 "$CONTAINER_TOOL"; do
  command -v "$tool" >/dev/null 2>&1 || die "$tool not found on PATH"
done
if [[ "$CONTAINER_TOOL" == podman ]]; then
  export KIND_EXPERIMENTAL_PROVIDER=podman
fi

branches="$(python3 -c 'import json,sys; print(sum(1 for i in json.load(open(sys.argv[1])) if i.get("type") == "branch"))' "$INPUT")"
CTX="kind-$CLUSTER"
k() { kubectl --context "$CTX" -n "$NAMESPACE" "$@"; }

diagnose() {
  log "diagnostics"
  k get statefulset,pods,jobs,configmaps -o wide || true
  k get events --sort-by=.lastTimestamp | tail -n 30 || true
  k logs -l "app.kubernetes.io/instance=$RELEASE,app.kubernetes.io/component=replay" --tail=50 --all-containers || true
  k logs "$(helm_fullname)-0" --tail=30 || true
}

on_exit() {
  local rc=$?
  [[ $rc -ne 0 ]] && diagnose
  if [[ $DELETE -eq 1 ]]; then
    log "deleting kind cluster $CLUSTER"
    kind delete cluster --name "$CLUSTER" || true
  fi
  exit "$rc"
}
trap on_exit EXIT

helm_fullname() {
  # The StatefulSet of the release (the chart's fullname).
  kubectl --context "$CTX" -n "$NAMESPACE" get statefulset \
    -l "app.kubernetes.io/instance=$RELEASE,app.kubernetes.io/component=branch" \
    -o jsonpath='{.items[0].metadata.name}' 2>/dev/null || echo "$RELEASE"
}

# --- 1. cluster ----------------------------------------------------------------------------------
if kind get clusters 2>/dev/null | grep -qx "$CLUSTER"; then
  log "reusing kind cluster $CLUSTER"
else
  log "creating kind cluster $CLUSTER (maxPods 250: $branches branches + system pods on one node)"
  kind create cluster --name "$CLUSTER" --wait 180s --config - <<'EOF'
kind: Cluster
apiVersion: kind.x-k8s.io/v1alpha4
kubeadmConfigPatches:
  - |
    apiVersion: kubelet.config.k8s.io/v1beta1
    kind: KubeletConfiguration
    maxPods: 250
nodes:
  - role: control-plane
EOF
fi
kubectl --context "$CTX" cluster-info >/dev/null

# --- 2. image ------------------------------------------------------------------------------------
if [[ $BUILD -eq 1 ]]; then
  log "building $IMAGE"
  if [[ "$CONTAINER_TOOL" == podman ]]; then
    "$ROOT/scripts/build-image.sh" --tag "$IMAGE"
  else
    DOCKER_BUILDKIT=1 docker build -t "$IMAGE" "$ROOT"
  fi
fi

# --- 3. load -------------------------------------------------------------------------------------
log "loading $IMAGE into kind cluster $CLUSTER"
if [[ "$CONTAINER_TOOL" == podman ]]; then
  archive="$(mktemp "${TMPDIR:-/tmp}/distbank-image.XXXXXX.tar")"
  podman save -o "$archive" "$IMAGE"
  kind load image-archive "$archive" --name "$CLUSTER"
  rm -f "$archive"
else
  kind load docker-image "$IMAGE" --name "$CLUSTER"
fi

# --- 4. install ----------------------------------------------------------------------------------
# The namespace enforces the "restricted" Pod Security Standard: every pod of the chart must pass it.
kubectl --context "$CTX" create namespace "$NAMESPACE" --dry-run=client -o yaml | kubectl --context "$CTX" apply -f -
kubectl --context "$CTX" label namespace "$NAMESPACE" --overwrite \
  pod-security.kubernetes.io/enforce=restricted pod-security.kubernetes.io/warn=restricted
log "helm upgrade --install $RELEASE ($branches branches from ${INPUT#"$ROOT"/})"
helm --kube-context "$CTX" upgrade --install "$RELEASE" "$ROOT/helm/distbank" \
  --namespace "$NAMESPACE" \
  --set-file "input=$INPUT" \
  --set "image.repository=${IMAGE%:*}" --set "image.tag=${IMAGE##*:}" \
  --wait --timeout "${TIMEOUT}s"

sts="$(helm_fullname)"
log "waiting for StatefulSet $sts ($branches pods)"
k rollout status "statefulset/$sts" --timeout "${TIMEOUT}s"

# --- 5. replay Job -------------------------------------------------------------------------------
job="$(k get jobs -l "app.kubernetes.io/instance=$RELEASE,app.kubernetes.io/component=replay" \
  --sort-by=.metadata.creationTimestamp -o jsonpath='{.items[-1:].metadata.name}')"
[[ -n "$job" ]] || die "no replay Job found"
log "waiting for Job $job"
deadline=$((SECONDS + TIMEOUT))
while :; do
  complete="$(k get job "$job" -o jsonpath='{.status.conditions[?(@.type=="Complete")].status}')"
  failed="$(k get job "$job" -o jsonpath='{.status.conditions[?(@.type=="Failed")].status}')"
  [[ "$complete" == True ]] && break
  [[ "$failed" == True ]] && die "Job $job failed"
  [[ $SECONDS -lt $deadline ]] || die "Job $job did not finish within ${TIMEOUT}s"
  sleep 5
done
k logs "job/$job" --tail=5 || true

log "helm test $RELEASE"
helm --kube-context "$CTX" test "$RELEASE" --namespace "$NAMESPACE" --logs --timeout 300s

# --- 6. output -----------------------------------------------------------------------------------
cm="$RELEASE-output"
log "fetching output.json from ConfigMap $cm"
plain="$(k get configmap "$cm" -o jsonpath='{.data.output\.json}')"
if [[ -n "$plain" ]]; then
  printf '%s\n' "$plain" >"$OUTPUT"
else
  k get configmap "$cm" -o jsonpath='{.binaryData.output\.json\.gz}' | base64 -d | gunzip >"$OUTPUT"
fi
[[ -s "$OUTPUT" ]] || die "ConfigMap $cm has no output.json"
log "wrote $OUTPUT ($(wc -c <"$OUTPUT") bytes)"

if [[ "$EXPECTED" == none ]]; then
  log "no expected output to compare with: done"
  exit 0
fi
python3 - "$OUTPUT" "$EXPECTED" <<'PY'
import json, sys
got, want = (json.load(open(p)) for p in sys.argv[1:3])
if got == want:
    print(f"[kind-e2e] PASS: output.json matches {sys.argv[2]} ({len(got)} customer items)")
    sys.exit(0)
print(f"[kind-e2e] FAIL: output.json differs from {sys.argv[2]}", file=sys.stderr)
if len(got) != len(want):
    print(f"  {len(got)} items, expected {len(want)}", file=sys.stderr)
shown = 0
for i, (g, w) in enumerate(zip(got, want)):
    if g != w and shown < 10:
        print(f"  item {i}: got {json.dumps(g)}\n          want {json.dumps(w)}", file=sys.stderr)
        shown += 1
sys.exit(1)
PY
