# syntax=docker/dockerfile:1
# The volmig node agent (the slave; a privileged DaemonSet in a cluster).
# Build from the repository root:
#   docker build -f images/agent.Dockerfile -t volmig-agent:0.1.0 .
# Runtime: debian slim (glibc; a shell and util-linux for debugging block
# devices on the node with kubectl exec). It runs as root: it opens host
# block devices.

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
    cargo build --release --locked -p volmig-node-agent \
 && install -D -m 0755 target/release/volmig-agent /out/volmig-agent

FROM debian:bookworm-slim
RUN apt-get update \
 && apt-get install -y --no-install-recommends util-linux mount e2fsprogs xfsprogs \
 && rm -rf /var/lib/apt/lists/*
COPY --from=build /out/volmig-agent /usr/local/bin/volmig-agent
EXPOSE 7443
ENTRYPOINT ["/usr/local/bin/volmig-agent"]
CMD ["serve", "--help"]
