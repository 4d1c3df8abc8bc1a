#!/usr/bin/env bash
# End-to-end test on a real Kubernetes cluster (kind): install the chart,
# run a StatefulSet that writes checksummed 4 KiB blocks through the node
# agent's NBD socket, migrate its volume live from storage class e2e-slow to
# e2e-fast with a VolumeMigration, then check that every acknowledged write is
# on the target device and that the pod never restarted.
#
# Needs docker, kind, kubectl, helm (v3.8+ or v4) and python3 on the host;
# see e2e/README.md. Run from anywhere:  e2e/run.sh
#
# Environment:
#   CLUSTER=volmig-e2e   kind cluster name (created if missing)
#   KEEP_CLUSTER=0       1: leave the cluster (and its loop devices) up afterwards
#   SKIP_BUILD=0         1: use images already built and tagged :e2e
#   DISK_MIB=256         size of each loop device
#   WRITER_RATE=0        writes per second per writer connection (0 = unthrottled)
#   TIMEOUT=15m          how long the migration may take
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
CLUSTER=${CLUSTER:-volmig-e2e}
KEEP_CLUSTER=${KEEP_CLUSTER:-0}
SKIP_BUILD=${SKIP_BUILD:-0}
DISK_MIB=${DISK_MIB:-256}
WRITER_RATE=${WRITER_RATE:-0}
TIMEOUT=${TIMEOUT:-15m}
NS=volmig-system
APP_NS=e2e
TAG=e2e
OUT=$(mktemp -d "${TMPDIR:-/tmp}/volmig-e2e.XXXXXX")
K=(kubectl --context "kind-$CLUSTER")

say() { echo "== $*"; }
die() { echo "e2e: FAILED: $*" >&2; exit 1; }

for tool in docker kind kubectl helm python3; do
  command -v "$tool" >/dev/null || die "$tool is not installed (see e2e/README.md)"
done
[ -f charts/volmig/templates/crd-volumemigrations.yaml ] ||
  die "charts/volmig/templates/crd-volumemigrations.yaml is missing: the chart would install no CRD"

diagnose() {
  echo "---- diagnostics (also in $OUT) ----" >&2
  {
    "${K[@]}" get nodes -o wide
    "${K[@]}" get pods -A -o wide
    "${K[@]}" get pv,pvc -A -o wide
    "${K[@]}" get volumemigrations -A -o yaml
    "${K[@]}" -n "$APP_NS" describe volumemigration e2e-to-fast
    "${K[@]}" get events -A --sort-by=.lastTimestamp | tail -60
    "${K[@]}" -n "$NS" logs -l app.kubernetes.io/component=operator --all-containers --tail=200 --prefix
    "${K[@]}" -n "$NS" logs -l app.kubernetes.io/component=node-agent --all-containers --tail=200 --prefix
    "${K[@]}" -n "$APP_NS" logs writer-0 --tail=50
  } >"$OUT/diagnostics.txt" 2>&1 || true
  tail -150 "$OUT/diagnostics.txt" >&2
}

nodes() { kind get nodes --name "$CLUSTER"; }

teardown() {
  local rc=$?
  [ $rc -ne 0 ] && diagnose
  if [ "$KEEP_CLUSTER" = 1 ]; then
    echo "cluster kind-$CLUSTER kept (KEEP_CLUSTER=1); delete with: CLUSTER=$CLUSTER e2e/teardown.sh" >&2
  else
    "$ROOT/e2e/teardown.sh" "$CLUSTER" >/dev/null 2>&1 || echo "teardown of $CLUSTER failed; run e2e/teardown.sh $CLUSTER" >&2
  fi
  exit $rc
}
trap teardown EXIT

# ---- cluster -----------------------------------------------------------------
if kind get clusters 2>/dev/null | grep -qx "$CLUSTER"; then
  say "using kind cluster $CLUSTER"
else
  say "creating kind cluster $CLUSTER"
  kind create cluster --name "$CLUSTER" --config e2e/kind-config.yaml --wait 120s
fi

# ---- images ------------------------------------------------------------------
if [ "$SKIP_BUILD" != 1 ]; then
  say "building images"
  docker build -f images/operator.Dockerfile -t "volmig-operator:$TAG" .
  docker build -f images/agent.Dockerfile -t "volmig-agent:$TAG" .
  docker build -f e2e/writer.Dockerfile -t "volmig-e2e-writer:$TAG" e2e
fi
say "loading images into the cluster"
for img in "volmig-operator:$TAG" "volmig-agent:$TAG" "volmig-e2e-writer:$TAG"; do
  kind load docker-image --name "$CLUSTER" "$img"
