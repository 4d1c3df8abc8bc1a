#!/usr/bin/env bash
# Deletes the e2e kind cluster and detaches the loop devices run.sh attached
# in its nodes (they belong to the host kernel and outlive the containers).
#   e2e/teardown.sh [CLUSTER]     (default: $CLUSTER or volmig-e2e)
set -euo pipefail
CLUSTER=${1:-${CLUSTER:-volmig-e2e}}
for node in $(kind get nodes --name "$CLUSTER" 2>/dev/null); do
  docker exec "$node" bash -c '
    for img in /var/local-disks/slow.img /var/local-disks/fast.img; do
      for dev in $(losetup -j "$img" -O NAME -n 2>/dev/null); do losetup -d "$dev" || true; done
    done' || true
done
kind delete cluster --name "$CLUSTER"
