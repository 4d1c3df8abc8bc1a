#!/usr/bin/env bash
# End-to-end test of the CSI driver csi.volmig.io on kind (see e2e/README.md):
# a real backing driver with raw block volumes (kubernetes-csi's
# csi-driver-host-path) and two classes of it, hostpath-a and hostpath-b;
# volmig installed with Helm (StorageClass "volmig" over hostpath-a and two
# VolumeAttributesClasses); a StatefulSet writing checksummed files and a
# SQLite database on a volmig claim; then
#   1. a live migration to hostpath-b through a VolumeMigration,
#   2. a live migration back to hostpath-a through a VolumeAttributesClass
#      change of the claim (spec.volumeAttributesClassName),
#      after each: same pod UID, restartCount 0, claim and PV unchanged, the
#      VolmigVolume record on a backing claim of the new class, every file's
#      checksum, SQLite integrity_check, rows never fewer;
#   3. the pod deleted: the StatefulSet's new pod reads the migrated data;
#      then scaled to 0 and 1: a fresh publish attaches the current claim;
#   4. an abort mid-copy (real data + a bandwidth limit): the workload stays
#      on the source, record unchanged, data intact.
#   Between 2 and 3 (with cargo, to build kubectl-volmig): helm upgrade to a new
#   agent tag and `kubectl volmig upgrade-agents`: the same agent pod, its
#   keeper never restarted, the writer went on with no error.
#
#   e2e/run.sh                 the test (docker, kind, kubectl, helm, curl, python3)
#   e2e/run.sh --render DIR    only write the manifests and Helm values it applies
#                              into DIR (no cluster; scripts/check-chart validates them)
#
# (cargo too, for the in-place agent upgrade; without it that step is skipped, loudly)
# Environment (defaults in brackets):
#   CLUSTER [volmig-e2e]        kind cluster (created if missing, deleted afterwards unless KEEP_CLUSTER=1)
#   KIND_NODE_IMAGE [kindest/node:v1.34.0@sha256:...]   Kubernetes >= 1.34 (VolumeAttributesClass v1)
#   KEEP_CLUSTER [0]  SKIP_BUILD [0] (1: the images are already built)   TAG [0.1.0]
#   HOSTPATH_VERSION [v1.18.0]  HOSTPATH_DEPLOY [kubernetes-1.34]  SNAPSHOTTER_VERSION [v8.6.0]
#   WORKLOAD_IMAGE [python:3.13-slim]  WRITE_RATE [20] (writer steps/s)
#   SIZE [1Gi]  (the volume)   FILL_MIB [512] and ABORT_BANDWIDTH [4Mi] (the abort's slow copy)
#   TIMEOUT [900] seconds per migration
# wait_for takes its condition as a string evaluated each time: single quotes on purpose.
# shellcheck disable=SC2016
set -euo pipefail
RENDER=
if [ "${1:-}" = --render ]; then
  [ -n "${2:-}" ] || { echo "usage: $0 --render DIR" >&2; exit 2; }
  RENDER=$(mkdir -p "$2" && cd "$2" && pwd)
fi
cd "$(dirname "$0")/.."
ROOT=$PWD

CLUSTER=${CLUSTER:-volmig-e2e}
# kind v0.30.0's image for Kubernetes 1.34.0 (kind >= 0.30 runs it).
KIND_NODE_IMAGE=${KIND_NODE_IMAGE:-kindest/node:v1.34.0@sha256:7416a61b42b1662ca6ca89f02028ac133a309a2a30ba309614e8ec94d976dc5a}
KEEP_CLUSTER=${KEEP_CLUSTER:-0}
SKIP_BUILD=${SKIP_BUILD:-0}
TAG=${TAG:-0.1.0}
HOSTPATH_VERSION=${HOSTPATH_VERSION:-v1.18.0}
HOSTPATH_DEPLOY=${HOSTPATH_DEPLOY:-kubernetes-1.34}
SNAPSHOTTER_VERSION=${SNAPSHOTTER_VERSION:-v8.6.0}
WORKLOAD_IMAGE=${WORKLOAD_IMAGE:-python:3.13-slim}
WRITE_RATE=${WRITE_RATE:-20}
SIZE=${SIZE:-1Gi}
FILL_MIB=${FILL_MIB:-512}
ABORT_BANDWIDTH=${ABORT_BANDWIDTH:-4Mi}
TIMEOUT=${TIMEOUT:-900}

NS=volmig-system          # volmig's namespace: backing claims, holder pods
RELEASE=volmig
APP_NS=e2e
SC=volmig                 # the volmig StorageClass (the chart's csi.storageClass)
CLASS_A=hostpath-a        # backing classes
CLASS_B=hostpath-b
VAC_A=volmig-on-a         # VolumeAttributesClasses of csi.volmig.io
VAC_B=volmig-on-b
DRIVER=csi.volmig.io
BACKING_DRIVER=hostpath.csi.k8s.io
POD=writer-0
CLAIM=data-writer-0
# The chart's components the script waits for (by label, never by name).
COMPONENTS="operator csi-controller node-agent"
# VolumeMigration phases the script acts on (scripts/check-chart: in the CRD's enum).
TERMINAL_PHASES="Completed Failed Aborted"
COPY_PHASES="Copying Refreshing"

