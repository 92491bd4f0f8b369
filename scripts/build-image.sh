#!/usr/bin/env bash
# Builds the distbank image with podman from the top-level Dockerfile, offline:
#   1. scripts/base-images.sh (makes the three base images locally when they are missing),
#   2. podman build --pull=never -t distbank:0.1.0 .
#   3. prints the image size, and checks that it runs `distbank --help` as UID 65532.
#
# Usage: scripts/build-image.sh [--force-base] [--tag TAG]
#   --force-base   rebuild the base images too
#   --tag TAG      image tag (default distbank:0.1.0, the chart's default)
# With docker (and a registry) none of this is needed: `docker build -t distbank:0.1.0 .`
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
TAG="distbank:0.1.0"
base_args=()
while [[ $# -gt 0 ]]; do
  case "$1" in
    --force-base) base_args+=(--force) ;;
    --tag) [[ $# -ge 2 ]] || { echo "--tag needs a value" >&2; exit 2; }; TAG="$2"; shift ;;
    -h|--help) sed -n '2,/^set -euo pipefail/{/^set -euo/d;s/^# \{0,1\}//;p;}' "$0"; exit 0 ;;
    *) echo "unknown argument: $1" >&2; exit 2 ;;
  esac
  shift
done

log() { printf '[build-image] %s\n' "$*" >&2; }
die() { printf '[build-image] ERROR: %s\n' "$*" >&2; exit 1; }

"$ROOT/scripts/base-images.sh" "${base_args[@]}"

log "podman build --pull=never -t $TAG (cargo build --release --locked inside; several minutes cold)"
SECONDS=0
podman build --pull=never -t "$TAG" "$ROOT"
log "built $TAG in ${SECONDS}s"

size_bytes="$(podman image inspect --format '{{.Size}}' "$TAG")"
size_h="$(numfmt --to=iec --suffix=B "$size_bytes" 2>/dev/null || echo "${size_bytes} bytes")"
log "image size: $size_h ($size_bytes bytes)"

user="$(podman image inspect --format '{{.Config.User}}' "$TAG")"
entrypoint="$(podman image inspect --format '{{json .Config.Entrypoint}}' "$TAG")"
[[ "$user" == "65532:65532" ]] || die "image user is '$user', expected 65532:65532"
[[ "$entrypoint" == '["/usr/local/bin/distbank"]' ]] || die "entrypoint is $entrypoint"

# `--help` of the binary and of the subcommands the chart uses, with no network.
if ! help_out="$(podman run --rm --network none "$TAG" --help 2>&1)"; then
  printf '%s\n' "$help_out" >&2
  die "'distbank --help' failed in $TAG"
fi
printf '%s\n' "$help_out" | head -n 5 >&2
# The chart's contract with the binary: every subcommand and flag that helm/distbank passes.
declare -A chart_flags=(
  [branch]="--input --listen --peer-listen --peer-template --id-offset --voters"
  [replay]="--branch-addr --wait-timeout --output --upload-configmap"
  [health-check]="--addr-template --count"
)
for sub in branch replay health-check; do
  if ! sub_help="$(podman run --rm --network none "$TAG" "$sub" --help 2>&1)"; then
    die "'distbank $sub --help' failed in $TAG (helm/distbank runs 'distbank $sub')"
  fi
  for flag in ${chart_flags[$sub]}; do
    grep -qE -- "(^|[[:space:],])${flag}([[:space:]=<]|$)" <<<"$sub_help" ||
      die "'distbank $sub' has no $flag, which helm/distbank passes"
  done
done
log "the binary accepts every subcommand and flag the chart uses"

# The UID the process really runs as, and a clean SIGTERM stop: run a one-branch `distbank branch`
# (distroless has no shell or `id`, so read the process's Uid line from /proc on the host).
tmp="$(mktemp -d "${TMPDIR:-/tmp}/distbank-image-check.XXXXXX")"
cid=""
cleanup() {
  [[ -n "$cid" ]] && podman rm -f "$cid" >/dev/null 2>&1
  rm -rf "$tmp"
}
trap cleanup EXIT
printf '[{"id": 1, "type": "branch", "balance": 400}]\n' >"$tmp/input.json"
chmod 0644 "$tmp/input.json"
cid="$(podman run -d --network none -e POD_NAME=distbank-0 -v "$tmp/input.json:/etc/distbank/input.json:ro" \
  "$TAG" branch --input /etc/distbank/input.json --listen 127.0.0.1:50051 --peer-listen 127.0.0.1:50052 \
  --peer-template '127.0.0.{id}:50052')"
pid=0
for _ in $(seq 50); do
  pid="$(podman inspect --format '{{.State.Pid}}' "$cid")"
  [[ "$pid" -gt 0 ]] && break
  sleep 0.1
done
if [[ "$pid" -le 0 ]] || ! uid_line="$(grep '^Uid:' "/proc/$pid/status" 2>/dev/null)"; then
  podman logs "$cid" >&2 || true
  die "'distbank branch' did not keep running in $TAG"
fi
read -r _ ruid euid _ <<<"$uid_line"
[[ "$ruid" == 65532 && "$euid" == 65532 ]] || die "process runs as uid $ruid/$euid, expected 65532"
sleep 1
SECONDS=0
podman stop -t 10 "$cid" >/dev/null
stop_s=$SECONDS
code="$(podman inspect --format '{{.State.ExitCode}}' "$cid")"
podman logs "$cid" 2>&1 | tail -n 3 >&2
[[ "$code" == 0 || "$code" == 143 ]] || die "'distbank branch' exited with $code on SIGTERM"
[[ $stop_s -lt 10 ]] || die "'distbank branch' ignored SIGTERM (killed after the 10 s timeout)"
# The host's extra (proxy) CA certificates are for build time only: they must not be trusted by
# the runtime image.
podman cp "$cid:/etc/ssl/certs/ca-certificates.crt" "$tmp/bundle.crt"
for crt in "${EXTRA_CA_DIR:-/usr/local/share/ca-certificates}"/*.crt; do
  [[ -f "$crt" ]] || continue
  key_line="$(sed -n '2p' "$crt")"
  [[ -n "$key_line" ]] || continue
  if grep -qF -- "$key_line" "$tmp/bundle.crt"; then
    die "the runtime image trusts the host's build-time CA $(basename "$crt")"
  fi
done
log "OK: $TAG ($size_h) runs as UID 65532 (image user $user, entrypoint $entrypoint); 'distbank branch' stopped on SIGTERM in ${stop_s}s with exit code $code"
