#!/usr/bin/env bash
# The project's one test command (README quick start, and what .ci/run runs):
# formatting, lints, every test (unit, integration, Python interop), a real-Jaeger tracing
# check, a benchmark smoke run, and the Helm chart / manifest checks. Installs what the tests
# need on first use (a Python virtualenv with grpcio-tools; Jaeger built with Go via
# scripts/jaeger-e2e.sh; helm, kubectl and validators via scripts/check-chart.sh) into
# ${XDG_CACHE_HOME:-~/.cache}/distbank*, so later runs are offline and fast.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

step() { printf '\n==> %s\n' "$*"; }

cache="${XDG_CACHE_HOME:-$HOME/.cache}/distbank"
venv="$cache/venv"
if ! "$venv/bin/python" -c 'import grpc, grpc_tools' 2>/dev/null; then
  step "creating the interop virtualenv in $venv"
  mkdir -p "$cache"
  python3 -m venv "$venv"
  "$venv/bin/pip" install --quiet --disable-pip-version-check \
    grpcio==1.64.1 grpcio-tools==1.64.1 protobuf==5.27.2
fi
export DISTBANK_PYTHON="$venv/bin/python"

step "cargo fmt --check"
cargo fmt --check
step "cargo clippy --all-targets -- -D warnings"
cargo clippy --locked --all-targets -- -D warnings
step "cargo test"
cargo test --locked
step "tracing end to end with a real Jaeger v2 (builds it once with Go; skipped without Go)"
DISTBANK_BIN="$(cargo metadata --format-version 1 --no-deps | python3 -c 'import json,sys; print(json.load(sys.stdin)["target_directory"])')/debug/distbank" \
  scripts/jaeger-e2e.sh
step "bench smoke (debug build: checks the bench runs and agrees with the reference, not speed)"
cargo run --locked --quiet -- bench tests/fixtures/course_50_input.json --runs 1 \
  --expect tests/fixtures/course_50_output.json
if [[ -x scripts/check-chart.sh ]]; then
  step "Helm chart and manifests"
  scripts/check-chart.sh
fi
step "all checks passed"