say() { echo "== $(date +%T) $*"; }

# ---- what the script applies: one place for the run and for --render ---------------
helm_values() {
  cat <<EOF
# Helm values of the e2e install (e2e/run.sh; validated by scripts/check-chart).
operator:
  image: {repository: volmig-operator, tag: "$TAG", pullPolicy: Never}
  logLevel: "info,volmig=debug"
agent:
  image: {repository: volmig-agent, tag: "$TAG", pullPolicy: Never}
  logLevel: "info,volmig=debug"
csi:
  controller:
    logLevel: "info,volmig=debug"
  storageClass:
    create: true
    name: $SC
    backingStorageClass: $CLASS_A
    volumeBindingMode: Immediate
  volumeAttributesClasses:
    - {name: $VAC_A, backingStorageClass: $CLASS_A}
    - {name: $VAC_B, backingStorageClass: $CLASS_B}
EOF
}

# Two classes of the backing driver. Immediate binding: CreateVolume binds
# the backing claim itself (nothing consumes it before the first publish).
backing_classes() {
  local c
  for c in "$CLASS_A" "$CLASS_B"; do
    cat <<EOF
---
apiVersion: storage.k8s.io/v1
kind: StorageClass
metadata:
  name: $c
  labels: {app.kubernetes.io/part-of: volmig-e2e}
provisioner: $BACKING_DRIVER
reclaimPolicy: Delete
volumeBindingMode: Immediate
allowVolumeExpansion: true
EOF
  done
}

# workload NODE: the namespace, workload.py as a ConfigMap, and the StatefulSet.
# NODE: csi-driver-host-path keeps its volumes on the node of its plugin pod,
# so a backing claim attaches only there; the writer runs there too.
workload() {
  cat <<EOF
apiVersion: v1
kind: Namespace
metadata:
  name: $APP_NS
---
apiVersion: v1
kind: Service
metadata:
  name: writer
  namespace: $APP_NS
spec:
  clusterIP: None
  selector: {app: writer}
---
EOF
  python3 - "$ROOT/e2e/workload.py" "$APP_NS" <<'PY'
import json, sys
print(json.dumps({"apiVersion": "v1", "kind": "ConfigMap",
                  "metadata": {"name": "workload", "namespace": sys.argv[2]},
                  "data": {"workload.py": open(sys.argv[1]).read()}}, indent=1))
PY
  cat <<EOF
---
apiVersion: apps/v1
kind: StatefulSet
metadata:
  name: writer
  namespace: $APP_NS
spec:
  serviceName: writer
  replicas: 1
  selector:
    matchLabels: {app: writer}
  template:
    metadata:
      labels: {app: writer}
    spec:
      nodeSelector:
        kubernetes.io/hostname: "$1"
      terminationGracePeriodSeconds: 10
      containers:
        - name: writer
          image: $WORKLOAD_IMAGE
          imagePullPolicy: IfNotPresent
          command: [python3, -u, /app/workload.py, write, /data, /state, --rate, "$WRITE_RATE"]
          readinessProbe:
            exec:
              command: [test, -s, /state/acked.json]
            periodSeconds: 2
          volumeMounts:
            - {name: data, mountPath: /data}
            - {name: state, mountPath: /state}
            - {name: app, mountPath: /app, readOnly: true}
      volumes:
        - name: state
          emptyDir: {}
        - name: app
          configMap: {name: workload}
  volumeClaimTemplates:
    - metadata:
        name: data
      spec:
        storageClassName: $SC
        accessModes: [ReadWriteOnce]
        resources:
          requests: {storage: $SIZE}
EOF
}

# migration NAME CLASS [BANDWIDTH]: a VolumeMigration of the writer's claim.
migration() {
  cat <<EOF
apiVersion: volmig.io/v1alpha1
kind: VolumeMigration
metadata:
  name: $1
  namespace: $APP_NS
spec:
  volumes:
    - source: {persistentVolumeClaim: $CLAIM}
      target: {storageClassName: $2}
  copyMode: Auto
  syncGoal: 100ms
  verify: Full
EOF
  if [ -n "${3:-}" ]; then echo "  bandwidthLimit: $3"; fi
}

if [ -n "$RENDER" ]; then
  helm_values >"$RENDER/values.yaml"
  backing_classes >"$RENDER/backing-classes.yaml"
  workload "$CLUSTER-worker" >"$RENDER/workload.yaml"
  migration e2e-to-b "$CLASS_B" >"$RENDER/migration-to-b.yaml"
  migration e2e-abort "$CLASS_B" "$ABORT_BANDWIDTH" >"$RENDER/migration-abort.yaml"
  echo "rendered into $RENDER: $(cd "$RENDER" && echo *)"
  exit 0
