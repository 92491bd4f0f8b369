#!/usr/bin/env bash
# The benchmark suite (performance issue): distbank's workloads and, in the same invocation, the
# original Python implementation (../shared/baseline, rebuilt) on the same inputs, with ratios.
#
#   scripts/bench.sh            full suite, release build (~10 min); prints a markdown table
#   scripts/bench.sh --smoke    seconds, debug build: every workload kind once, tiny, so the bench
#                               code paths cannot rot (the README's test command runs this)
#   scripts/bench.sh --soak [S] the soak (reliability issue): S seconds (default 600) of steady
#                               concurrent load (64 clients, 5 branches, release build); prints the
#                               RSS/throughput timeline every 30 s and RSS at start and end; fails
#                               on any error
#
# Env: BASELINE_DIR (default ../shared/baseline), DISTBANK_PYTHON (a python with grpcio 1.64 and
# grpcio-tools; default the test venv), BENCH_CONCURRENT_SECONDS (default 30), GHZ (path to ghz;
# default: built once from the Go module proxy by scripts/ghz.sh).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
root=$PWD

smoke=0 soak=0
case ${1:-} in
  --smoke) smoke=1 ;;
  --soak) soak=${2:-600} ;;
  "") ;;
  *) echo "usage: scripts/bench.sh [--smoke | --soak [SECONDS]]" >&2; exit 2 ;;
esac

step() { printf '\n==> %s\n' "$*" >&2; }
cache="${XDG_CACHE_HOME:-$HOME/.cache}/distbank"
python="${DISTBANK_PYTHON:-$cache/venv/bin/python}"
baseline="${BASELINE_DIR:-$root/../shared/baseline}"
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT

if ((smoke)); then
  cargo build --locked --quiet --bins --example grpc_ceiling
  bin=$root/target/debug/distbank
  ceiling=$root/target/debug/examples/grpc_ceiling
else
  cargo build --locked --release --quiet --bins --example grpc_ceiling
  bin=$root/target/release/distbank
  ceiling=$root/target/release/examples/grpc_ceiling
fi
export RUST_LOG=error

if ((soak)); then
  step "soak: 64 clients, 5 branches, ${soak} s of steady load (closed loop), samples every 30 s"
  "$bin" bench --concurrent 64 --branches 5 --duration "$soak" --sample-every 30 | tee "$work/soak.txt"
  errors=$(awk '/^bench concurrent/ {print $(NF-1)}' "$work/soak.txt")
  [[ $errors == 0 ]] || { echo "soak: $errors errors" >&2; exit 1; }
  exit 0
fi

rows=()  # markdown table rows: workload | distbank | original | ratio
median() { sort -g | awk '{a[NR]=$1} END {if (NR==0) exit 1; print (NR%2 ? a[(NR+1)/2] : (a[NR/2]+a[NR/2+1])/2)}'; }

# distbank bench on one workload; echoes the report and leaves the median total (s) in $ours.
ours_bench() { # name args...
  local name=$1; shift
  step "distbank: $name"
  "$bin" bench "$@" 2>/dev/null | tee "$work/ours.txt" >&2
  ours=$(awk '/^  total: median/ {gsub("ms,","",$3); printf "%.3f", $3/1000}' "$work/ours.txt")
  ours_rss=$(awk '/peak RSS/ {print $3}' "$work/ours.txt")
}

