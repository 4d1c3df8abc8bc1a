#!/usr/bin/env bash
# Deletes the e2e kind cluster, after detaching the loop devices made in its
# nodes: csi-driver-host-path's raw block volumes and volmig's FUSE + loop
# devices belong to the host kernel and outlive the node containers. Only
# loop devices whose backing file is under those drivers' directories are
# detached, never the host's others.
#   e2e/teardown.sh [CLUSTER]     (default: $CLUSTER or volmig-e2e)
set -euo pipefail
CLUSTER=${1:-${CLUSTER:-volmig-e2e}}
for node in $(kind get nodes --name "$CLUSTER" 2>/dev/null); do
  docker exec "$node" sh -c '
    losetup -n -O NAME,BACK-FILE -l 2>/dev/null | while read -r dev file; do
      case "$file" in
        /csi-data-dir/*|/var/lib/csi-hostpath-data/*|/var/lib/volmig/*) losetup -d "$dev" || true ;;
      esac
    done' || true
done
kind delete cluster --name "$CLUSTER"