fi

# ---- the run -------------------------------------------------------------------------
OUT=$(mktemp -d "${TMPDIR:-/tmp}/volmig-e2e.XXXXXX")
export KUBECONFIG=$OUT/kubeconfig     # the user's kubeconfig and context stay untouched
K=(kubectl)
STEP=start

fail() {
  echo "e2e: FAILED ($STEP): $*" >&2
  exit 1
}

for tool in docker kind kubectl helm curl tar python3; do
  command -v "$tool" >/dev/null || fail "$tool is not installed (see e2e/README.md)"
done

diagnose() {
  echo "---- diagnostics (all in $OUT/diagnostics.txt) ----" >&2
  (
    set -x
    "${K[@]}" get nodes -o wide
    "${K[@]}" get pods -A -o wide
    "${K[@]}" get storageclass,volumeattributesclass
    "${K[@]}" get pv -o wide
    "${K[@]}" get pvc -A -o wide
    "${K[@]}" get volumeattachments -o wide
    "${K[@]}" get volmigvolumes -o yaml
    "${K[@]}" get volumemigrations -A -o yaml
    "${K[@]}" describe volumemigrations -A
    "${K[@]}" -n "$APP_NS" describe pod "$POD"
    "${K[@]}" -n "$APP_NS" describe pvc "$CLAIM"
    "${K[@]}" get events -A --sort-by=.lastTimestamp | tail -100
    for c in $COMPONENTS; do
      "${K[@]}" -n "$NS" logs -l "$(component "$c")" --all-containers --prefix --tail=300
    done
    "${K[@]}" -n "$NS" get pods -o wide
    "${K[@]}" -n default logs csi-hostpathplugin-0 --all-containers --prefix --tail=200
    "${K[@]}" -n "$APP_NS" logs "$POD" --tail=50
    "${K[@]}" -n "$APP_NS" logs "$POD" --previous --tail=50
  ) >"$OUT/diagnostics.txt" 2>&1 || true
  tail -250 "$OUT/diagnostics.txt" >&2
}

teardown() {
  local rc=$?
  set +e
  if [ $rc -ne 0 ]; then diagnose; fi
  if [ "$KEEP_CLUSTER" = 1 ]; then
    echo "cluster kind-$CLUSTER kept (KEEP_CLUSTER=1): KUBECONFIG=$OUT/kubeconfig; delete it with: e2e/teardown.sh $CLUSTER" >&2
  else
    "$ROOT/e2e/teardown.sh" "$CLUSTER" >/dev/null 2>&1 || echo "teardown of $CLUSTER failed; run e2e/teardown.sh $CLUSTER" >&2
  fi
  exit $rc
}
trap teardown EXIT

# ---- small helpers ----------------------------------------------------------------------
# Fields of volmig's resources are read only through these two, with a
# plain path (scripts/check-chart checks every path against the CRDs).
vm_field() { "${K[@]}" -n "$APP_NS" get volumemigration "$1" -o "jsonpath={.$2}"; }
rec_field() { "${K[@]}" get volmigvolume "$1" -o "jsonpath={.$2}"; }

# wait_for SECONDS WHAT 'SHELL CONDITION': until the condition (evaluated
# again each time, in this shell: the helpers work in it) holds.
wait_for() {
  local limit=$1 what=$2 cond=$3 start=$SECONDS
  until eval "$cond" >/dev/null 2>&1; do
    [ $((SECONDS - start)) -lt "$limit" ] || fail "$what: not within ${limit}s"
    sleep 3
  done
}

# wait_ready SELECTOR NAMESPACE COUNT SECONDS: COUNT pods of the selector exist
# and are Ready. (kubectl wait fails at once while no pod matches, and
# `rollout status` does not work for the agents' OnDelete DaemonSet.)
pods_ready() {
  local n
  n=$("${K[@]}" -n "$2" get pods -l "$1" \
      -o jsonpath='{range .items[*]}{.metadata.deletionTimestamp}{"|"}{.status.conditions[?(@.type=="Ready")].status}{"\n"}{end}' |
      grep -cx '|True' || true)
  [ "$n" -ge "$3" ]
}
wait_ready() { wait_for "$4" "$3 Ready pod(s) of $1 in $2" "pods_ready '$1' '$2' '$3'"; }

component() { echo "app.kubernetes.io/instance=$RELEASE,app.kubernetes.io/component=$1"; }

# acked FIELD: from the writer's /state/acked.json.
acked() {
  "${K[@]}" -n "$APP_NS" exec "$POD" -c writer -- cat /state/acked.json |
    python3 -c 'import json,sys; print(json.load(sys.stdin)[sys.argv[1]])' "$1"
}

