#!/usr/bin/env bash
# volmig's kernel block device for ../shared/peers/blockdev_peers.py --device:
#
#   volmig_device.sh IMG DEVFILE DIR [--direct]
#
# Starts a volmig-agent (FUSE + loop block frontend, its files in DIR),
# serves IMG as volume `vol` on a block device, writes the device's path to
# DEVFILE and waits. On SIGTERM (the peer script stops its systems so) it
# removes the device and stops the agent. The agent runs in its own session
# so that the signal reaches this script first.
set -euo pipefail
IMG=$1 DEVFILE=$2 DIR=$3
DIRECT=()
[ "${4:-}" = --direct ] && DIRECT=(--direct)
AGENT=${VOLMIG_AGENT:?VOLMIG_AGENT: the volmig-agent binary}
VOLMIG=${VOLMIG:?VOLMIG: the volmig binary}
tag=vmdev-$$
ctl=$DIR/$tag.ctl.sock
mkdir -p "$DIR"
setsid "$AGENT" serve --state-dir "$DIR/$tag.state" --control "$ctl" \
  --block fuse --block-dir "$DIR/$tag.block" ${VOLMIG_FUSE_WORKERS:+--fuse-workers $VOLMIG_FUSE_WORKERS} \
  >"$DIR/$tag.agent.log" 2>&1 &
agent=$!
cleanup() {
  # The peer script gives this 10 s before a SIGKILL: stay well inside it.
  # The device may be busy for a moment after the benchmark closed it (udev
  # probes it, the page cache drains): a few tries.
  for _ in 1 2 3 4 5; do
    timeout 2 "$VOLMIG" unserve --agent "unix://$ctl" vol >/dev/null 2>&1 && break
    sleep 0.3
  done
  kill -TERM "$agent" 2>/dev/null || true
  for _ in $(seq 30); do kill -0 "$agent" 2>/dev/null || break; sleep 0.1; done
  kill -KILL "$agent" 2>/dev/null || true
  wait "$agent" 2>/dev/null || true
  # An agent that still had the device keeps its FUSE mount (for the next
  # agent): this one is the last, so the device and the mount go, and the
  # peer script can remove its directory.
  mnt=$DIR/$tag.block/fuse
  # (not `mountpoint`: on a FUSE mount whose server is gone it fails with
  # ENOTCONN and says "not a mount point")
  if awk -v m="$mnt" '$5 == m { found = 1 } END { exit !found }' /proc/self/mountinfo; then
    losetup -j "$mnt/vol" -O NAME -n 2>/dev/null | xargs -r -n1 losetup -d 2>/dev/null || true
    umount -l "$mnt" 2>/dev/null || true
  fi
  exit 0
}
trap cleanup TERM INT
for _ in $(seq 300); do [ -S "$ctl" ] && break; sleep 0.1; done
"$VOLMIG" serve --agent "unix://$ctl" vol "$IMG" --frontend block:fuse "${DIRECT[@]}" >/dev/null
"$VOLMIG" volumes --agent "unix://$ctl" --json |
  python3 -c 'import json,sys; print(next(v["device"] for v in json.load(sys.stdin) if v["name"]=="vol"))' >"$DEVFILE.tmp"
mv "$DEVFILE.tmp" "$DEVFILE"
while kill -0 "$agent" 2>/dev/null; do sleep 0.5 & wait $! || true; done
