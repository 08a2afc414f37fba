# syntax=docker/dockerfile:1
# Multi-stage build: compile in the Rust image, run on a slim Debian as a non-root
# user with nothing but the binary, CA certificates and a health probe. Migrations
# and the default config are compiled into the binary.
FROM rust:1.95-bookworm AS build
WORKDIR /src

# >>> dependency cache
# The dependencies alone, from the manifest and lockfile: this layer is reused
# until Cargo.toml, Cargo.lock or build.rs change. Every target the manifest
# declares gets a placeholder file (cargo refuses a manifest naming a missing
# one), and no `|| true`: if this stage breaks, the image build fails.
# .ci/dockerfile-cache-check.sh runs exactly the lines of this block in a scratch
# directory, so CI catches a target added without a stub.
COPY Cargo.toml Cargo.lock build.rs ./
COPY deploy/stub-targets.sh deploy/stub-targets.sh
RUN deploy/stub-targets.sh \
 && cargo build --release --locked --bin provisioner
# <<< dependency cache

# The real sources. `touch` makes the placeholders' outputs older than the
# sources (COPY keeps the build context's times, which may predate the stub
# build), so cargo rebuilds the crate itself and nothing else. Only the product
# binary is built: the load tools (`provisioner-load`) never go into the image.
# The release profile keeps line tables for readable backtraces; compressing
# them (backtraces still resolve file:line) takes the binary from ~119 MB to
# ~47 MB. Stripping them would give ~26 MB and backtraces without lines.
COPY . .
RUN touch src/main.rs src/lib.rs \
 && cargo build --release --locked --bin provisioner \
 && objcopy --compress-debug-sections=zlib target/release/provisioner

FROM debian:bookworm-slim AS runtime
# CA certificates for TLS to a managed PostgreSQL, RabbitMQ (amqps) and Clerk's
# Backend API; nothing else (no compiler, no curl).
RUN apt-get update \
 && apt-get install -y --no-install-recommends ca-certificates \
 && rm -rf /var/lib/apt/lists/* \
 && useradd --system --uid 10001 --user-group --home-dir /nonexistent --shell /usr/sbin/nologin provisioner
COPY --from=build /src/target/release/provisioner /usr/local/bin/provisioner
COPY deploy/healthcheck.sh /usr/local/bin/provisioner-healthcheck
USER 10001:10001
# Production unless told otherwise: the image refuses to start with the
# development secret and tokens compiled into the binary (and with API or ops
# tokens shorter than 32 characters), so a container that listens on 0.0.0.0
# never serves with the secrets everybody can read in config/default.toml. A
# local stack sets PROVISIONER_ENV=development itself (compose.yaml).
ENV PROVISIONER_ENV=production \
    PROVISIONER_LISTEN=0.0.0.0:8080 \
    LOG_FORMAT=json
EXPOSE 8080
# Health probe (deploy/healthcheck.sh; the image has no curl or wget): for `serve`,
# GET /healthz on PROVISIONER_LISTEN through bash's /dev/tcp; for `provisioner
# worker`, which has no HTTP listener, that the process holds a connection to the
# broker. It tells the two apart by the container's command. Readiness for a load
# balancer is GET /readyz (database and broker reachable).
HEALTHCHECK --interval=10s --timeout=3s --start-period=20s --retries=3 \
  CMD ["provisioner-healthcheck"]
ENTRYPOINT ["provisioner"]
CMD ["serve"]
