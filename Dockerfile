# distbank container image.
#
# Standard multi-stage Rust build: compile in the official Rust image with BuildKit/buildah cache
# mounts, ship only the binary on distroless (glibc + libgcc + CA bundle, no shell, UID 65532).
#
#   docker build -t distbank:0.1.0 .
#   podman build --pull=never -t distbank:0.1.0 .   # offline: scripts/build-image.sh makes the
#                                                    # base images locally first
#
# No system protoc is needed: build.rs uses the vendored one from the protoc-bin-vendored crate.
# Kept to the Dockerfile subset that buildah 1.28 understands (no heredocs, no COPY --link).

FROM rust:1.95-slim-bookworm AS build
WORKDIR /src
# .dockerignore is an allowlist: only the manifest, lock file, build script, protos and the Rust
# sources reach the build context.
COPY . .
# The registry and target directories live in cache mounts, so rebuilds are incremental; the
# binary is copied out of the target cache mount because cache mounts are not part of the layer.
# The release profile keeps line tables for backtraces: compress them (zlib, which Rust's
# backtraces read) instead of stripping them, which more than halves the binary.
# The target cache outlives any one checkout, and cargo decides by modification time: a source
# older than the cache's last build (edited before another checkout was built) would be taken
# as built. So the copied sources are touched first; this step only runs when they changed.
RUN --mount=type=cache,id=distbank-cargo-registry,target=/usr/local/cargo/registry,sharing=locked \
    --mount=type=cache,id=distbank-cargo-git,target=/usr/local/cargo/git,sharing=locked \
    --mount=type=cache,id=distbank-target,target=/src/target,sharing=locked \
    find . -path ./target -prune -o -type f -exec touch {} + \
 && cargo build --release --locked --bin distbank \
 && mkdir -p /out \
 && objcopy --compress-debug-sections=zlib target/release/distbank /out/distbank

FROM gcr.io/distroless/cc-debian12:nonroot
# checkov:skip=CKV_DOCKER_2: No HEALTHCHECK: one image runs both long-lived branches and the run-to-completion replay Job; Kubernetes uses the chart's native gRPC probes (grpc.health.v1), and `distbank health-check` serves the same purpose elsewhere.
LABEL org.opencontainers.image.title="distbank" \
      org.opencontainers.image.description="Replicated bank-branch service (gRPC + Raft)" \
      org.opencontainers.image.version="0.1.0" \
      org.opencontainers.image.licenses="Apache-2.0"
COPY --from=build /out/distbank /usr/local/bin/distbank
# Numeric user so Kubernetes can verify runAsNonRoot without a passwd lookup.
USER 65532:65532
# 50051: customer API + grpc.health.v1; 50052: peer-only Raft API.
EXPOSE 50051 50052
ENTRYPOINT ["/usr/local/bin/distbank"]
CMD ["--help"]
