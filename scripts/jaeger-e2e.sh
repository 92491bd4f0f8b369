#!/usr/bin/env bash
# End-to-end tracing check against a real Jaeger v2 (all-in-one, in-memory) on loopback:
# builds Jaeger from the Go module proxy once (cached), runs a 3-branch `distbank run
# --otlp-endpoint`, and fetches the deposit's trace back through Jaeger's query API
# (GET /api/traces?service=...). Passes when one trace holds the replay span, the customer's
# branch's MsgDelivery and an apply span on every branch.
#
# Usage: scripts/jaeger-e2e.sh            (skips with a message when `go` is not installed)
# Env:   DISTBANK_BIN    distbank binary (default: built with cargo)
#        JAEGER_KEEP=1   leave Jaeger running and print the UI address (for screenshots)
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

readonly JAEGER_MODULE="github.com/jaegertracing/jaeger" JAEGER_VERSION="v1.76.0" # = Jaeger v2.13.0
tools="${DISTBANK_TOOLS_DIR:-${XDG_CACHE_HOME:-$HOME/.cache}/distbank-tools}"
jaeger="$tools/jaeger-$JAEGER_VERSION/jaeger"

if [[ ! -x "$jaeger" ]]; then
  if ! command -v go >/dev/null 2>&1; then
    echo "jaeger-e2e: SKIPPED: Go is not installed, so Jaeger cannot be built (install Go to run this check)"
    exit 0
  fi
  # `go install module@version` refuses modules whose go.mod has replace directives (Jaeger's
  # has one), so build through a tiny module that repeats it.
  echo "jaeger-e2e: building Jaeger $JAEGER_VERSION into $jaeger (several minutes, once)"
  build="$tools/jaeger-build"
  mkdir -p "$build" "$(dirname "$jaeger")"
  cat >"$build/go.mod" <<EOF
module distbank.local/jaeger-build

go 1.25

require $JAEGER_MODULE $JAEGER_VERSION

replace github.com/Shopify/sarama => github.com/Shopify/sarama v1.33.0
EOF
  printf '//go:build tools\n\npackage tools\n\nimport _ "%s/cmd/jaeger"\n' "$JAEGER_MODULE" >"$build/tools.go"
  (cd "$build" && go mod tidy && nice go build -o "$jaeger.tmp" "$JAEGER_MODULE/cmd/jaeger")
  mv "$jaeger.tmp" "$jaeger"
fi

bin="${DISTBANK_BIN:-}"
if [[ -z "$bin" ]]; then
  cargo build --locked --quiet
  bin="$(cargo metadata --format-version 1 --no-deps | python3 -c 'import json,sys; print(json.load(sys.stdin)["target_directory"])')/debug/distbank"
fi

work="$(mktemp -d "${TMPDIR:-/tmp}/distbank-jaeger.XXXXXX")"
jaeger_pid=""
cleanup() {
  if [[ -n "$jaeger_pid" && "${JAEGER_KEEP:-0}" != 1 ]]; then
    kill "$jaeger_pid" 2>/dev/null || true
    wait "$jaeger_pid" 2>/dev/null || true
  fi
  rm -rf "$work"
}
trap cleanup EXIT

