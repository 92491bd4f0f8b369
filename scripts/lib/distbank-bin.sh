# Shared by scripts/test.sh, jaeger-e2e.sh, grpcurl-check.sh and check-chart.sh: the `distbank`
# binary their checks run.
# shellcheck shell=bash

# distbank_bin: prints $DISTBANK_BIN when it is set; otherwise builds the debug binary (cargo,
# --locked; a no-op when it is current) and prints its path. Run it in the repository.
distbank_bin() {
  if [[ -n "${DISTBANK_BIN:-}" ]]; then
    echo "$DISTBANK_BIN"
    return
  fi
  cargo build --locked --quiet --bin distbank >&2
  local target
  target="$(cargo metadata --format-version 1 --no-deps | python3 -c 'import json,sys; print(json.load(sys.stdin)["target_directory"])')"
  echo "$target/debug/distbank"
}
