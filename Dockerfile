# The images of this repository, one stage each: `builder` compiles the four static binaries once (so building one
# image warms the cache for the others), and each runtime stage copies one of them onto an empty (scratch) base, run as
# a numeric non-root user:
#   petra      Petra: answers GET / with hello over HTTPS with mutual TLS
#   klaus      Klaus: calls Petra and answers hello world
#   slowlink   a TCP proxy that adds a round trip with jitter (noxious, the Rust port of Toxiproxy), the link that
#              docker-compose.split.yml puts between Klaus and Petra
#   tracesink  a small OTLP/HTTP trace receiver, for docker-compose.observability.yml
# Build them with `cargo xtask images`, or one with: docker build --target petra -t petra:dev .
# (the compose files name the stage as `build.target`).
ARG RUST_IMAGE=rust:1.95.0-slim-bookworm

FROM ${RUST_IMAGE} AS builder
WORKDIR /src
# The supply-chain tools, from the crates registry through the builder's cargo configuration, pinned and --locked:
# cargo-auditable embeds each binary's dependency list in it (a `.dep-v0` section that `cargo audit bin`, Trivy, Grype
# and Syft read), cargo-cyclonedx writes the CycloneDX SBOM each image carries at /sbom.cdx.json. Installed before
# RUSTFLAGS is set (with +crt-static and no --target, cargo would link the tools' proc-macros statically, which fails)
# and before any project file is copied, so this layer is built once per builder image and cached after that.
RUN cargo install --locked cargo-auditable@0.7.7 cargo-cyclonedx@0.5.9
# A static glibc binary runs in an empty (scratch) image; CARGO_TERM_COLOR keeps build logs readable.
ENV CARGO_TERM_COLOR=never \
    RUSTFLAGS="-C target-feature=+crt-static"
# The Rust target, derived from the build platform in this one place: BuildKit's TARGETARCH where it is set, the
# builder's own `uname -m` under the classic builder. amd64 is built and tested on our machines; arm64 (Apple silicon,
# Graviton) builds the same way on an arm64 host, from a builder image with that target's standard library.
ARG TARGETARCH
RUN arch="${TARGETARCH:-$(uname -m)}" \
 && case "$arch" in \
      amd64|x86_64) echo x86_64-unknown-linux-gnu ;; \
      arm64|aarch64) echo aarch64-unknown-linux-gnu ;; \
      *) echo "cannot build for $arch: the images are built for amd64 and arm64" >&2; exit 1 ;; \
    esac > /rust-target
# Dependencies get their own layer: only the manifests and stub sources are copied, so this slow layer is rebuilt
# only when a manifest or the lock file changes, not when a source file does.
COPY Cargo.toml Cargo.lock rust-toolchain.toml ./
COPY serving/Cargo.toml serving/
COPY petra/Cargo.toml petra/
COPY klaus/Cargo.toml klaus/
COPY slowlink/Cargo.toml slowlink/
COPY tracesink/Cargo.toml tracesink/
COPY xtask/Cargo.toml xtask/
# noxious, patched (vendor/README.md): the root manifest's [patch] points here, so it belongs with the manifests.
COPY vendor vendor
RUN mkdir -p serving/src petra/src klaus/src slowlink/src tracesink/src xtask/src \
 && touch serving/src/lib.rs petra/src/lib.rs klaus/src/lib.rs slowlink/src/lib.rs tracesink/src/lib.rs \
 && for main in petra/src/main.rs klaus/src/main.rs slowlink/src/main.rs tracesink/src/main.rs xtask/src/main.rs; do echo 'fn main() {}' > "$main"; done \
 && target="$(cat /rust-target)" \
 && cargo auditable build --release --locked --target "$target" -p petra -p klaus -p slowlink -p tracesink \
 && cargo cyclonedx --format json --spec-version 1.5 --target "$target" \
 && mkdir -p /out \
 && cp petra/petra.cdx.json klaus/klaus.cdx.json slowlink/slowlink.cdx.json tracesink/tracesink.cdx.json /out/
# Then the real sources. COPY keeps their old modification times, so touch them: cargo must see them as newer
# than the stub build, or it would keep the stub binaries.
COPY serving/build.rs serving/
COPY serving/src serving/src
COPY petra/src petra/src
COPY klaus/src klaus/src
COPY slowlink/src slowlink/src
COPY tracesink/src tracesink/src
# The git revision that build_info reports (`cargo xtask images` passes the checkout's; the build sees no .git).
ARG GIT_REVISION=unknown
RUN find serving/src petra/src klaus/src slowlink/src tracesink/src -name '*.rs' -exec touch {} + \
 && target="$(cat /rust-target)" \
 && cargo auditable build --release --locked --target "$target" -p petra -p klaus -p slowlink -p tracesink \
 && mkdir -p /out/certs \
 && chown 65532:65532 /out/certs \
 && for bin in petra klaus slowlink tracesink; do cp "target/$target/release/$bin" /out/; done

