#!/usr/bin/env bash
# Make the three base images the Dockerfile needs, locally, from Debian packages and the host's
# Rust toolchain, for machines that cannot pull from a container registry:
#
#   docker.io/library/debian:bookworm-slim    debootstrap --variant=minbase, trimmed, podman import
#   docker.io/library/rust:1.95-slim-bookworm FROM the Debian image + gcc/libc6-dev/pkg-config +
#                                             the host toolchain, with the official image's ENV
#   gcr.io/distroless/cc-debian12:nonroot     dpkg -x of libc6/libgcc-s1/libstdc++6/libssl3/zlib1g/
#                                             tzdata/netbase/base-files + CA bundle + nonroot user
#
# With these the top-level Dockerfile builds unchanged (`podman build --pull=never`); elsewhere
# docker pulls the real images instead and this script is not needed.
#
# Idempotent: an image that already exists is kept unless --force is given.
# The host's extra CA certificates (/usr/local/share/ca-certificates/*.crt, e.g. an intercepting
# proxy's CA) are copied into the Rust *build* image only, so that cargo can fetch crates; they
# never reach the Debian or distroless images, the final image, or the repository.
#
# Usage: scripts/base-images.sh [--force] [--only debian|rust|distroless]... [--no-install]
# Env:   DEBIAN_MIRROR (default http://deb.debian.org/debian), DEBIAN_SECURITY_MIRROR,
#        RUST_TOOLCHAIN_DIR (default: `rustc --print sysroot`), EXTRA_CA_DIR
#        (default /usr/local/share/ca-certificates).
set -euo pipefail

readonly DEBIAN_IMAGE="docker.io/library/debian:bookworm-slim"
readonly RUST_MINOR="1.95"
readonly RUST_IMAGE="docker.io/library/rust:${RUST_MINOR}-slim-bookworm"
readonly DISTROLESS_IMAGE="gcr.io/distroless/cc-debian12:nonroot"

DEBIAN_MIRROR="${DEBIAN_MIRROR:-http://deb.debian.org/debian}"
DEBIAN_SECURITY_MIRROR="${DEBIAN_SECURITY_MIRROR:-http://deb.debian.org/debian-security}"
EXTRA_CA_DIR="${EXTRA_CA_DIR:-/usr/local/share/ca-certificates}"

force=0
install_deps=1
only=()

log() { printf '[base-images] %s\n' "$*" >&2; }
die() { printf '[base-images] ERROR: %s\n' "$*" >&2; exit 1; }

usage() {
  sed -n '2,/^set -euo pipefail/{/^set -euo/d;s/^# \{0,1\}//;p;}' "$0"
}

while [[ $# -gt 0 ]]; do
  case "$1" in
    --force) force=1 ;;
    --no-install) install_deps=0 ;;
    --only)
      [[ $# -ge 2 ]] || die "--only needs an argument (debian|rust|distroless)"
      case "$2" in debian|rust|distroless) only+=("$2") ;; *) die "unknown image '$2'" ;; esac
      shift ;;
    -h|--help) usage; exit 0 ;;
    *) die "unknown argument: $1 (see --help)" ;;
  esac
  shift
done

