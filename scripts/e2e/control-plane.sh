#!/usr/bin/env bash
# A real, minimal Kubernetes control plane for the end-to-end test (scripts/e2e.sh):
# etcd + kube-apiserver + kube-controller-manager, built from the Go module proxy through the
# tools module next to this script (scripts/e2e/tools/go.mod pins k8s.io/kubernetes and every
# staging module), and cached by version under ${XDG_CACHE_HOME:-~/.cache}/distbank-tools/.
# There is no kubelet, scheduler, kube-proxy or CoreDNS: scripts/e2e.sh plays the kubelet with
# podman.
#
# Usage:
#   control-plane.sh build                 build (or reuse) the cached binaries; prints their dir
#   control-plane.sh start DIR ADDRESS     generate a CA and credentials in DIR, start etcd (on
#                                          loopback) and the API server (on ADDRESS, which must be
#                                          reachable from the containers, e.g. the podman bridge
#                                          gateway) and the controller manager; writes
#                                          DIR/kubeconfig and DIR/*.pid, waits for /readyz
#   control-plane.sh stop DIR              stop what `start` started (by the PIDs in DIR)
# Env: DISTBANK_TOOLS_DIR (default ${XDG_CACHE_HOME:-$HOME/.cache}/distbank-tools),
#      APISERVER_PORT (default: a free port), CP_TIMEOUT (seconds to wait for readiness, 180)
set -euo pipefail

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
K8S_VERSION="$(sed -n 's/^[[:space:]]*k8s.io\/kubernetes \(v[0-9][0-9.]*\)\( \/\/.*\)\{0,1\}$/\1/p' "$HERE/tools/go.mod")"
[[ -n "$K8S_VERSION" ]] || { echo "control-plane: no k8s.io/kubernetes version in $HERE/tools/go.mod" >&2; exit 1; }
TOOLS="${DISTBANK_TOOLS_DIR:-${XDG_CACHE_HOME:-$HOME/.cache}/distbank-tools}"
BIN="$TOOLS/control-plane-$K8S_VERSION/bin"
CP_TIMEOUT="${CP_TIMEOUT:-180}"

log() { printf '[control-plane] %s\n' "$*" >&2; }
die() { printf '[control-plane] ERROR: %s\n' "$*" >&2; exit 1; }

build() {
  if [[ -x "$BIN/etcd" && -x "$BIN/kube-apiserver" && -x "$BIN/kube-controller-manager" ]]; then
    printf '%s\n' "$BIN"
    return
  fi
  # The machine's Go lives in /usr/local/go; a CI environment may not have it on PATH.
  command -v go >/dev/null || [[ ! -x /usr/local/go/bin/go ]] || PATH="/usr/local/go/bin:$PATH"
  command -v go >/dev/null || die "go not found: the control plane is built from the Go module proxy"
  local major minor rest
  IFS=. read -r major minor rest <<<"${K8S_VERSION#v}"
  # Without these the server reports v0.0.0-master, which Helm's kubeVersion checks reject.
  local ld="-s -w -X k8s.io/component-base/version.gitVersion=$K8S_VERSION"
  ld+=" -X k8s.io/component-base/version.gitMajor=$major -X k8s.io/component-base/version.gitMinor=$minor"
  ld+=" -X k8s.io/component-base/version.gitTreeState=clean"
  ld+=" -X k8s.io/component-base/version.buildDate=1970-01-01T00:00:00Z"
  local out="$BIN.tmp"
  rm -rf "$out"
  mkdir -p "$out"
  log "building etcd, kube-apiserver, kube-controller-manager $K8S_VERSION (cold: many minutes, several GiB of RAM)"
  local start=$SECONDS
  # One `go build` for all three: they share most packages.
  (cd "$HERE/tools" && nice go build -mod=readonly -trimpath -ldflags "$ld" -o "$out/" \
    go.etcd.io/etcd/server/v3 k8s.io/kubernetes/cmd/kube-apiserver k8s.io/kubernetes/cmd/kube-controller-manager) ||
    die "go build of the control plane failed (see above)"
  # go names the etcd main package after its module path (server/v3 -> "server").
  mv "$out/server" "$out/etcd"
  mkdir -p "$(dirname "$BIN")"
  rm -rf "$BIN"
  mv "$out" "$BIN"
  log "built in $((SECONDS - start))s: $("$BIN/kube-apiserver" --version), etcd $("$BIN/etcd" --version | sed -n 's/^etcd Version: //p')"
  printf '%s\n' "$BIN"
}

