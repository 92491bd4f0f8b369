#!/usr/bin/env bash
# The project's one test command (README quick start, and what .ci/run runs):
# formatting, lints, API docs, every test (unit, integration, Python interop), a real-Jaeger
# tracing check, grpcurl against a branch, a benchmark smoke run, the Helm chart / manifest
# checks, and the end-to-end test against a real API server. Installs what the tests need on
# first use (a Python virtualenv with grpcio-tools; Jaeger and grpcurl built with Go by their
# scripts; helm, kubectl and validators via
# scripts/check-chart.sh; podman, base images and the Go-built control plane via scripts/e2e.sh)
# into ${XDG_CACHE_HOME:-~/.cache}/distbank*, so later runs are offline and fast.
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
step "cargo doc (broken intra-doc links fail)"
RUSTDOCFLAGS="-D warnings" cargo doc --locked --no-deps --quiet
step "cargo test"
cargo test --locked
# shellcheck source=lib/distbank-bin.sh
source scripts/lib/distbank-bin.sh
debug_bin="$(DISTBANK_BIN="" distbank_bin)"
step "tracing end to end with a real Jaeger v2 (builds it once with Go; skipped without Go)"
DISTBANK_BIN="$debug_bin" scripts/jaeger-e2e.sh
step "grpcurl against a branch, through server reflection (builds grpcurl once with Go; skipped without Go)"
DISTBANK_BIN="$debug_bin" scripts/grpcurl-check.sh
step "fuzz targets compile (running them: cargo fuzz, see docs/design.md)"
cargo check --locked --quiet --manifest-path fuzz/Cargo.toml --bins
step "the tracing-cost benchmark's patch still applies (scripts/bench/tracing-cost.sh)"
git apply --check scripts/bench/tracing-compiled-out.patch
step "bench smoke (debug build, tiny workloads, the original beside it: checks the bench runs, not speed)"
scripts/bench.sh --smoke
if [[ -x scripts/check-chart.sh ]]; then
  step "Helm chart and manifests"
  DISTBANK_BIN="$debug_bin" scripts/check-chart.sh
fi
# The real image, chart, API server and StatefulSet-shaped containers (docs/kubernetes.md,
# "End-to-end test"). Needs root for podman on a fresh machine; DISTBANK_SKIP_E2E=1 skips it.
if [[ "${DISTBANK_SKIP_E2E:-0}" == 1 ]]; then
  step "end-to-end test SKIPPED (DISTBANK_SKIP_E2E=1)"
else
  step "end-to-end test (scripts/e2e.sh)"
  scripts/e2e.sh
fi
step "all checks passed"
