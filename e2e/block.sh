#!/usr/bin/env bash
# Kernel block frontends on a kind node: kernel NBD over netlink and ublk,
# each surviving a SIGKILL of the process that serves it.
#
# For each kind: examples/blockserve (volmig's block drivers, as the agent
# uses them) serves a file inside a kind node container as /dev/nbdN or
# /dev/ublkbN; the script makes ext4 on it, mounts it, runs a writer
# (4 KiB files, each written with fsync and its checksum logged), SIGKILLs
# blockserve mid-write, starts it again after DOWN seconds (it re-attaches
# from its record: NBD_CMD_RECONFIGURE with new sockets / ublk user
# recovery), checks the writer went on without an error, stops it, checks
# every logged file, unmounts, SIGTERMs blockserve (detach) and fscks the
# file.
#
# The nodes share the host's kernel, so the HOST needs the modules first:
#   sudo modprobe nbd ublk_drv
# Needs docker (BuildKit) and kind on the host; see e2e/README.md.
#
# Environment:
#   CLUSTER=volmig-block   kind cluster (created with one node if missing)
#   KEEP_CLUSTER=0         1: leave the cluster up afterwards
#   KINDS="nbd ublk"       which frontends to run
#   DOWN=1                 seconds blockserve stays dead
#   STALL_MAX=90           longest allowed gap between two acknowledged
#                          writes (NBD re-queues a request that was in
#                          flight at the kill when the block layer's 30 s
#                          timer fires: expect up to ~30 s there)
#   SIZE_MIB=512           size of the served file
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
CLUSTER=${CLUSTER:-volmig-block}
KEEP_CLUSTER=${KEEP_CLUSTER:-0}
KINDS=${KINDS:-nbd ublk}
DOWN=${DOWN:-1}
STALL_MAX=${STALL_MAX:-90}
SIZE_MIB=${SIZE_MIB:-512}
OUT=$(mktemp -d "${TMPDIR:-/tmp}/volmig-block.XXXXXX")
W=/var/lib/volmig-block   # work directory inside the node
CREATED=0

say() { echo "== $*"; }
die() { echo "e2e block: FAILED: $*" >&2; exit 1; }

for tool in docker kind; do
  command -v "$tool" >/dev/null || die "$tool is not installed (see e2e/README.md)"
done

teardown() {
  local rc=$?
  if [ $rc -ne 0 ] && [ -n "${NODE:-}" ]; then
    echo "---- node logs (also in $OUT) ----" >&2
    docker exec "$NODE" sh -c "tail -n 50 $W/*/bs.log $W/*/writer.err 2>/dev/null; dmesg | grep -Ei 'nbd|ublk' | tail -n 40" \
      >"$OUT/node.txt" 2>&1 || true
    cat "$OUT/node.txt" >&2
  fi
  if [ "$CREATED" = 1 ] && [ "$KEEP_CLUSTER" != 1 ]; then
    kind delete cluster --name "$CLUSTER" >/dev/null 2>&1 || echo "delete the cluster with: kind delete cluster --name $CLUSTER" >&2
  fi
  exit $rc
}
trap teardown EXIT

# ---- cluster and binary ------------------------------------------------------
if kind get clusters 2>/dev/null | grep -qx "$CLUSTER"; then
  say "using kind cluster $CLUSTER"
else
  say "creating kind cluster $CLUSTER"
  kind create cluster --name "$CLUSTER" --wait 120s
  CREATED=1
fi
NODE=$(kind get nodes --name "$CLUSTER" | head -n 1)
[ -n "$NODE" ] || die "cluster $CLUSTER has no node"
nx() { docker exec "$NODE" "$@"; }

say "building blockserve (examples/blockserve.rs) in rust:1-bookworm"
DOCKER_BUILDKIT=1 docker build -f e2e/blockserve.Dockerfile -o "type=local,dest=$OUT/bin" "$ROOT" >"$OUT/build.log" 2>&1 ||
  { tail -n 40 "$OUT/build.log" >&2; die "building blockserve failed"; }
docker cp "$OUT/bin/blockserve" "$NODE:/usr/local/bin/blockserve"
nx sh -c 'command -v mkfs.ext4 >/dev/null && command -v e2fsck >/dev/null && command -v unshare >/dev/null' ||
  nx sh -c 'apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq e2fsprogs util-linux >/dev/null' ||
  die "the node has no mkfs.ext4/e2fsck and cannot install e2fsprogs"

