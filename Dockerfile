# syntax=docker/dockerfile:1
# Multi-stage build: compile in the Rust image, run on a slim Debian with a
# non-root user. Migrations and the default config are compiled into the binary.
FROM rust:1.95-bookworm AS build
WORKDIR /src
# Cache dependencies: build a stub crate with the real manifest first (every target
# the manifest names needs a stub file, or cargo refuses it). Only the product binary
# is built: the load tools (`provisioner-load`) never go into the image.
COPY Cargo.toml Cargo.lock build.rs ./
RUN mkdir -p src/bin/provisioner-load benches migrations config \
 && echo 'fn main() {}' > src/main.rs && echo '' > src/lib.rs \
 && echo 'fn main() {}' > src/bin/provisioner-load/main.rs \
 && echo 'fn main() {}' > benches/signature.rs \
 && echo 'fn main() {}' > benches/provision_batch.rs \
 && cargo build --release --locked --bin provisioner || true
COPY . .
RUN touch src/main.rs src/lib.rs && cargo build --release --locked --bin provisioner

FROM debian:bookworm-slim
RUN apt-get update \
 && apt-get install -y --no-install-recommends ca-certificates \
 && rm -rf /var/lib/apt/lists/* \
 && useradd --system --uid 10001 --home-dir /nonexistent --shell /usr/sbin/nologin provisioner
COPY --from=build /src/target/release/provisioner /usr/local/bin/provisioner
USER 10001:10001
ENV PROVISIONER_LISTEN=0.0.0.0:8080 \
    LOG_FORMAT=json
EXPOSE 8080
# Liveness: GET /healthz; readiness: GET /readyz (database and broker reachable).
ENTRYPOINT ["provisioner"]
CMD ["serve"]