pod_uid() { "${K[@]}" -n "$APP_NS" get pod "$POD" -o jsonpath='{.metadata.uid}'; }
restarts() {
  "${K[@]}" -n "$APP_NS" get pod "$POD" -o jsonpath='{range .status.containerStatuses[*]}{.restartCount}{"\n"}{end}' |
    awk '{s += $1} END {print s + 0}'
}

# verify [--min-files N --min-rows N]: workload.py verify in the pod; prints its JSON.
verify() {
  "${K[@]}" -n "$APP_NS" exec "$POD" -c writer -- python3 /app/workload.py verify /data "$@" ||
    fail "the workload's data does not verify (above)"
}
json_get() { python3 -c 'import json,sys; print(json.loads(sys.argv[1])[sys.argv[2]])' "$1" "$2"; }

# stop_writer: the writer stops cleanly (the pod stays up); sets LAST (its
# last file) and ROWS (rows committed).
stop_writer() {
  "${K[@]}" -n "$APP_NS" exec "$POD" -c writer -- touch /state/stop
  wait_for 60 "the writer stopping cleanly" '"${K[@]}" -n "$APP_NS" exec "$POD" -c writer -- test -e /state/done'
  [ "$(acked errors)" = 0 ] || fail "the writer saw I/O errors: $(acked error)"
  LAST=$(acked last)
  ROWS=$(acked rows)
}

in_list() { case " $2 " in *" $1 "*) return 0 ;; esac; return 1; }

# wait_migration NAME WANT: poll (kubectl wait cannot stop on either outcome)
# until the VolumeMigration reaches a terminal phase; it must be WANT.
wait_migration() {
  local name=$1 want=$2 start=$SECONDS phase="" line last=""
  while :; do
    phase=$(vm_field "$name" status.phase 2>/dev/null || true)
    line="phase=${phase:-?} progress=$(vm_field "$name" status.progress 2>/dev/null || true) stall=$(vm_field "$name" status.cutoverStall 2>/dev/null || true)"
    if [ "$line" != "$last" ]; then echo "   $name: $line"; last=$line; fi
    if [ -n "$phase" ] && in_list "$phase" "$TERMINAL_PHASES"; then break; fi
    [ $((SECONDS - start)) -lt "$TIMEOUT" ] || fail "VolumeMigration $name not finished within ${TIMEOUT}s (phase ${phase:-none})"
    sleep 5
  done
  [ "$phase" = "$want" ] ||
    fail "VolumeMigration $name ended $phase, not $want: $(vm_field "$name" status.error 2>/dev/null || true)"
  say "$name: $phase in $((SECONDS - start)) s, stall $(vm_field "$name" status.cutoverStall 2>/dev/null || true)"
}

# The record of the writer's volume.
VOL=
record_claim() { rec_field "$VOL" status.currentClaim; }
attached_claim() { # the backing claim the record says is attached on node $1
  rec_field "$VOL" status.attachments | python3 -c '
import json, sys
for a in json.loads(sys.stdin.read() or "[]"):
    if a.get("node") == sys.argv[1]:
        print(a.get("claim", ""))' "$1"
}

# check_live WHEN CLASS OLD_CLAIM UID NODE LAST ROWS: after a live migration.
check_live() {
  local when=$1 class=$2 old=$3 uid=$4 node=$5 last=$6 rows=$7 claim out
  [ "$(pod_uid)" = "$uid" ] || fail "$when: $POD was replaced (uid $uid -> $(pod_uid))"
  [ "$(restarts)" = 0 ] || fail "$when: $POD restarted $(restarts) times"
  [ "$("${K[@]}" -n "$APP_NS" get pod "$POD" -o jsonpath='{.spec.volumes[?(@.name=="data")].persistentVolumeClaim.claimName}')" = "$CLAIM" ] ||
    fail "$when: $POD no longer uses claim $CLAIM"
  [ "$("${K[@]}" -n "$APP_NS" get pvc "$CLAIM" -o jsonpath='{.spec.volumeName}')" = "$PV" ] ||
    fail "$when: claim $CLAIM is no longer bound to $PV"
  [ "$(rec_field "$VOL" status.storageClass)" = "$class" ] ||
    fail "$when: the record's class is '$(rec_field "$VOL" status.storageClass)', not $class"
  claim=$(record_claim)
  if [ -z "$claim" ] || [ "$claim" = "$old" ]; then fail "$when: the record still points at backing claim '$claim'"; fi
  [ "$("${K[@]}" -n "$NS" get pvc "$claim" -o jsonpath='{.spec.storageClassName}/{.status.phase}')" = "$class/Bound" ] ||
    fail "$when: backing claim $NS/$claim is not a Bound claim of $class"
  [ "$(attached_claim "$node")" = "$claim" ] ||
    fail "$when: the record's attachment on $node is '$(attached_claim "$node")', not the current claim $claim"
  [ "$(acked errors)" = 0 ] || fail "$when: the writer saw I/O errors: $(acked error)"
  [ "$(acked last)" -gt "$last" ] || fail "$when: the writer made no progress during the migration"
  out=$(verify --min-files "$last" --min-rows "$rows")
  say "$when: $POD (uid $uid) never restarted; record -> $claim ($class); data: $out"
}