# Three free loopback ports: OTLP/gRPC, query HTTP (API + UI), query gRPC.
read -r otlp http grpc < <(python3 -c '
import socket
socks = [socket.socket() for _ in range(3)]
for s in socks: s.bind(("127.0.0.1", 0))
print(*[s.getsockname()[1] for s in socks])')

cat >"$work/jaeger.yaml" <<EOF
service:
  extensions: [jaeger_storage, jaeger_query]
  pipelines:
    traces:
      receivers: [otlp]
      processors: [batch]
      exporters: [jaeger_storage_exporter]
  telemetry:
    metrics:
      level: none
    logs:
      level: warn
extensions:
  jaeger_query:
    storage:
      traces: memstore
    http:
      endpoint: 127.0.0.1:$http
    grpc:
      endpoint: 127.0.0.1:$grpc
  jaeger_storage:
    backends:
      memstore:
        memory:
          max_traces: 10000
receivers:
  otlp:
    protocols:
      grpc:
        endpoint: 127.0.0.1:$otlp
processors:
  batch:
exporters:
  jaeger_storage_exporter:
    trace_storage: memstore
EOF

"$jaeger" --config "$work/jaeger.yaml" >"$work/jaeger.log" 2>&1 &
jaeger_pid=$!
query="http://127.0.0.1:$http"

python3 - "$query" "$jaeger_pid" <<'PY' || { tail -n 30 "$work/jaeger.log" >&2; exit 1; }
import os, sys, time, urllib.request
query, pid = sys.argv[1], int(sys.argv[2])
deadline = time.time() + 60
while True:
    try:
        urllib.request.urlopen(f"{query}/api/services", timeout=2).read()
        break
    except Exception as e:
        if time.time() > deadline:
            sys.exit(f"jaeger-e2e: Jaeger's query API did not come up: {e}")
        try:
            os.kill(pid, 0)
        except OSError:
            sys.exit("jaeger-e2e: Jaeger exited")
        time.sleep(0.2)
PY

service="distbank-e2e-$$"
echo "jaeger-e2e: Jaeger up (OTLP 127.0.0.1:$otlp, UI $query); running 3 branches with --otlp-endpoint"
OTEL_SERVICE_NAME="$service" "$bin" run tests/fixtures/spec_3_input.json --output "$work/output.json" \
  --otlp-endpoint "http://127.0.0.1:$otlp"

python3 - "$query" "$service" <<'PY'
import json, sys, time, urllib.parse, urllib.request
query, service = sys.argv[1], sys.argv[2]
url = f"{query}/api/traces?" + urllib.parse.urlencode(
    {"service": service, "operation": "replay deposit", "limit": 20, "lookback": "1h"})
deadline = time.time() + 60
while True:
    traces = json.load(urllib.request.urlopen(url, timeout=5)).get("data") or []
    # Jaeger stores spans as they arrive: wait until the trace holds every branch's apply.
    def summary(trace):
        services = {p["serviceName"] for p in trace["processes"].values()}
        applies = sorted(trace["processes"][s["processID"]]["serviceName"]
                         for s in trace["spans"] if s["operationName"] == "apply PropagateDeposit")
        return services, applies
    done = [t for t in traces if summary(t)[1] == [f"{service}-branch-{b}" for b in (1, 2, 3)]]
    if done:
        trace = done[0]
        services, applies = summary(trace)
        print(f"jaeger-e2e: GET {url}")
        print(f"jaeger-e2e: trace {trace['traceID']}: {len(trace['spans'])} spans from {sorted(services)}")
        by_id = {s["spanID"]: s for s in trace["spans"]}
        def depth(span):
            refs = [r for r in span.get("references", []) if r["refType"] == "CHILD_OF"]
            return 0 if not refs or refs[0]["spanID"] not in by_id else 1 + depth(by_id[refs[0]["spanID"]])
        for span in sorted(trace["spans"], key=lambda s: s["startTime"]):
            svc = trace["processes"][span["processID"]]["serviceName"]
            print(f"    {'  ' * depth(span)}{span['operationName']}  [{svc}]  {span['duration']} us")
        assert any(s["operationName"] == "Bank/MsgDelivery" for s in trace["spans"]), "no MsgDelivery span"
        print("jaeger-e2e: PASS (one trace: replay -> MsgDelivery -> consensus -> apply on branches 1, 2, 3)")
        break
    if time.time() > deadline:
        sys.exit(f"jaeger-e2e: FAIL: no deposit trace with an apply span on every branch; got "
                 f"{[summary(t) for t in traces]}")
    time.sleep(0.5)
PY
if [[ "${JAEGER_KEEP:-0}" == 1 ]]; then
  echo "jaeger-e2e: Jaeger left running (pid $jaeger_pid): UI at $query/search?service=$service"
fi