done

# ---- two loop devices per node: /dev/e2e-slow and /dev/e2e-fast ----------------
# The node containers share the host kernel, so each node attaches its own
# image files and makes stable device nodes for them (the node's /dev may
# not have the loopN node the kernel hands out: make it).
say "loop devices on every node"
for node in $(nodes); do
  docker exec -e DISK_MIB="$DISK_MIB" "$node" bash -euc '
    mkdir -p /var/local-disks
    for d in slow fast; do
      img=/var/local-disks/$d.img link=/dev/e2e-$d
      if [ -b "$link" ] && [ -n "$(losetup -j "$img")" ]; then continue; fi
      truncate -s "${DISK_MIB}M" "$img"
      dev=$(losetup -f)
      n=${dev#/dev/loop}
      [ -b "$dev" ] || mknod "$dev" b 7 "$n"
      losetup "$dev" "$img"
      rm -f "$link" && mknod "$link" b 7 "$n"
      echo "$HOSTNAME: $link -> $dev ($img)"
    done'
done

# ---- storage classes and local block PVs ------------------------------------------
say "storage classes e2e-slow, e2e-fast and their local PVs (volumeMode Block)"
{
  for speed in slow fast; do
    echo ---; python3 e2e/render.py e2e/manifests/storageclass.yaml.in SPEED="$speed"
    for node in $(nodes); do
      echo ---; python3 e2e/render.py e2e/manifests/pv.yaml.in SPEED="$speed" NODE="$node" DISK_MIB="$DISK_MIB"
    done
  done
} >"$OUT/storage.yaml"
"${K[@]}" apply -f "$OUT/storage.yaml"

# ---- the chart ------------------------------------------------------------------
say "helm install volmig (agent exports data=/dev/e2e-slow on every node)"
helm --kube-context "kind-$CLUSTER" upgrade --install volmig charts/volmig -n "$NS" --create-namespace \
  --set operator.image.repository=volmig-operator --set operator.image.tag="$TAG" --set operator.image.pullPolicy=Never \
  --set agent.image.repository=volmig-agent --set agent.image.tag="$TAG" --set agent.image.pullPolicy=Never \
  --set 'agent.exports[0].name=data' --set 'agent.exports[0].device=/dev/e2e-slow' \
  --set operator.logLevel=debug --wait --timeout 5m
"${K[@]}" -n "$NS" rollout status daemonset/volmig-agent --timeout 3m
"${K[@]}" -n "$NS" rollout status deployment/volmig-operator --timeout 3m

# ---- the workload ---------------------------------------------------------------
say "StatefulSet writer: checksummed 4 KiB blocks through the agent's NBD socket"
"${K[@]}" create namespace "$APP_NS" --dry-run=client -o yaml | "${K[@]}" apply -f -
python3 e2e/render.py e2e/manifests/writer.yaml.in TAG="$TAG" DISK_MIB="$DISK_MIB" WRITER_RATE="$WRITER_RATE" |
  "${K[@]}" -n "$APP_NS" apply -f -
"${K[@]}" -n "$APP_NS" rollout status statefulset/writer --timeout 3m

acked_writes() {
  "${K[@]}" -n "$APP_NS" exec writer-0 -- cat /state/acked.json 2>/dev/null |
    python3 -c 'import json,sys; print(json.load(sys.stdin)["stats"]["writes"])' 2>/dev/null || echo 0
}
for _ in $(seq 60); do [ "$(acked_writes)" -ge 2000 ] && break; sleep 2; done
[ "$(acked_writes)" -ge 2000 ] || die "the writer did not get 2000 writes acknowledged in 2 minutes"
POD_UID=$("${K[@]}" -n "$APP_NS" get pod writer-0 -o jsonpath='{.metadata.uid}')
POD_NODE=$("${K[@]}" -n "$APP_NS" get pod writer-0 -o jsonpath='{.spec.nodeName}')
SOURCE_PV=$("${K[@]}" -n "$APP_NS" get pvc data-writer-0 -o jsonpath='{.spec.volumeName}')
say "writer-0 (uid $POD_UID) on $POD_NODE, source PV $SOURCE_PV, $(acked_writes) writes acknowledged"

# ---- the migration ---------------------------------------------------------------
say "VolumeMigration e2e-to-fast: data-writer-0 -> storage class e2e-fast"
"${K[@]}" -n "$APP_NS" apply -f e2e/manifests/migration.yaml
START=$(date +%s)
( while sleep 5; do
    "${K[@]}" -n "$APP_NS" get volumemigration e2e-to-fast --no-headers 2>/dev/null | sed 's/^/   /' || true
  done ) &
WATCH=$!
if ! "${K[@]}" -n "$APP_NS" wait volumemigration/e2e-to-fast \
     --for=jsonpath='{.status.phase}'=Completed --timeout="$TIMEOUT"; then
  kill "$WATCH" 2>/dev/null || true
  die "the VolumeMigration did not reach Completed within $TIMEOUT (phase: $("${K[@]}" -n "$APP_NS" get volumemigration e2e-to-fast -o jsonpath='{.status.phase}'))"
fi
kill "$WATCH" 2>/dev/null || true
say "Completed in $(( $(date +%s) - START )) s; stall $("${K[@]}" -n "$APP_NS" get volumemigration e2e-to-fast -o jsonpath='{.status.cutoverStall}')"

# Keep writing on the target for a while, then stop the writer (it stays up).
sleep 10
"${K[@]}" -n "$APP_NS" exec writer-0 -- touch /state/stop
for _ in $(seq 30); do "${K[@]}" -n "$APP_NS" exec writer-0 -- test -e /state/done 2>/dev/null && break; sleep 1; done
"${K[@]}" -n "$APP_NS" exec writer-0 -- test -e /state/done || die "the writer did not stop cleanly (an NBD error?)"
"${K[@]}" -n "$APP_NS" exec writer-0 -- cat /state/acked.json >"$OUT/acked.json"

# ---- verification -----------------------------------------------------------------
TARGET_PVC=$("${K[@]}" -n "$APP_NS" get volumemigration e2e-to-fast -o jsonpath='{.status.volumes[0].target}')
[ -n "$TARGET_PVC" ] || die "status.volumes[0].target is empty"
TARGET_PV=$("${K[@]}" -n "$APP_NS" get pvc "$TARGET_PVC" -o jsonpath='{.spec.volumeName}')
TARGET_SC=$("${K[@]}" get pv "$TARGET_PV" -o jsonpath='{.spec.storageClassName}')
TARGET_DEV=$("${K[@]}" get pv "$TARGET_PV" -o jsonpath='{.spec.local.path}')
TARGET_NODE=$("${K[@]}" get pv "$TARGET_PV" -o jsonpath='{.spec.nodeAffinity.required.nodeSelectorTerms[0].matchExpressions[0].values[0]}')
say "target: PVC $TARGET_PVC -> PV $TARGET_PV ($TARGET_SC, $TARGET_DEV on $TARGET_NODE)"
[ "$TARGET_SC" = e2e-fast ] || die "the target PV is in storage class '$TARGET_SC', not e2e-fast"
[ "$TARGET_NODE" = "$POD_NODE" ] || die "the target is on $TARGET_NODE, the workload on $POD_NODE"

say "every acknowledged block on the target device (read raw on $TARGET_NODE)"
docker exec "$TARGET_NODE" cat "$TARGET_DEV" >"$OUT/target.img"
python3 e2e/writer.py verify --acked "$OUT/acked.json" --image "$OUT/target.img"

say "every acknowledged block as the workload reads it (NBD, now served from the target)"
"${K[@]}" -n "$APP_NS" exec writer-0 -- python3 /usr/local/bin/writer.py verify --acked /state/acked.json \
  --uri "nbd+unix:///data?socket=/var/lib/volmig/nbd.sock"

say "the pod never restarted"
UID_NOW=$("${K[@]}" -n "$APP_NS" get pod writer-0 -o jsonpath='{.metadata.uid}')
RESTARTS=$("${K[@]}" -n "$APP_NS" get pod writer-0 -o jsonpath='{.status.containerStatuses[0].restartCount}')
[ "$UID_NOW" = "$POD_UID" ] || die "writer-0 was replaced (uid $POD_UID -> $UID_NOW)"
[ "$RESTARTS" = 0 ] || die "writer-0 restarted $RESTARTS times"
ERRORS=$(python3 -c 'import json,sys; print(json.load(open(sys.argv[1]))["stats"]["errors"])' "$OUT/acked.json")
[ "$ERRORS" = 0 ] || die "the writer saw $ERRORS NBD errors"

say "the source is retained (retainSource: true)"
[ "$("${K[@]}" get pv "$SOURCE_PV" -o jsonpath='{.spec.persistentVolumeReclaimPolicy}')" = Retain ] ||
  die "source PV $SOURCE_PV is gone or not Retain"

python3 - "$OUT/acked.json" <<'PY'
import json, sys
s = json.load(open(sys.argv[1]))["stats"]
print(f"e2e: PASSED: {s['writes']} acknowledged writes, all on the target; worst write latency {s['worst_latency_ms']} ms; pod never restarted")
PY