# ---- 1. the cluster -------------------------------------------------------------------------
STEP=cluster
if kind get clusters 2>/dev/null | grep -qx "$CLUSTER"; then
  say "using kind cluster $CLUSTER"
else
  say "creating kind cluster $CLUSTER ($KIND_NODE_IMAGE)"
  kind create cluster --name "$CLUSTER" --image "$KIND_NODE_IMAGE" --config e2e/kind-config.yaml \
    --kubeconfig "$KUBECONFIG" --wait 180s
fi
kind get kubeconfig --name "$CLUSTER" >"$KUBECONFIG"
MINOR=$("${K[@]}" version -o json | python3 -c 'import json,sys; v=json.load(sys.stdin)["serverVersion"]; print(int(v["minor"].rstrip("+")))')
[ "$MINOR" -ge 34 ] || fail "the cluster runs Kubernetes 1.$MINOR; VolumeAttributesClass v1 needs 1.34 (KIND_NODE_IMAGE)"
"${K[@]}" get volumeattributesclasses >/dev/null || fail "the API server does not serve VolumeAttributesClasses"

STEP=images
if [ "$SKIP_BUILD" != 1 ]; then
  say "building images volmig-operator:$TAG, volmig-agent:$TAG"
  docker build -f images/operator.Dockerfile -t "volmig-operator:$TAG" .
  docker build -f images/agent.Dockerfile -t "volmig-agent:$TAG" .
fi
docker image inspect "$WORKLOAD_IMAGE" >/dev/null 2>&1 || docker pull "$WORKLOAD_IMAGE"
say "loading images into $CLUSTER"
kind load docker-image --name "$CLUSTER" "volmig-operator:$TAG" "volmig-agent:$TAG"
# (kind load fails for some multi-platform images; the nodes then pull it.)
kind load docker-image --name "$CLUSTER" "$WORKLOAD_IMAGE" || echo "   note: kind load of $WORKLOAD_IMAGE failed; the node pulls it"

# ---- 2. the backing driver: csi-driver-host-path, raw block volumes ---------------------------
STEP=backing-driver
say "csi-driver-host-path $HOSTPATH_VERSION ($HOSTPATH_DEPLOY) and the snapshot CRDs its deployment names"
for crd in volumesnapshotclasses volumesnapshotcontents volumesnapshots; do
  "${K[@]}" apply -f "https://raw.githubusercontent.com/kubernetes-csi/external-snapshotter/$SNAPSHOTTER_VERSION/client/config/crd/snapshot.storage.k8s.io_$crd.yaml"
done
mkdir -p "$OUT/hostpath"
curl -fsSL "https://github.com/kubernetes-csi/csi-driver-host-path/archive/refs/tags/$HOSTPATH_VERSION.tar.gz" |
  tar -xz -C "$OUT/hostpath" --strip-components=1
[ -x "$OUT/hostpath/deploy/$HOSTPATH_DEPLOY/deploy.sh" ] || fail "csi-driver-host-path $HOSTPATH_VERSION has no deploy/$HOSTPATH_DEPLOY/deploy.sh"
# deploy.sh uses plain kubectl, i.e. $KUBECONFIG; it waits for its StatefulSet.
bash "$OUT/hostpath/deploy/$HOSTPATH_DEPLOY/deploy.sh" >"$OUT/hostpath-deploy.log" 2>&1 ||
  { tail -40 "$OUT/hostpath-deploy.log" >&2; fail "csi-driver-host-path's deploy.sh failed"; }
wait_ready app.kubernetes.io/name=csi-hostpathplugin default 1 300
BACKING_NODE=$("${K[@]}" -n default get pod csi-hostpathplugin-0 -o jsonpath='{.spec.nodeName}')
[ -n "$BACKING_NODE" ] || fail "csi-hostpathplugin-0 has no node"
backing_classes >"$OUT/backing-classes.yaml"
"${K[@]}" apply -f "$OUT/backing-classes.yaml"
say "backing classes $CLASS_A, $CLASS_B ($BACKING_DRIVER, volumes on $BACKING_NODE)"

# ---- 3. volmig ---------------------------------------------------------------------------------
STEP=install
helm_values >"$OUT/values.yaml"
say "helm install $RELEASE (StorageClass $SC over $CLASS_A; VolumeAttributesClasses $VAC_A, $VAC_B)"
helm upgrade --install "$RELEASE" charts/volmig -n "$NS" --create-namespace -f "$OUT/values.yaml" --timeout 5m
for c in operator csi-controller; do
  d=$("${K[@]}" -n "$NS" get deployment -l "$(component "$c")" -o name)
  [ -n "$d" ] || fail "the chart made no Deployment with component $c"
  "${K[@]}" -n "$NS" rollout status "$d" --timeout 5m