# What every runtime stage shares: an empty base, the numeric non-root user, and the labels that do not name the image.
# Each stage below adds its binary, its SBOM (the CycloneDX list of the binary's crates, from Cargo.lock, for this
# target, at /sbom.cdx.json for scanners and auditors), its ports, entry point, health check, title and description.
FROM scratch AS runtime
USER 65532:65532
ARG VERSION=dev
ARG GIT_REVISION=unknown
LABEL org.opencontainers.image.title="petra-klaus-runtime" \
      org.opencontainers.image.description="The base of the Petra and Klaus images; each stage below names its image." \
      org.opencontainers.image.source="https://example.invalid/petra-klaus" \
      org.opencontainers.image.licenses="Apache-2.0" \
      org.opencontainers.image.version="${VERSION}" \
      org.opencontainers.image.revision="${GIT_REVISION}"

FROM runtime AS tracesink
COPY --from=builder /out/tracesink /tracesink
COPY --from=builder /out/tracesink.cdx.json /sbom.cdx.json
EXPOSE 4318
# Configured by TRACESINK_LISTEN (default 0.0.0.0:4318) and TRACESINK_SPANS; stops on SIGTERM.
ENTRYPOINT ["/tracesink"]
# For `docker run`; compose sets its own. The flag connects to the sink's own listening address, since the image has
# no shell and no curl.
HEALTHCHECK --interval=10s --timeout=3s --retries=3 CMD ["/tracesink", "--healthcheck"]
LABEL org.opencontainers.image.title="tracesink" \
      org.opencontainers.image.description="A small OTLP/HTTP trace receiver for looking at traces locally."

FROM runtime AS slowlink
COPY --from=builder /out/slowlink /slowlink
COPY --from=builder /out/slowlink.cdx.json /sbom.cdx.json
EXPOSE 8443
# Configured by SLOWLINK_LISTEN, SLOWLINK_UPSTREAM, SLOWLINK_RTT_MS and SLOWLINK_JITTER_MS (or the flags); stops on
# SIGTERM.
ENTRYPOINT ["/slowlink"]
# For `docker run`; compose sets its own. The flag connects to the link's own listening address, since the image has
# no shell and no curl.
HEALTHCHECK --interval=10s --timeout=3s --retries=3 CMD ["/slowlink", "--healthcheck"]
LABEL org.opencontainers.image.title="slowlink" \
      org.opencontainers.image.description="A TCP proxy that adds a round trip with jitter, as a link between two clouds."

FROM runtime AS klaus
# Debian's CA bundle, for any TLS client that loads the system roots; our private CA comes from /certs.
COPY --from=builder /etc/ssl/certs/ca-certificates.crt /etc/ssl/certs/ca-certificates.crt
# An empty /certs owned by the runtime user: a fresh named volume mounted here copies this ownership, so the
# non-root `petra certs` job can write into it.
COPY --from=builder --chown=65532:65532 /out/certs /certs
COPY --from=builder /out/klaus /klaus
COPY --from=builder /out/klaus.cdx.json /sbom.cdx.json
EXPOSE 8080 9090
ENTRYPOINT ["/klaus"]
# For `docker run`; compose files and Kubernetes set their own probes. The subcommand probes /livez on the
# admin port (ADMIN_ADDR), since the image has no shell and no curl.
HEALTHCHECK --interval=10s --timeout=3s --retries=3 CMD ["/klaus", "healthcheck"]
LABEL org.opencontainers.image.title="klaus" \
      org.opencontainers.image.description="Klaus calls Petra over HTTPS with mutual TLS and answers hello world."

FROM runtime AS petra
# No CA bundle: Petra makes no outgoing TLS calls, and the only CA it trusts (for client certificates) is the private
# one in TLS_CLIENT_CA_FILE.
# Empty /certs, /certs/petra and /certs/klaus owned by the runtime user: a fresh named volume mounted at one of them
# copies this ownership, so the non-root `petra certs` job can write the CA (volume `ca` at /certs) and each
# service's files (its own volume at /certs/petra, /certs/klaus) in docker-compose.yml.
COPY --from=builder --chown=65532:65532 /out/certs /certs
COPY --from=builder --chown=65532:65532 /out/certs /certs/petra
COPY --from=builder --chown=65532:65532 /out/certs /certs/klaus
COPY --from=builder /out/petra /petra
COPY --from=builder /out/petra.cdx.json /sbom.cdx.json
EXPOSE 8443 9090
ENTRYPOINT ["/petra"]
# For `docker run`; compose files and Kubernetes set their own probes. The subcommand probes /livez on the
# admin port (ADMIN_ADDR), since the image has no shell and no curl.
HEALTHCHECK --interval=10s --timeout=3s --retries=3 CMD ["/petra", "healthcheck"]
LABEL org.opencontainers.image.title="petra" \
      org.opencontainers.image.description="Petra answers GET / with hello, over HTTPS with mutual TLS."
