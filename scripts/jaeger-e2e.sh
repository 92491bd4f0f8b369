#!/usr/bin/env bash
# End-to-end tracing check against a real Jaeger v2 (all-in-one, in-memory) on loopback:
# builds Jaeger from the Go module proxy once (cached), runs a 3-branch `distbank run
# --otlp-endpoint`, and fetches the deposit's trace back through Jaeger's query API
# (GET /api/traces?service=...). Passes when one trace holds the replay span, the customer's
# branch's MsgDelivery and an apply span on every branch.
#
# With --screenshot, Jaeger also serves its web UI and headless Chromium photographs that trace's
# page (the README's docs/jaeger-trace.png). A Jaeger built with `go build` embeds only a
# placeholder page, so the UI (the official Jaeger UI v2.14.1 production build, which still uses
# the /api/* endpoints Jaeger v2.13 serves) comes from the crates.io crate otlp-embedded 0.0.2,
# which vendors it (sha256-pinned), unpacked once into the tools cache.
#
# Usage: scripts/jaeger-e2e.sh [--screenshot [OUT.png]]   (OUT default docs/jaeger-trace.png)
#        Skips with a message when `go` is not installed. The screenshot needs Debian's
#        `chromium` (apt-get install --no-install-recommends chromium fonts-dejavu-core).
# Env:   DISTBANK_BIN    distbank binary (default: built with cargo)
#        JAEGER_KEEP=1   leave Jaeger running and print the UI address
#        JAEGER_UI_DIR   a jaeger-ui build directory to serve instead of the crate's
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

screenshot=""
case "${1:-}" in
  --screenshot) screenshot="${2:-docs/jaeger-trace.png}" ;;
  "") ;;
  *) echo "usage: scripts/jaeger-e2e.sh [--screenshot [OUT.png]]" >&2; exit 2 ;;
esac

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

# The Jaeger UI's production build, from the crate that vendors it (cargo's download cache when
# it holds the crate, else crates.io's download endpoint).
fetch_ui() { # DEST
  local dest="$1" name=otlp-embedded ver=0.0.2 crate tmp
  local sum=89d4d073869615bdc3a377db062f33220ddb55787a8b5644c56ccc8bccc6a61e
  crate="$(ls "${CARGO_HOME:-$HOME/.cargo}"/registry/cache/*/"$name-$ver.crate" 2>/dev/null | head -n 1 || true)"
  mkdir -p "$(dirname "$dest")"
  tmp="$(mktemp -d "$(dirname "$dest")/.jaeger-ui.XXXXXX")"
  if [[ -z "$crate" ]]; then
    crate="$tmp/$name-$ver.crate"
    curl -fsSL -o "$crate" "https://static.crates.io/crates/$name/$name-$ver.crate"
  fi
  echo "$sum  $crate" | sha256sum -c --quiet - || { rm -rf "$tmp"; echo "jaeger-e2e: $crate: bad checksum" >&2; return 1; }
  tar -xzf "$crate" -C "$tmp" "$name-$ver/jaeger-ui"
  mv "$tmp/$name-$ver/jaeger-ui/build" "$dest"
  rm -rf "$tmp"
}
ui_yaml=""
if [[ -n "$screenshot" ]]; then
  chromium="$(command -v chromium || command -v chromium-browser || true)"
  [[ -n "$chromium" ]] || { echo "jaeger-e2e: --screenshot needs chromium (apt-get install chromium)" >&2; exit 1; }
  ui="${JAEGER_UI_DIR:-$tools/jaeger-ui-v2.14.1}"
  [[ -f "$ui/index.html" ]] || fetch_ui "$ui"
  ui_yaml="    ui:
      assets_path: $(cd "$ui" && pwd)"
fi

# shellcheck source=lib/distbank-bin.sh
source scripts/lib/distbank-bin.sh
bin="$(distbank_bin)"

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
    # Jaeger would otherwise export its own spans to 127.0.0.1:4317 and stall on shutdown.
    traces:
      level: none
    logs:
      level: warn
extensions:
  jaeger_query:
    storage:
      traces: memstore
$ui_yaml
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

# A fresh in-memory Jaeger holds only this run; the picture shows the chart's default name.
service="distbank-e2e-$$"
[[ -n "$screenshot" ]] && service="distbank"
echo "jaeger-e2e: Jaeger up (OTLP 127.0.0.1:$otlp, UI $query); running 3 branches with --otlp-endpoint"
OTEL_SERVICE_NAME="$service" "$bin" run tests/fixtures/spec_3_input.json --output "$work/output.json" \
  --otlp-endpoint "http://127.0.0.1:$otlp"

trace_id="$(python3 - "$query" "$service" <<'PY'
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
        # The report goes to stderr; stdout carries the trace id.
        sys.stdout, out = sys.stderr, sys.stdout
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
        print(trace["traceID"], file=out)
        break
    if time.time() > deadline:
        sys.exit(f"jaeger-e2e: FAIL: no deposit trace with an apply span on every branch; got "
                 f"{[summary(t) for t in traces]}")
    time.sleep(0.5)
PY
)"
if [[ -n "$screenshot" ]]; then
  url="$query/trace/$trace_id"
  # --no-sandbox: Chromium refuses its sandbox as root. The virtual-time budget lets the
  # single-page app fetch /api/traces/<id> and render before the shot.
  "$chromium" --headless --no-sandbox --disable-gpu --disable-dev-shm-usage --hide-scrollbars \
    --no-first-run --no-default-browser-check --user-data-dir="$work/chromium" \
    --window-size=1600,1000 --virtual-time-budget=10000 --screenshot="$screenshot" "$url" \
    >"$work/chromium.log" 2>&1 || { tail -n 30 "$work/chromium.log" >&2; exit 1; }
  [[ -s "$screenshot" ]] || { echo "jaeger-e2e: chromium wrote no PNG" >&2; exit 1; }
  echo "jaeger-e2e: screenshot of $url in $screenshot"
fi
if [[ "${JAEGER_KEEP:-0}" == 1 ]]; then
  echo "jaeger-e2e: Jaeger left running (pid $jaeger_pid): UI at $query/search?service=$service"
fi