done
# The agents: a DaemonSet with updateStrategy OnDelete, so wait for its pods.
AGENT_DS=$("${K[@]}" -n "$NS" get daemonset -l "$(component node-agent)" -o name)
[ -n "$AGENT_DS" ] || fail "the chart made no agent DaemonSet"
wait_for 120 "the agent DaemonSet scheduling its pods" \
  '[ "$("${K[@]}" -n "$NS" get "$AGENT_DS" -o jsonpath="{.status.desiredNumberScheduled}")" -gt 0 ]'
AGENTS=$("${K[@]}" -n "$NS" get "$AGENT_DS" -o jsonpath='{.status.desiredNumberScheduled}')
wait_ready "$(component node-agent)" "$NS" "$AGENTS" 600
wait_for 120 "CSINode $BACKING_NODE registering $DRIVER" \
  '"${K[@]}" get csinode "$BACKING_NODE" -o jsonpath="{.spec.drivers[*].name}" | grep -qw "$DRIVER"'
for v in "$VAC_A" "$VAC_B"; do "${K[@]}" get volumeattributesclass "$v" >/dev/null || fail "the chart made no VolumeAttributesClass $v"; done

# ---- 4. the workload -------------------------------------------------------------------------
STEP=workload
say "StatefulSet writer on $BACKING_NODE: checksummed files + SQLite on a $SC claim ($SIZE)"
workload "$BACKING_NODE" >"$OUT/workload.yaml"
# A cluster kept from an earlier run: start from a new namespace (its claim,
# volume and VolumeMigrations go with the old one).
"${K[@]}" delete namespace "$APP_NS" --ignore-not-found --wait=true --timeout=300s
"${K[@]}" apply -f "$OUT/workload.yaml"
wait_for 300 "claim $CLAIM bound" '[ "$("${K[@]}" -n "$APP_NS" get pvc "$CLAIM" -o jsonpath="{.status.phase}")" = Bound ]'
wait_ready app=writer "$APP_NS" 1 300
wait_for 120 "100 acknowledged writes" '[ "$(acked last)" -ge 100 ]'
PV=$("${K[@]}" -n "$APP_NS" get pvc "$CLAIM" -o jsonpath='{.spec.volumeName}')
[ "$("${K[@]}" get pv "$PV" -o jsonpath='{.spec.csi.driver}')" = "$DRIVER" ] || fail "PV $PV is not a $DRIVER volume"
VOL=$("${K[@]}" get pv "$PV" -o jsonpath='{.spec.csi.volumeHandle}')
NODE=$("${K[@]}" -n "$APP_NS" get pod "$POD" -o jsonpath='{.spec.nodeName}')
UID0=$(pod_uid)
CLAIM0=$(record_claim)
[ "$(rec_field "$VOL" status.storageClass)" = "$CLASS_A" ] || fail "VolmigVolume $VOL is not on $CLASS_A"
[ "$(attached_claim "$NODE")" = "$CLAIM0" ] || fail "VolmigVolume $VOL has no attachment of $CLAIM0 on $NODE"
BEFORE=$(verify)
say "$POD (uid $UID0) on $NODE; claim $CLAIM -> PV $PV = volume $VOL -> backing claim $CLAIM0 ($CLASS_A); data: $BEFORE"

# ---- 5. live migration through a VolumeMigration ------------------------------------------------
STEP=migration
LAST=$(acked last)
ROWS=$(json_get "$BEFORE" rows)
say "VolumeMigration e2e-to-b: $CLAIM -> $CLASS_B, live"
migration e2e-to-b "$CLASS_B" >"$OUT/migration-to-b.yaml"
"${K[@]}" apply -f "$OUT/migration-to-b.yaml"
wait_migration e2e-to-b Completed
check_live "after the VolumeMigration" "$CLASS_B" "$CLAIM0" "$UID0" "$NODE" "$LAST" "$ROWS"
CLAIM1=$(record_claim)

# ---- 6. live migration through a VolumeAttributesClass --------------------------------------------
STEP=volume-attributes-class
LAST=$(acked last)
V=$(verify)
ROWS=$(json_get "$V" rows)
say "claim $CLAIM: volumeAttributesClassName $VAC_A (backing class $CLASS_A), live"
"${K[@]}" -n "$APP_NS" patch pvc "$CLAIM" --type merge -p "{\"spec\":{\"volumeAttributesClassName\":\"$VAC_A\"}}"
vac_migration() {
  "${K[@]}" -n "$APP_NS" get volumemigrations -l "volmig.io/volume=$VOL" \
    -o jsonpath='{range .items[*]}{.metadata.name}{"\n"}{end}' | grep -vx e2e-to-b | head -1
}
wait_for 180 "the VolumeMigration ControllerModifyVolume creates (label volmig.io/volume=$VOL)" '[ -n "$(vac_migration)" ]'
VAC_MIG=$(vac_migration)
wait_migration "$VAC_MIG" Completed
# external-resizer retries ControllerModifyVolume (ABORTED while the
# migration runs) with a backoff of up to 5 minutes.
wait_for 600 "claim $CLAIM reporting currentVolumeAttributesClassName $VAC_A" \
  '[ "$("${K[@]}" -n "$APP_NS" get pvc "$CLAIM" -o jsonpath="{.status.currentVolumeAttributesClassName}")" = "$VAC_A" ]'
