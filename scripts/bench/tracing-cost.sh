#!/usr/bin/env bash
# The cost of the tracing code when tracing is off (observability issue: < 3 % on the 50-branch
# replay). Wall time on this VM moves by ±30 % between rounds, far more than the effect, so this
# counts instructions instead (valgrind --tool=callgrind, deterministic up to thread timing):
#
#   A = this checkout, release build, no OTLP endpoint (tracing off);
#   B = the same commit with the tracing hooks compiled out (scripts/bench/tracing-compiled-out.patch:
#       no span objects, no `.instrument`, no traceparent in log entries, no atomic check);
#
# each running `distbank run` on the course's 50-branch input, RUNS times interleaved (Raft timers
# lengthened so valgrind's slowdown causes no elections; both get the same settings). Prints the
# instruction counts and the difference of the means with its standard error.
#
# Usage: scripts/bench/tracing-cost.sh [RUNS]     (default 7; ~1.5 min per run pair + two builds)
# Needs: valgrind (apt-get install valgrind), git.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/../.."
root=$PWD
runs=${1:-7}
command -v valgrind >/dev/null || { echo "tracing-cost: needs valgrind (apt-get install valgrind)" >&2; exit 1; }

work=$(mktemp -d "${TMPDIR:-/tmp}/distbank-tracing-cost.XXXXXX")
cleanup() { git -C "$root" worktree remove --force "$work/b" >/dev/null 2>&1 || true; rm -rf "$work"; }
trap cleanup EXIT

cargo build --locked --release --quiet
a="$root/target/release/distbank"
git -C "$root" worktree add --quiet --detach "$work/b" HEAD
git -C "$work/b" apply "$root/scripts/bench/tracing-compiled-out.patch"
echo "tracing-cost: building B (tracing compiled out) in $work/b" >&2
(cd "$work/b" && CARGO_TARGET_DIR="$root/target/tracing-compiled-out" cargo build --locked --release --quiet 2>/dev/null)
b="$root/target/tracing-compiled-out/release/distbank"

count() { # binary -> instructions
  RUST_LOG=error valgrind --tool=callgrind --callgrind-out-file=/dev/null "$1" run \
    tests/fixtures/course_50_input.json -o "$work/out.json" --heartbeat-ms 500 --election-timeout-ms 10000 2>&1 |
    sed -n 's/.*I *refs: *//p' | tr -d ,
  cmp -s <(python3 -m json.tool "$work/out.json") <(python3 -m json.tool tests/fixtures/course_50_output.json) ||
    { echo "tracing-cost: wrong output" >&2; exit 1; }
}
: >"$work/counts"
for ((i = 1; i <= runs; i++)); do
  # Alternate which goes first, so drift in the machine's state hits both alike.
  if ((i % 2)); then order=(A B); else order=(B A); fi
  for v in "${order[@]}"; do
    n=$(count "$([[ $v == A ]] && echo "$a" || echo "$b")")
    echo "$v $n" | tee -a "$work/counts" >&2
  done
done
python3 - "$work/counts" <<'PY'
import statistics as st, sys
rows = [l.split() for l in open(sys.argv[1])]
a = [int(n) for v, n in rows if v == "A"]
b = [int(n) for v, n in rows if v == "B"]
se = (st.variance(a) / len(a) + st.variance(b) / len(b)) ** 0.5
print(f"tracing off (A): mean {st.mean(a)/1e6:.1f} M instructions, min {min(a)/1e6:.1f} M ({len(a)} runs)")
print(f"compiled out (B): mean {st.mean(b)/1e6:.1f} M instructions, min {min(b)/1e6:.1f} M ({len(b)} runs)")
print(f"cost of tracing off: {100*(st.mean(a)/st.mean(b)-1):+.2f} % ± {100*se/st.mean(b):.2f} % (1 SE); "
      f"minimum {100*(min(a)/min(b)-1):+.2f} %")
PY
