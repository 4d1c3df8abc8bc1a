# syntax=docker/dockerfile:1
# Builds examples/blockserve for e2e/block.sh (copied into a kind node).
#   docker build -f e2e/blockserve.Dockerfile -o type=local,dest=OUT .
FROM rust:1-bookworm AS build
# libclang: bindgen in the ublk frontend's libublk-rs-sys.
RUN apt-get update \
 && apt-get install -y --no-install-recommends libclang-dev \
 && rm -rf /var/lib/apt/lists/*
WORKDIR /src
COPY . .
RUN --mount=type=cache,target=/usr/local/cargo/registry \
    --mount=type=cache,target=/usr/local/cargo/git \
    --mount=type=cache,target=/src/target \
    cargo build --release --locked -p volmig-frontends --example blockserve \
 && install -D -m 0755 target/release/examples/blockserve /out/blockserve

FROM scratch
COPY --from=build /out/blockserve /blockserve