check_live "after the VolumeAttributesClass change" "$CLASS_A" "$CLAIM1" "$UID0" "$NODE" "$LAST" "$ROWS"
CLAIM2=$(record_claim)
[ "$CLAIM2" != "$CLAIM0" ] || echo "   note: the record is back on the first backing claim $CLAIM0"

# ---- 6b. the agents upgraded in place: the writer's I/O only stalls ----------------------------------
# helm upgrade to a new agent tag (the same image, tagged again), then
# `kubectl volmig upgrade-agents`: kubelet restarts the agent container in
# its pod, the keeper keeps the FUSE connection, the writer sees no error.
STEP=upgrade-agents
if command -v cargo >/dev/null; then
  NEXT_TAG="$TAG-next"
  say "agents: helm upgrade to volmig-agent:$NEXT_TAG, then kubectl volmig upgrade-agents"
  cargo build --release -p volmig --bin kubectl-volmig >"$OUT/kubectl-volmig-build.log" 2>&1 ||
    { tail -20 "$OUT/kubectl-volmig-build.log" >&2; fail "building kubectl-volmig failed"; }
  docker tag "volmig-agent:$TAG" "volmig-agent:$NEXT_TAG"
  kind load docker-image --name "$CLUSTER" "volmig-agent:$NEXT_TAG"
  agent_pod() { "${K[@]}" -n "$NS" get pods -l "$(component node-agent)" --field-selector "spec.nodeName=$NODE" -o jsonpath='{.items[0].metadata.name}'; }
  AGENT_POD=$(agent_pod)
  [ -n "$AGENT_POD" ] || fail "no agent pod on $NODE"
  AGENT_UID=$("${K[@]}" -n "$NS" get pod "$AGENT_POD" -o jsonpath='{.metadata.uid}')
  LAST=$(acked last)
  helm upgrade "$RELEASE" charts/volmig -n "$NS" --reuse-values --set "agent.image.tag=$NEXT_TAG" --timeout 5m
  "$ROOT/target/release/kubectl-volmig" --kubeconfig "$KUBECONFIG" -n "$NS" upgrade-agents --timeout 5m ||
    fail "kubectl volmig upgrade-agents failed (above)"
  [ "$(agent_pod)" = "$AGENT_POD" ] || fail "the agent pod on $NODE was replaced ($AGENT_POD -> $(agent_pod))"
  [ "$("${K[@]}" -n "$NS" get pod "$AGENT_POD" -o jsonpath='{.metadata.uid}')" = "$AGENT_UID" ] ||
    fail "the agent pod $AGENT_POD was recreated"
  [ "$("${K[@]}" -n "$NS" get pod "$AGENT_POD" -o jsonpath='{.spec.containers[?(@.name=="agent")].image}')" = "volmig-agent:$NEXT_TAG" ] ||
    fail "the agent container of $AGENT_POD does not run volmig-agent:$NEXT_TAG"
  [ "$("${K[@]}" -n "$NS" get pod "$AGENT_POD" -o jsonpath='{.status.initContainerStatuses[?(@.name=="keeper")].restartCount}')" = 0 ] ||
    fail "the keeper of $AGENT_POD restarted: the FUSE connection did not survive"
  wait_for 120 "the writer going on after the agent's restart" '[ "$(acked last)" -gt "$LAST" ]'
  [ "$(acked errors)" = 0 ] || fail "the writer saw I/O errors across the agent upgrade: $(acked error)"
  if [ "$(pod_uid)" != "$UID0" ] || [ "$(restarts)" != 0 ]; then fail "$POD was replaced or restarted across the agent upgrade"; fi
  say "agent $AGENT_POD on $NODE now runs volmig-agent:$NEXT_TAG in the same pod; the writer went on with no error: $(verify --min-files "$LAST")"
else
  say "SKIPPED: the in-place agent upgrade (no cargo here to build kubectl-volmig)"
fi

# ---- 7. reschedule: the new pod reads the migrated data ----------------------------------------------
STEP=reschedule
stop_writer
say "deleting $POD (writer stopped at file $LAST, $ROWS rows)"
"${K[@]}" -n "$APP_NS" delete pod "$POD" --wait=true --timeout=120s
wait_for 300 "a new $POD" 'u=$(pod_uid) && [ -n "$u" ] && [ "$u" != "$UID0" ]'
wait_ready app=writer "$APP_NS" 1 300
UID1=$(pod_uid)
OUT_VERIFY=$(verify --min-files "$LAST" --min-rows "$ROWS")
say "the new $POD (uid $UID1) reads every file and row: $OUT_VERIFY"