wanted() {
  [[ ${#only[@]} -eq 0 ]] && return 0
  local x
  for x in "${only[@]}"; do [[ "$x" == "$1" ]] && return 0; done
  return 1
}

workdir="$(mktemp -d "${TMPDIR:-/tmp}/distbank-base-images.XXXXXX")"
cleanup() { rm -rf "$workdir"; }
trap cleanup EXIT

# --- host prerequisites ---------------------------------------------------------------------------
need_pkgs=()
command -v podman >/dev/null 2>&1 || need_pkgs+=(podman buildah runc)
# netavark + aardvark-dns: container DNS with --network-alias (the CNI backend has none without
# the dnsname plugin); scripts/e2e.sh relies on it.
[[ -x /usr/lib/podman/netavark || -x /usr/libexec/podman/netavark ]] || need_pkgs+=(netavark aardvark-dns)
# netavark programs the container networks' NAT through iptables (a Recommends of podman, so
# --no-install-recommends leaves it out); without it every build step with a network fails with
# "netavark: No such file or directory".
command -v iptables >/dev/null 2>&1 || need_pkgs+=(iptables)
command -v debootstrap >/dev/null 2>&1 || need_pkgs+=(debootstrap)
if [[ ${#need_pkgs[@]} -gt 0 ]]; then
  if [[ $install_deps -eq 1 && $(id -u) -eq 0 ]] && command -v apt-get >/dev/null 2>&1; then
    log "installing ${need_pkgs[*]} with apt-get"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq
    apt-get install -y -qq --no-install-recommends "${need_pkgs[@]}" >/dev/null
  else
    die "missing tools: ${need_pkgs[*]}. Install them (Debian/Ubuntu: sudo apt-get install -y ${need_pkgs[*]}) and re-run."
  fi
fi

# Podman configuration. On hosts with cgroups v1 "hybrid", no systemd and low hard rlimits the
# defaults fail (crun refuses hybrid cgroups; the default ulimits exceed the hard limits). Write the
# known-good configuration when the system has none; otherwise leave the admin's file alone and
# only explain what to change if the smoke test below fails.
readonly PODMAN_CONF="/etc/containers/containers.conf"
nofile_hard="$(ulimit -Hn)"
[[ "$nofile_hard" == unlimited ]] && nofile_hard=1048576
podman_conf_text() {
  cat <<EOF
# Written by distbank scripts/base-images.sh (see docs/kubernetes.md, "Building the image").
[containers]
default_ulimits = ["nofile=${nofile_hard}:${nofile_hard}", "nproc=32768:32768"]
[engine]
pull_policy = "never"
runtime = "runc"
cgroup_manager = "cgroupfs"
events_logger = "file"
[network]
network_backend = "netavark"
EOF
}
if [[ -z "${CONTAINERS_CONF:-}" && ! -e "$PODMAN_CONF" ]]; then
  if [[ $(id -u) -eq 0 ]]; then
    log "writing $PODMAN_CONF (runc, cgroupfs, file events, ulimits within the hard limits)"
    mkdir -p "$(dirname "$PODMAN_CONF")"
    podman_conf_text >"$PODMAN_CONF"
  else
    log "no $PODMAN_CONF; if 'podman run' fails below, create it with:"
    podman_conf_text >&2
  fi
fi

podman_hint() {
  log "podman could not run a container. A configuration known to work on cgroups-v1/no-systemd hosts is"
  log "(put it in $PODMAN_CONF, or point CONTAINERS_CONF at a file with it):"
  podman_conf_text >&2
}

exists() { podman image exists "$1"; }

# --- 1. debian:bookworm-slim ---------------------------------------------------------------------
build_debian() {
  local root="$workdir/debian-rootfs"
  log "debootstrap --variant=minbase bookworm from $DEBIAN_MIRROR (about 30 s)"
  debootstrap --variant=minbase --components=main bookworm "$root" "$DEBIAN_MIRROR" \
    >"$workdir/debootstrap.log" 2>&1 || { tail -n 30 "$workdir/debootstrap.log" >&2; die "debootstrap failed"; }

  # The same apt sources and trimming as the official slim image.
  rm -f "$root/etc/apt/sources.list"
  cat >"$root/etc/apt/sources.list.d/debian.sources" <<EOF
Types: deb
URIs: ${DEBIAN_MIRROR}
Suites: bookworm bookworm-updates
Components: main
Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg

Types: deb
URIs: ${DEBIAN_SECURITY_MIRROR}
Suites: bookworm-security
Components: main
Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg
EOF
  cat >"$root/etc/dpkg/dpkg.cfg.d/docker" <<'EOF'
path-exclude /usr/share/doc/*
path-include /usr/share/doc/*/copyright
path-exclude /usr/share/man/*
path-exclude /usr/share/info/*
path-exclude /usr/share/locale/*
path-include /usr/share/locale/locale.alias
path-exclude /usr/share/lintian/*
EOF
  cat >"$root/etc/apt/apt.conf.d/docker-clean" <<'EOF'
DPkg::Post-Invoke { "rm -f /var/cache/apt/archives/*.deb /var/cache/apt/archives/partial/*.deb /var/cache/apt/*.bin || true"; };
APT::Update::Post-Invoke { "rm -f /var/cache/apt/archives/*.deb /var/cache/apt/archives/partial/*.deb /var/cache/apt/*.bin || true"; };
Dir::Cache::pkgcache "";
Dir::Cache::srcpkgcache "";
EOF
  printf 'Acquire::Languages "none";\n' >"$root/etc/apt/apt.conf.d/docker-no-languages"
  find "$root/usr/share/doc" -mindepth 1 -not -name copyright -not -type d -delete 2>/dev/null || true
  find "$root/usr/share/doc" -mindepth 1 -type d -empty -delete 2>/dev/null || true
  rm -rf "$root/usr/share/man/"* "$root/usr/share/info/"* "$root/usr/share/lintian" \
    "$root/var/lib/apt/lists/"* "$root/var/cache/apt/"*.bin "$root/var/cache/apt/archives/"*.deb \
    "$root/var/log/"*.log "$root/var/log/apt/"* "$root/tmp/"* "$root/root/.bash_history"
  find "$root/usr/share/locale" -mindepth 1 -maxdepth 1 -not -name locale.alias -exec rm -rf {} + 2>/dev/null || true
  # No host identity in the image.
  : >"$root/etc/hostname"
  rm -f "$root/etc/resolv.conf"
  : >"$root/etc/machine-id"

  log "importing $DEBIAN_IMAGE"
  tar --numeric-owner --xattrs -C "$root" -c . |
    podman import --change 'CMD ["bash"]' --change 'ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin' \
      - "$DEBIAN_IMAGE" >/dev/null
  rm -rf "$root"

  if ! podman run --rm --network none "$DEBIAN_IMAGE" true; then
    podman_hint
    die "smoke test of $DEBIAN_IMAGE failed"
  fi
}

# --- 2. rust:1.95-slim-bookworm ------------------------------------------------------------------
build_rust() {
  command -v rustc >/dev/null 2>&1 || die "rustc not found: install Rust ${RUST_MINOR} (rustup) on the host"
  local sysroot version triple
  sysroot="${RUST_TOOLCHAIN_DIR:-$(rustc --print sysroot)}"
  version="$("$sysroot/bin/rustc" --version | awk '{print $2}')"
  triple="$("$sysroot/bin/rustc" -vV | sed -n 's/^host: //p')"
  [[ "$version" == "${RUST_MINOR}".* ]] ||
    die "host toolchain is rustc $version, but the image is tagged ${RUST_MINOR}: install it (rustup toolchain install ${RUST_MINOR}) and set RUST_TOOLCHAIN_DIR=\$(rustc +${RUST_MINOR} --print sysroot)"
  [[ "$triple" == x86_64-unknown-linux-gnu || "$triple" == aarch64-unknown-linux-gnu ]] ||
    die "unsupported host triple $triple (need a glibc Linux toolchain)"
  local toolchain="/usr/local/rustup/toolchains/${version}-${triple}"

  local ctx="$workdir/rust-ctx"
  mkdir -p "$ctx/ca"
  # Build-time trust only: the proxy CA goes into this builder image, never into the final image.
  local n=0 crt
  if [[ -d "$EXTRA_CA_DIR" ]]; then
    for crt in "$EXTRA_CA_DIR"/*.crt; do
      [[ -f "$crt" ]] || continue
      cp "$crt" "$ctx/ca/"
      n=$((n + 1))
    done
  fi
  log "building $RUST_IMAGE from $sysroot (rustc $version, $n extra CA cert(s) for build-time TLS)"

  # Step 1 (context: the CA files): Debian + compiler packages + build-time trust. The proxy CA
  # goes into this builder image only, never into the runtime image.
  local base_tag="localhost/distbank-rust-base:tmp"
  {
    printf 'FROM %s\n' "$DEBIAN_IMAGE"
    if [[ $n -gt 0 ]]; then printf 'COPY *.crt /usr/local/share/ca-certificates/\n'; fi
    cat <<'EOF'
RUN set -eux; \
    apt-get update; \
    apt-get install -y --no-install-recommends ca-certificates gcc libc6-dev pkg-config; \
    update-ca-certificates; \
    rm -rf /var/lib/apt/lists/*
EOF
  } >"$ctx/Containerfile.base"
  podman build --pull=never -f "$ctx/Containerfile.base" -t "$base_tag" "$ctx/ca" \
    >"$workdir/rust-base.log" 2>&1 || { tail -n 30 "$workdir/rust-base.log" >&2; die "building the Rust base layer failed"; }

  # Step 2 (context: the toolchain itself, read in place; share/doc ignored): the official image's
  # layout and ENV, with /usr/local/cargo/bin holding what rustup's proxies would.
  printf 'share/doc\nshare/doc/**\n' >"$ctx/toolchain.ignore"
  cat >"$ctx/Containerfile" <<EOF
FROM ${base_tag}
ENV RUSTUP_HOME=/usr/local/rustup \\
    CARGO_HOME=/usr/local/cargo \\
    PATH=/usr/local/cargo/bin:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin \\
    RUST_VERSION=${version}
COPY . ${toolchain}/
RUN set -eux; \\
    mkdir -p /usr/local/cargo/bin; \\
    for b in ${toolchain}/bin/*; do ln -s "\$b" "/usr/local/cargo/bin/\$(basename "\$b")"; done; \\
    printf 'default_toolchain = "%s"\\nprofile = "minimal"\\nversion = "12"\\n' "${version}-${triple}" > /usr/local/rustup/settings.toml; \\
    rustc --version; cargo --version
EOF
  local rc=0
  podman build --pull=never --ignorefile "$ctx/toolchain.ignore" -f "$ctx/Containerfile" \
    -t "$RUST_IMAGE" "$sysroot" >"$workdir/rust-build.log" 2>&1 || rc=$?
  podman rmi "$base_tag" >/dev/null 2>&1 || true   # untag; the layers stay as the image's parent
  [[ $rc -eq 0 ]] || { tail -n 30 "$workdir/rust-build.log" >&2; die "building $RUST_IMAGE failed"; }
}

# --- 3. gcr.io/distroless/cc-debian12:nonroot ----------------------------------------------------
build_distroless() {
  local ctx="$workdir/distroless-ctx"
  mkdir -p "$ctx"
  log "building $DISTROLESS_IMAGE from Debian packages (dpkg -x)"
  # No extra CA certificates here: the runtime trust store is Debian's ca-certificates bundle.
  cat >"$ctx/Containerfile" <<EOF
FROM ${DEBIAN_IMAGE} AS fetch
RUN set -eux; \\
    apt-get update; \\
    apt-get install -y --no-install-recommends ca-certificates; \\
    mkdir -p /debs /out; cd /debs; \\
    apt-get download libc6 libgcc-s1 libstdc++6 libssl3 zlib1g tzdata netbase base-files; \\
    for d in /debs/*.deb; do dpkg -x "\$d" /out; done; \\
    rm -rf /out/usr/share/doc /out/usr/share/man /out/usr/share/info /out/usr/share/lintian /out/usr/share/locale /out/usr/share/gcc /out/usr/share/gdb; \\
    mkdir -p /out/etc/ssl/certs /out/tmp /out/home/nonroot /out/root /out/var/lib/dpkg/status.d; \\
    cp /etc/ssl/certs/ca-certificates.crt /out/etc/ssl/certs/ca-certificates.crt; \\
    printf 'root:x:0:0:root:/root:/sbin/nologin\\nnobody:x:65534:65534:nobody:/nonexistent:/sbin/nologin\\nnonroot:x:65532:65532:nonroot:/home/nonroot:/sbin/nologin\\n' > /out/etc/passwd; \\
    printf 'root:x:0:\\nnobody:x:65534:\\nnonroot:x:65532:\\n' > /out/etc/group; \\
    printf 'hosts: files dns\\n' > /out/etc/nsswitch.conf; \\
    for d in /debs/*.deb; do dpkg-deb -f "\$d" > "/out/var/lib/dpkg/status.d/\$(dpkg-deb -f "\$d" Package)"; done; \\
    chmod 1777 /out/tmp; chmod 0700 /out/root; chown 65532:65532 /out/home/nonroot; chmod 0700 /out/home/nonroot

FROM scratch
COPY --from=fetch /out/ /
ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin \\
    SSL_CERT_FILE=/etc/ssl/certs/ca-certificates.crt
USER 65532:65532
WORKDIR /home/nonroot
EOF
  podman build --pull=never --layers=false -f "$ctx/Containerfile" -t "$DISTROLESS_IMAGE" "$ctx" \
    >"$workdir/distroless-build.log" 2>&1 ||
    { tail -n 30 "$workdir/distroless-build.log" >&2; die "building $DISTROLESS_IMAGE failed"; }
}

# --- main ---------------------------------------------------------------------------------------
for spec in "debian:$DEBIAN_IMAGE" "rust:$RUST_IMAGE" "distroless:$DISTROLESS_IMAGE"; do
  key="${spec%%:*}"
  image="${spec#*:}"
  wanted "$key" || continue
  if [[ $force -eq 0 ]] && exists "$image"; then
    log "$image exists (use --force to rebuild)"
    continue
  fi
  if [[ "$key" != debian ]] && ! exists "$DEBIAN_IMAGE"; then
    log "$image needs $DEBIAN_IMAGE, making it first"
    build_debian
  fi
  SECONDS=0
  "build_${key}"
  log "$image ready in ${SECONDS}s ($(podman image inspect --format '{{.Size}}' "$image" | numfmt --to=iec 2>/dev/null || echo '?') bytes)"
done

podman images --format '{{.Repository}}:{{.Tag}}  {{.Size}}' \
  | grep -E '^(docker\.io/library/(debian|rust)|gcr\.io/distroless/cc-debian12)' >&2 || true