free_port() {
  python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'
}

# cert NAME CN [O] [SAN]: a key and a certificate signed by DIR/ca.
cert() {
  local dir="$1" name="$2" cn="$3" org="${4:-}" san="${5:-}" subj="/CN=$3"
  [[ -n "$org" ]] && subj="/O=$org/CN=$cn"
  openssl req -new -newkey rsa:2048 -nodes -keyout "$dir/$name.key" -subj "$subj" -out "$dir/$name.csr" 2>/dev/null
  local ext="$dir/$name.ext"
  if [[ -n "$san" ]]; then
    printf 'subjectAltName=%s\nextendedKeyUsage=serverAuth,clientAuth\nkeyUsage=digitalSignature,keyEncipherment\n' "$san" >"$ext"
  else
    printf 'extendedKeyUsage=clientAuth\nkeyUsage=digitalSignature,keyEncipherment\n' >"$ext"
  fi
  openssl x509 -req -in "$dir/$name.csr" -CA "$dir/ca.crt" -CAkey "$dir/ca.key" -CAcreateserial \
    -days 2 -extfile "$ext" -out "$dir/$name.crt" 2>/dev/null
  rm -f "$dir/$name.csr" "$ext"
}

kubeconfig() {
  local dir="$1" user="$2" server="$3"
  cat >"$dir/$user.kubeconfig" <<EOF
apiVersion: v1
kind: Config
clusters:
  - name: e2e
    cluster:
      server: $server
      certificate-authority: $dir/pki/ca.crt
users:
  - name: $user
    user:
      client-certificate: $dir/pki/$user.crt
      client-key: $dir/pki/$user.key
contexts:
  - name: e2e
    context: {cluster: e2e, user: $user, namespace: default}
current-context: e2e
EOF
}

# start_bg NAME CMD...: start in the background with output to DIR/NAME.log, PID in DIR/NAME.pid.
start_bg() {
  local dir="$1" name="$2"
  shift 2
  "$@" >"$dir/$name.log" 2>&1 &
  echo $! >"$dir/$name.pid"
}

alive() { [[ -f "$1" ]] && kill -0 "$(cat "$1")" 2>/dev/null; }

