# syntax=docker/dockerfile:1
# The volmig operator (the master in a cluster). Build from the repository root:
#   docker build -f images/operator.Dockerfile -t volmig-operator:0.1.0 .
# Runtime: distroless cc (glibc, no shell), non-root (uid 65532), as the chart runs it.

FROM rust:1-bookworm AS build
WORKDIR /src
COPY . .
# The proto is compiled with protox (pure Rust): no protoc, no system libraries.
RUN --mount=type=cache,target=/usr/local/cargo/registry \
    --mount=type=cache,target=/usr/local/cargo/git \
    --mount=type=cache,target=/src/target \
    cargo build --release --locked -p volmig-operator \
 && install -D -m 0755 target/release/volmig-operator /out/volmig-operator

FROM gcr.io/distroless/cc-debian12:nonroot
COPY --from=build /out/volmig-operator /usr/local/bin/volmig-operator
USER 65532:65532
EXPOSE 8080 8081
ENTRYPOINT ["/usr/local/bin/volmig-operator"]
CMD ["run"]