# The original on INPUT, RUNS times (SEED_SLEEP=0: its 3 s pause between customers removed);
# leaves the median wall time (s) in $theirs and the peak tree RSS/PSS (MiB) in $theirs_mem.
theirs=""
theirs_bench() { # input runs [expected-output]
  local input=$1 runs=$2 expected=${3:-} times=() line
  theirs="" theirs_mem=""
  if [[ ! -x $baseline/run.sh ]] || ! "$python" -c 'import grpc, grpc_tools' 2>/dev/null; then
    step "original: skipped (no $baseline/run.sh or no python with grpcio at $python)"
    return 0
  fi
  for ((i = 1; i <= runs; i++)); do
    step "original: $(basename "$input") run $i/$runs"
    rm -f "$work/output.json"
    # Its fixed ports (50051+) lie in Linux's ephemeral range, so a socket left in TIME_WAIT by
    # the previous workload can block one of them: retry a failed start a few times.
    line=""
    for attempt in 1 2 3; do
      if line=$(cd "$work" && SEED_PY=$python SEED_SLEEP=0 python3 "$root/scripts/bench/measure_tree.py" -- \
        "$baseline/run.sh" all "$input" 2>>"$work/original.err" | tail -n1) && [[ $line == wall_s=* ]]; then
        break
      fi
      echo "  original: attempt $attempt failed (see its errors above); retrying" >&2
      line=""
      sleep 5
    done
    [[ -n $line ]] || { echo "  original: failed 3 times; skipped" >&2; continue; }
    echo "  $line" >&2
    times+=("$(sed -E 's/.*wall_s=([0-9.]+).*/\1/' <<<"$line")")
    theirs_mem="$(sed -E 's/.*peak_rss_mib=([0-9.]+) peak_pss_mib=([0-9.]+).*/\1 MiB RSS, \2 MiB PSS/' <<<"$line")"
    if [[ -n $expected ]]; then
      if cmp -s <(python3 -m json.tool "$work/output.json") <(python3 -m json.tool "$expected"); then
        echo "  original's output: same as distbank's" >&2
      else
        echo "  original's output: DIFFERS from distbank's" >&2
      fi
    fi
  done
  ((${#times[@]})) && theirs=$(printf '%s\n' "${times[@]}" | median)
}

row() { # workload ours theirs extra
  local ratio="—"
  [[ -n $3 && -n $2 ]] && ratio=$(awk -v a="$3" -v b="$2" 'BEGIN {printf "%.0f×", a / b}')
  rows+=("| $1 | ${2:+$2 s} | ${3:+$3 s} | $ratio | $4 |")
}

if ((smoke)); then
  ours_bench "spec example" examples/input.json --runs 1
  "$bin" run examples/input.json -o "$work/expected.json" >/dev/null 2>&1
  theirs_bench "$root/examples/input.json" 1 "$work/expected.json"
  row "spec example (3 branches)" "$ours" "$theirs" "RSS ours ${ours_rss} MiB, original ${theirs_mem:-—}"
  ours_bench "course 50" tests/fixtures/course_50_input.json --runs 1 --expect tests/fixtures/course_50_output.json
  row "course 50 branches" "$ours" "" ""
  ours_bench "generated" --generate 5x60 --runs 1
  step "distbank: concurrent (smoke)"
  "$bin" bench --concurrent 8 --branches 3 --duration 2 --sample-every 0.5 >&2 2>/dev/null
  step "calibration: the same clients against no-op servers (smoke)"
  "$ceiling" 8 3 1 >&2
else
  ours_bench "course 50" tests/fixtures/course_50_input.json --runs 5 --expect tests/fixtures/course_50_output.json
  theirs_bench "$root/tests/fixtures/course_50_input.json" 3 "$root/tests/fixtures/course_50_output.json"
  row "course two-round input, 50 branches, 200 events" "$ours" "$theirs" \
    "peak RSS: ours ${ours_rss} MiB, original ${theirs_mem:-—}"
  ours_bench "course 100" tests/fixtures/course_100_input.json --runs 3 --expect tests/fixtures/course_100_output.json
  theirs_bench "$root/tests/fixtures/course_100_input.json" 1 "$root/tests/fixtures/course_100_output.json"
  row "course input, 100 branches, 200 events" "$ours" "$theirs" \
    "peak RSS: ours ${ours_rss} MiB, original ${theirs_mem:-—}"
  ours_bench "generated 20x1000" --generate 20x1000 --runs 3 --save-input "$work/gen20.json"
  "$bin" run "$work/gen20.json" -o "$work/gen20-out.json" >/dev/null 2>&1
  theirs_bench "$work/gen20.json" 1 "$work/gen20-out.json"
  row "generated, 20 branches, 1000 events" "$ours" "$theirs" \
    "peak RSS: ours ${ours_rss} MiB, original ${theirs_mem:-—}"
  ours_bench "generated 200x2000" --generate 200x2000 --runs 1
  row "generated, 200 branches, 2000 events" "$ours" "" "peak RSS: ours ${ours_rss} MiB"
  step "distbank: concurrent, 64 clients, 5 branches"
  "$bin" bench --concurrent 64 --branches 5 --duration "${BENCH_CONCURRENT_SECONDS:-30}" 2>/dev/null | tee "$work/conc.txt" >&2
  rows+=("| concurrent mix, 64 clients, 5 branches | $(awk '/^bench concurrent/ {print $(NF-3), $(NF-2)}' "$work/conc.txt" | tr -d ,) | — | — | $(awk '/^  all/ {print "p50", $3, $4, "p99", $6, $7}' "$work/conc.txt") |")
  # The same mix with every branch on one work-stealing runtime (the layout before per-core
  # runtimes), and the machine's ceiling for these clients' unary calls against servers that do
  # nothing: this VM's speed moves by tens of percent within an hour, so both come from this run.
  step "distbank: concurrent, 64 clients, 5 branches, --runtimes shared (10 s)"
  "$bin" bench --concurrent 64 --branches 5 --duration 10 --runtimes shared 2>/dev/null | tee "$work/conc-shared.txt" >&2
  rows+=("| same mix, branches on one work-stealing runtime (\`--runtimes shared\`, 10 s) | $(awk '/^bench concurrent/ {print $(NF-3), $(NF-2)}' "$work/conc-shared.txt" | tr -d ,) | — | — | $(awk '/^  all/ {print "p50", $3, $4, "p99", $6, $7}' "$work/conc-shared.txt") |")
  step "calibration: the same 64 clients against 5 no-op servers (examples/grpc_ceiling, 10 s)"
  "$ceiling" 64 5 10 | tee "$work/ceiling.txt" >&2
  rows+=("| calibration: the same clients' calls to 5 no-op servers | $(awk '{for (i = 1; i <= NF; i++) if ($i == "calls/s,") print $(i-1), "calls/s"}' "$work/ceiling.txt") | — | — | $(sed -n 's/.*CPU \(.*\) per call/CPU \1 per call/p' "$work/ceiling.txt") |")
  ghz=${GHZ:-$(scripts/ghz.sh || true)}
  if [[ -x $ghz ]]; then
    step "ghz against one branch's customer API"
    "$bin" server examples/input.json --base-port 56050 >/dev/null 2>&1 &
    server=$!
    "$bin" health-check --addr-template "127.0.0.1:5605{id}" --count 3 --timeout 60 >/dev/null 2>&1 || true
    "$ghz" --insecure --proto proto/banks.proto --call Bank.MsgDelivery \
      -d '{"customer_id":1,"operation":"deposit","amount":1}' -c 64 -z 10s 127.0.0.1:56051 | tee "$work/ghz-dep.txt" >&2
    "$ghz" --insecure --proto proto/banks.proto --call Bank.MsgDelivery \
      -d '{"customer_id":1,"operation":"query","amount":0}' -c 64 -z 10s 127.0.0.1:56051 | tee "$work/ghz-q.txt" >&2
    kill -TERM "$server"; wait "$server" || true
    for kind in dep q; do
      rows+=("| ghz, 64 connections' load on branch 1 of 3 ($([[ $kind == dep ]] && echo deposits || echo queries)) | $(awk '/Requests\/sec/ {printf "%.0f ops/s", $2}' "$work/ghz-$kind.txt") | — | — | $(awk '/ 50 % in/ {p50=$4" "$5} / 99 % in/ {p99=$4" "$5} END {print "p50", p50, "p99", p99}' "$work/ghz-$kind.txt") |")
    done
  fi
fi

printf '\n| workload | distbank (median total) | original, no sleeps (median) | ratio | notes |\n|---|---|---|---|---|\n'
printf '%s\n' "${rows[@]}"
