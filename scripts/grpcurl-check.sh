#!/usr/bin/env bash
# The README's grpcurl commands, run against `distbank server` on loopback: server reflection
# lists the customer API (and not the peer API), and a deposit, an idempotent query, a health
# check and a refused propagate_* call answer as documented. Builds grpcurl from the Go module
# proxy once (cached beside the other tools); skips with a message when Go is not installed.
#
# Usage: scripts/grpcurl-check.sh      Env: DISTBANK_BIN (default: built with cargo)
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

readonly GRPCURL_VERSION="v1.9.3"
# shellcheck source=lib/go-tool.sh
source scripts/lib/go-tool.sh
if ! grpcurl="$(go_tool grpcurl github.com/fullstorydev/grpcurl/cmd/grpcurl "$GRPCURL_VERSION")"; then
  echo "grpcurl-check: SKIPPED: Go is not installed, so grpcurl cannot be built"
  exit 0
fi
# shellcheck source=lib/distbank-bin.sh
source scripts/lib/distbank-bin.sh
bin="$(distbank_bin)"

# A base port whose branch ports (base+1..base+3) are free now.
base=""
for _ in $(seq 50); do
  candidate=$((20000 + RANDOM % 30000))
  if python3 - "$candidate" <<'EOF'; then base=$candidate; break; fi
import socket, sys
base = int(sys.argv[1])
for port in range(base + 1, base + 4):
    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            sys.exit(1)
EOF
done
[[ -n "$base" ]] || { echo "grpcurl-check: no free ports" >&2; exit 1; }

work="$(mktemp -d)"
server=""
cleanup() {
  if [[ -n "$server" ]]; then
    kill "$server" 2>/dev/null || true
    wait "$server" 2>/dev/null || true
  fi
  rm -rf "$work"
}
trap cleanup EXIT
"$bin" --log-format text server examples/input.json --base-port "$base" >"$work/server.log" 2>&1 &
server=$!
one="127.0.0.1:$((base + 1))" two="127.0.0.1:$((base + 2))"
for _ in $(seq 600); do
  if "$grpcurl" -plaintext -d '{"service": "readiness"}' "$one" grpc.health.v1.Health/Check 2>/dev/null | grep -q SERVING \
    && "$grpcurl" -plaintext -d '{"service": "readiness"}' "$two" grpc.health.v1.Health/Check 2>/dev/null | grep -q SERVING; then
    break
  fi
  sleep 0.1
done

fail() { echo "grpcurl-check: FAILED: $*" >&2; cat "$work/server.log" >&2; exit 1; }
expect() { # WHAT PATTERN OUTPUT
  grep -q -- "$2" <<<"$3" || fail "$1: expected /$2/ in: $3"
}
# Every answer, error or not, goes to `expect`, which names what differs.
call() { "$grpcurl" -plaintext "$@" 2>&1 || true; }
services="$(call "$one" list)"
for service in Bank grpc.health.v1.Health grpc.reflection.v1.ServerReflection; do
  expect "list" "^$service\$" "$services"
done
if grep -qi peer <<<"$services"; then fail "the peer API is listed: $services"; fi
expect "describe" "rpc MsgDelivery" "$(call "$one" describe Bank)"
expect "deposit" '"status": "success"' \
  "$(call -d '{"customer_id": 1, "operation": "deposit", "amount": 10}' "$one" Bank/MsgDelivery)"
query() {
  call -H 'x-distbank-event-id: 7' -d '{"customer_id": 2, "operation": "query"}' "$two" Bank/MsgDelivery
}
expect "query" '"balance": 410' "$(query)"
expect "repeated query" '"balance": 410' "$(query)"
expect "health" '"status": "SERVING"' \
  "$(call -d '{"service": "readiness"}' "$one" grpc.health.v1.Health/Check)"
refused="$(call -d '{"customer_id": 1, "operation": "propagate_deposit", "amount": 10}' "$one" Bank/MsgDelivery)"
expect "propagate_deposit" "PermissionDenied" "$refused"
echo "grpcurl-check: passed (grpcurl $GRPCURL_VERSION: reflection lists Bank and health only; deposit, idempotent query, health, PERMISSION_DENIED)"