say "scaling writer to 0 and back: a new publish attaches the current backing claim"
stop_writer
"${K[@]}" -n "$APP_NS" scale statefulset writer --replicas 0
wait_for 180 "$POD gone" '! "${K[@]}" -n "$APP_NS" get pod "$POD"'
va_count() {
  "${K[@]}" get volumeattachments -o jsonpath='{range .items[*]}{.spec.source.persistentVolumeName}{"\n"}{end}' | grep -cx "$PV" || true
}
wait_for 300 "the VolumeAttachment of $PV deleted (ControllerUnpublish)" '[ "$(va_count)" = 0 ]'
wait_for 120 "no attachment left in VolmigVolume $VOL" 'a=$(rec_field "$VOL" status.attachments) && { [ -z "$a" ] || [ "$a" = "[]" ]; }'
"${K[@]}" -n "$APP_NS" scale statefulset writer --replicas 1
wait_ready app=writer "$APP_NS" 1 300
NODE=$("${K[@]}" -n "$APP_NS" get pod "$POD" -o jsonpath='{.spec.nodeName}')
UID2=$(pod_uid)
[ "$(attached_claim "$NODE")" = "$CLAIM2" ] || fail "the new publish on $NODE attaches '$(attached_claim "$NODE")', not the current claim $CLAIM2"
OUT_VERIFY=$(verify --min-files "$LAST" --min-rows "$ROWS")
say "published again on $NODE from $CLAIM2: $OUT_VERIFY"

# ---- 8. abort mid-copy -------------------------------------------------------------------------------
STEP=abort
say "filling $FILL_MIB MiB of real data, then a migration to $CLASS_B at $ABORT_BANDWIDTH/s, aborted while it copies"
"${K[@]}" -n "$APP_NS" exec "$POD" -c writer -- python3 /app/workload.py fill /data "$FILL_MIB"
wait_for 60 "the writer going on after the fill" '[ "$(acked writes)" -gt 0 ]'
migration e2e-abort "$CLASS_B" "$ABORT_BANDWIDTH" >"$OUT/migration-abort.yaml"
"${K[@]}" -n "$APP_NS" apply -f "$OUT/migration-abort.yaml"
START=$SECONDS
while :; do
  PHASE=$(vm_field e2e-abort status.phase 2>/dev/null || true)
  COPIED=$(vm_field e2e-abort 'status.volumes[0].bytesCopied' 2>/dev/null || true)
  if in_list "${PHASE:-none}" "$COPY_PHASES" && [ "${COPIED:-0}" -gt 0 ]; then break; fi
  if [ -n "$PHASE" ] && in_list "$PHASE" "$TERMINAL_PHASES"; then
    fail "e2e-abort ended $PHASE before it could be aborted while copying (more FILL_MIB or less ABORT_BANDWIDTH)"
  fi
  [ $((SECONDS - START)) -lt "$TIMEOUT" ] || fail "e2e-abort did not start copying within ${TIMEOUT}s (phase ${PHASE:-none})"
  sleep 2
done
say "e2e-abort: $PHASE, $COPIED bytes copied: abort (spec.abort: true, as kubectl volmig abort does)"
"${K[@]}" -n "$APP_NS" patch volumemigration e2e-abort --type merge -p '{"spec":{"abort":true}}'
wait_migration e2e-abort Aborted
[ "$(record_claim)" = "$CLAIM2" ] || fail "after the abort the record points at '$(record_claim)', not the source $CLAIM2"
[ "$(rec_field "$VOL" status.storageClass)" = "$CLASS_A" ] || fail "after the abort the record's class is not $CLASS_A"
[ "$(attached_claim "$NODE")" = "$CLAIM2" ] || fail "after the abort $NODE has '$(attached_claim "$NODE")' attached, not $CLAIM2"
[ "$(pod_uid)" = "$UID2" ] || fail "the abort replaced $POD"
[ "$(restarts)" = 0 ] || fail "$POD restarted during the abort"
stop_writer
OUT_VERIFY=$(verify --min-files "$LAST" --min-rows "$ROWS")
say "aborted: the workload stays on $CLAIM2 ($CLASS_A); data: $OUT_VERIFY"
TARGET=$(vm_field e2e-abort 'status.volumes[0].target' 2>/dev/null || true)
if [ -n "$TARGET" ] && "${K[@]}" -n "$NS" get pvc "$TARGET" >/dev/null 2>&1; then
  echo "   note: the aborted migration's target claim $NS/$TARGET still exists"
fi

STEP=finished
echo "e2e: PASSED: volume $VOL of claim $CLAIM moved live $CLASS_A -> $CLASS_B (VolumeMigration) -> $CLASS_A (VolumeAttributesClass) with the pod running; the rescheduled pod and a fresh publish read every file and row; an abort mid-copy left it on its source"