start() {
  local dir="$1" address="$2"
  build >/dev/null
  mkdir -p "$dir/pki" "$dir/etcd"
  dir="$(cd "$dir" && pwd)"
  local pki="$dir/pki"
  openssl req -x509 -new -newkey rsa:2048 -nodes -keyout "$pki/ca.key" -subj "/CN=distbank-e2e-ca" \
    -days 2 -out "$pki/ca.crt" 2>/dev/null
  # The API server's certificate names every way a client reaches it: the address the
  # containers use (as KUBERNETES_SERVICE_HOST), loopback, and the in-cluster Service names.
  cert "$pki" apiserver kube-apiserver "" \
    "IP:$address,IP:127.0.0.1,IP:10.0.0.1,DNS:localhost,DNS:kubernetes,DNS:kubernetes.default,DNS:kubernetes.default.svc,DNS:kubernetes.default.svc.cluster.local"
  cert "$pki" admin admin system:masters
  cert "$pki" controller-manager system:kube-controller-manager
  openssl genrsa -out "$pki/sa.key" 2048 2>/dev/null
  openssl rsa -in "$pki/sa.key" -pubout -out "$pki/sa.pub" 2>/dev/null

  local port="${APISERVER_PORT:-$(free_port)}" etcd_port etcd_peer
  etcd_port="$(free_port)"
  etcd_peer="$(free_port)"
  local server="https://$address:$port"
  kubeconfig "$dir" admin "$server"
  kubeconfig "$dir" controller-manager "$server"
  cp "$dir/admin.kubeconfig" "$dir/kubeconfig"
  printf '%s\n' "$server" >"$dir/server"

  log "etcd on 127.0.0.1:$etcd_port"
  start_bg "$dir" etcd "$BIN/etcd" --data-dir "$dir/etcd" --name e2e \
    --listen-client-urls "http://127.0.0.1:$etcd_port" --advertise-client-urls "http://127.0.0.1:$etcd_port" \
    --listen-peer-urls "http://127.0.0.1:$etcd_peer" --initial-advertise-peer-urls "http://127.0.0.1:$etcd_peer" \
    --initial-cluster "e2e=http://127.0.0.1:$etcd_peer" --unsafe-no-fsync --log-level warn

  log "kube-apiserver $K8S_VERSION on $server"
  start_bg "$dir" kube-apiserver "$BIN/kube-apiserver" \
    --etcd-servers "http://127.0.0.1:$etcd_port" \
    --bind-address "$address" --advertise-address "$address" --secure-port "$port" \
    --tls-cert-file "$pki/apiserver.crt" --tls-private-key-file "$pki/apiserver.key" \
    --client-ca-file "$pki/ca.crt" \
    --authorization-mode Node,RBAC \
    --service-account-issuer https://kubernetes.default.svc.cluster.local \
    --service-account-key-file "$pki/sa.pub" --service-account-signing-key-file "$pki/sa.key" \
    --service-cluster-ip-range 10.0.0.0/24 \
    --allow-privileged=false --profiling=false --v=1

  local deadline=$((SECONDS + CP_TIMEOUT))
  until curl -sf --cacert "$pki/ca.crt" --cert "$pki/admin.crt" --key "$pki/admin.key" "$server/readyz" >/dev/null 2>&1; do
    alive "$dir/etcd.pid" || { tail -n 30 "$dir/etcd.log" >&2; die "etcd exited"; }
    alive "$dir/kube-apiserver.pid" || { tail -n 40 "$dir/kube-apiserver.log" >&2; die "kube-apiserver exited"; }
    ((SECONDS < deadline)) || { tail -n 40 "$dir/kube-apiserver.log" >&2; die "kube-apiserver not ready after ${CP_TIMEOUT}s"; }
    sleep 0.5
  done
  log "kube-apiserver ready"

  # The StatefulSet and Job controllers create the real Pod objects that the test runs (and
  # pvc-protection lets a deleted claim go once no pod uses it); each controller uses its own
  # ServiceAccount and bootstrap RBAC role, as in a real cluster.
  start_bg "$dir" kube-controller-manager "$BIN/kube-controller-manager" \
    --kubeconfig "$dir/controller-manager.kubeconfig" \
    --authentication-kubeconfig "$dir/controller-manager.kubeconfig" \
    --authorization-kubeconfig "$dir/controller-manager.kubeconfig" \
    --bind-address 127.0.0.1 --secure-port 0 \
    --controllers 'serviceaccount,statefulset,job,pvc-protection,root-ca-cert-publisher,garbagecollector,ttl-after-finished,endpointslice' \
    --root-ca-file "$pki/ca.crt" --service-account-private-key-file "$pki/sa.key" \
    --use-service-account-credentials=true --leader-elect=false --v=1
  sleep 0.2
  alive "$dir/kube-controller-manager.pid" || { tail -n 40 "$dir/kube-controller-manager.log" >&2; die "kube-controller-manager exited"; }
  log "kube-controller-manager started"
}

stop() {
  local dir="$1" name pid
  for name in kube-controller-manager kube-apiserver etcd; do
    [[ -f "$dir/$name.pid" ]] || continue
    pid="$(cat "$dir/$name.pid")"
    if kill -0 "$pid" 2>/dev/null; then
      kill "$pid" 2>/dev/null || true
      for _ in $(seq 100); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
      kill -9 "$pid" 2>/dev/null || true
    fi
    rm -f "$dir/$name.pid"
  done
}

case "${1:-}" in
  build) build ;;
  start) [[ $# -eq 3 ]] || die "usage: $0 start DIR ADDRESS"; start "$2" "$3" ;;
  stop) [[ $# -eq 2 ]] || die "usage: $0 stop DIR"; stop "$2" ;;
  *) sed -n '2,/^set -euo pipefail/{/^set -euo/d;s/^# \{0,1\}//;p;}' "$0"; exit 2 ;;
esac