# ---- one kind ----------------------------------------------------------------
run_kind() {
  local kind=$1 d=$W/$1 mnt=/mnt/volmig-block-$1
  local module=$kind
  [ "$kind" = ublk ] && module=ublk_drv
  nx test -e "/sys/module/$module" ||
    die "the host kernel has no $module module loaded: run 'sudo modprobe $module' on the host"

  say "$kind: serving a ${SIZE_MIB} MiB file"
  nx sh -c "rm -rf $d && mkdir -p $d $mnt && truncate -s ${SIZE_MIB}M $d/vol.img"
  start_server() {
    # Its own mount namespace: a ublk/nbd server must not share one with
    # the users of its device (see libublk's README).
    nx sh -c "echo \$\$ > $d/bs.pid; exec unshare --mount --propagation private blockserve $kind $d/vol.img $d/record.json >>$d/bs.log 2>&1" &
    local _
    for _ in $(seq 1 60); do
      if nx grep -q '^device ' "$d/bs.log" 2>/dev/null &&
        [ "$(nx grep -c '^device ' "$d/bs.log")" -ge "$1" ]; then
        return 0
      fi
      sleep 0.5
    done
    nx cat "$d/bs.log" >&2 || true
    die "$kind: blockserve did not serve the device (start $1)"
  }
  start_server 1
  local dev
  dev=$(nx sh -c "grep '^device ' $d/bs.log | tail -n 1 | cut -d' ' -f2")
  say "$kind: $dev; mkfs.ext4 and mount"
  nx mkfs.ext4 -q -F "$dev"
  nx mount "$dev" "$mnt"

  say "$kind: writer (4 KiB files, fsync each)"
  cat >"$OUT/writer-$kind.sh" <<EOF
i=0
while [ ! -e $d/stop ]; do
  head -c 4096 /dev/urandom > $d/rec || exit 3
  sum=\$(sha256sum < $d/rec | cut -d' ' -f1)
  if ! dd if=$d/rec of=$mnt/r.\$i bs=4096 conv=fsync status=none 2>>$d/writer.err; then
    echo "write \$i failed" > $d/writer.failed; exit 1
  fi
  echo "\$i \$sum \$(date +%s.%N)" >> $d/acked
  i=\$((i+1))
done
echo done > $d/writer.done
EOF
  docker cp "$OUT/writer-$kind.sh" "$NODE:$d/writer.sh"
  nx sh -c "touch $d/acked; nohup sh $d/writer.sh >/dev/null 2>&1 &"
  sleep 3
  local before
  before=$(nx sh -c "wc -l < $d/acked")
  [ "$before" -gt 0 ] || die "$kind: the writer wrote nothing"

  say "$kind: SIGKILL blockserve with the writer running ($before writes so far), down ${DOWN}s"
  nx sh -c "kill -9 \$(cat $d/bs.pid)"
  sleep "$DOWN"
  nx test ! -e "$d/writer.failed" || die "$kind: the writer saw an error while the server was down: $(nx cat "$d/writer.err")"
  start_server 2
  say "$kind: blockserve re-attached $dev; waiting for the writer to go on"
  local after=$before _
  for _ in $(seq 1 "$STALL_MAX"); do
    after=$(nx sh -c "wc -l < $d/acked")
    [ "$after" -ge $((before + 20)) ] && break
    nx test ! -e "$d/writer.failed" || die "$kind: the writer saw an error after the restart: $(nx cat "$d/writer.err")"
    sleep 1
  done
  [ "$after" -ge $((before + 20)) ] || die "$kind: the writer did not go on within ${STALL_MAX}s of the restart"
  sleep 2
  nx touch "$d/stop"
  for _ in $(seq 1 60); do nx test -e "$d/writer.done" && break; sleep 1; done
  nx test -e "$d/writer.done" || die "$kind: the writer did not stop"
  nx test ! -e "$d/writer.failed" || die "$kind: the writer saw an error: $(nx cat "$d/writer.err")"

  local stall
  # shellcheck disable=SC2016 # awk's own $3, run in the node
  stall=$(nx awk 'NR>1 { g = $3 - p; if (g > m) m = g } { p = $3 } END { printf "%.3f", m }' "$d/acked")
  say "$kind: $(nx sh -c "wc -l < $d/acked") writes, longest gap ${stall}s"
  awk -v s="$stall" -v m="$STALL_MAX" 'BEGIN { exit !(s <= m) }' || die "$kind: a ${stall}s stall (STALL_MAX=$STALL_MAX)"

  say "$kind: every acknowledged write is there (after a remount)"
  nx umount "$mnt"
  nx mount "$dev" "$mnt"
  nx sh -c "while read -r i sum ts; do
      got=\$(sha256sum < $mnt/r.\$i | cut -d' ' -f1)
      [ \"\$got\" = \"\$sum\" ] || { echo \"r.\$i: \$got != \$sum\"; exit 1; }
    done < $d/acked" || die "$kind: an acknowledged write is missing or wrong"
  nx umount "$mnt"

  say "$kind: SIGTERM blockserve: detach"
  nx sh -c "kill -TERM \$(cat $d/bs.pid)"
  for _ in $(seq 1 30); do nx grep -q '^detached' "$d/bs.log" && break; sleep 1; done
  nx grep -q '^detached' "$d/bs.log" || die "$kind: blockserve did not detach"
  nx test ! -e "$d/record.json" || die "$kind: the record is still there after detach"
  case $kind in
    nbd) [ "$(nx cat "/sys/block/$(basename "$dev")/size")" = 0 ] || die "$kind: $dev still has a size after detach" ;;
    ublk) nx test ! -e "/sys/block/$(basename "$dev")" || die "$kind: $dev still exists after detach" ;;
  esac
  nx e2fsck -fn "$d/vol.img" >"$OUT/fsck-$kind.txt" 2>&1 || { cat "$OUT/fsck-$kind.txt" >&2; die "$kind: fsck found errors"; }
  say "$kind: PASSED (longest stall ${stall}s)"
}

for kind in $KINDS; do
  case $kind in
    nbd|ublk) run_kind "$kind" ;;
    *) die "unknown kind $kind (nbd or ublk)" ;;
  esac
done
echo "e2e block: PASSED: $KINDS"
