# The e2e workload image: python3 + libnbd's Python bindings + writer.py.
#   docker build -f e2e/writer.Dockerfile -t volmig-e2e-writer:e2e e2e
FROM debian:bookworm-slim
RUN apt-get update \
 && apt-get install -y --no-install-recommends python3 python3-libnbd \
 && rm -rf /var/lib/apt/lists/*
COPY writer.py /usr/local/bin/writer.py
ENTRYPOINT ["python3", "/usr/local/bin/writer.py"]
