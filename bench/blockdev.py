"""Kernel block devices: volmig's FUSE + loop device measured beside the
peers of ../shared/peers/blockdev_peers.py in the same invocations (a loop
device straight on the file = the ceiling; nbdfuse + nbdkit and nbdfuse +
qemu-nbd = the user-space peers): fio libaio direct=1, 4 KiB random at
QD1/QD32, 1 MiB sequential. volmig runs twice: buffered backing (like the
peers) and O_DIRECT backing (what block volumes should use). Then SQLite
TPS (WAL, synchronous=FULL, one insert per transaction) on ext4 over
volmig's device vs over a raw loop device of the same file, and the stall
an agent restart (SIGKILL, started again with the descriptor keeper) causes
a writer doing 4 KiB pwrite + fdatasync on ext4 over the device.

One peer-script invocation per round (the script loses a whole run to one
nbdkit start-up race); ratios are taken within a round."""
import json
import os
import random
import signal
import socket
import sqlite3
import statistics
import subprocess
import threading
import time

import common as C

PEER_SCRIPT = os.environ.get("VOLBENCH_BLOCKDEV_PEERS") or os.path.normpath(
    os.path.join(C.ROOT, "..", "shared", "peers", "blockdev_peers.py"))
DEVICE_SH = os.path.join(C.HERE, "volmig_device.sh")
JOBS = ["randread 4k qd1", "randread 4k qd32", "randwrite 4k qd1", "randwrite 4k qd32",
        "seqread 1M qd8", "seqwrite 1M qd8"]
PEERS = ["nbdkit", "qemu-nbd"]
VOLMIG = ["volmig", "volmig-direct"]


def sh(cmd, **kw):
    return subprocess.run(cmd, check=True, capture_output=True, text=True, **kw)


# ---------------------------------------------------------------- volmig's device

class VolmigDevice:
    """An agent serving a file as a FUSE + loop block device (optionally
    with a descriptor keeper), killed and started again at will."""

    def __init__(self, workdir, img, tag, direct=False, keeper=False):
        self.workdir, self.img, self.tag, self.direct = workdir, img, tag, direct
        self.ctl = os.path.join(workdir, f"{tag}.ctl.sock")
        self.state = os.path.join(workdir, f"{tag}.state")
        self.block = os.path.join(workdir, f"{tag}.block")
        self.keeper_sock = os.path.join(workdir, f"{tag}.keeper.sock") if keeper else None
        self.keeper = self.proc = None
        self.log = open(os.path.join(workdir, f"{tag}.log"), "ab")

    def _spawn_agent(self):
        if os.path.exists(self.ctl):
            os.unlink(self.ctl)
        cmd = [C.AGENT_BIN, "serve", "--state-dir", self.state, "--control", self.ctl,
               "--block", "fuse", "--block-dir", self.block]
        if self.keeper_sock:
            cmd += ["--fd-keeper", self.keeper_sock]
        self.proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=self.log, start_new_session=True,
                                     env=dict(os.environ, RUST_LOG="info", NO_COLOR="1"))
        C.wait_socket(self.ctl, self.proc)

    def volmig(self, *args):
        return sh([C.VOLMIG_BIN, *args[:1], "--agent", f"unix://{self.ctl}", *args[1:]], timeout=120).stdout

    def start(self):
        if self.keeper_sock:
            self.keeper = subprocess.Popen([C.AGENT_BIN, "keeper", "--socket", self.keeper_sock],
                                           stdout=subprocess.DEVNULL, stderr=self.log, start_new_session=True)
            # The keeper speaks SOCK_SEQPACKET.
            C.wait_socket(self.keeper_sock, self.keeper, kind=socket.SOCK_SEQPACKET)
        self._spawn_agent()
        self.volmig("serve", "vol", self.img, "--frontend", "block:fuse", *(["--direct"] if self.direct else []))
        vols = json.loads(self.volmig("volumes", "--json"))
        self.dev = next(v["device"] for v in vols if v["name"] == "vol")
        return self.dev

    def kill(self):
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait()

    def restart(self):
        self._spawn_agent()

    def stop(self):
        try:
            if self.proc and self.proc.poll() is None:
                self.volmig("unserve", "vol")
        finally:
            C.stop(self.proc)
            if self.keeper:
                C.stop(self.keeper)
            self.log.close()


class RawLoop:
    def __init__(self, img):
        self.img = img

    def start(self):
        self.dev = sh(["losetup", "-f", "--show", self.img]).stdout.strip()
        return self.dev

    def stop(self):
        subprocess.run(["losetup", "-d", self.dev])


def mount_ext4(dev, mnt):
    sh(["mkfs.ext4", "-q", "-F", dev])
    os.makedirs(mnt, exist_ok=True)
    sh(["mount", dev, mnt])


def umount(mnt):
    for _ in range(20):
        if subprocess.run(["umount", mnt], capture_output=True).returncode == 0:
            return
        time.sleep(0.25)
    subprocess.run(["umount", "-l", mnt])


# ---------------------------------------------------------------- fio, with the peers

def peers_round(cfg, workdir, rnd):
    out = os.path.join(workdir, f"blockdev-peers-{rnd}.json")
    dev = f"bash {DEVICE_SH} {{img}} {{devfile}} {{dir}}"
    cmd = ["python3", PEER_SCRIPT, "--size-mib", str(cfg["blockdev_file_mib"]),
           "--runtime", str(cfg["blockdev_runtime"]), "--rounds", "1",
           "--device", f"volmig={dev}", "--device", f"volmig-direct={dev} --direct", "--json", out]
    C.log(f"  round {rnd + 1}: {' '.join(cmd)}")
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=cfg["peer_timeout"],
                       env=dict(os.environ, VOLMIG_AGENT=C.AGENT_BIN, VOLMIG=C.VOLMIG_BIN))
    if p.returncode != 0:
        if not os.path.exists(out):
            raise RuntimeError(f"blockdev_peers.py failed ({p.returncode}): {p.stderr.strip()[-800:]}")
        # It measured everything and wrote its results, then failed on its
        # own clean-up: keep the numbers, say so.
        C.log(f"  (blockdev_peers.py failed after writing its results: {p.stderr.strip()[-300:]})")
    for line in p.stdout.splitlines():
        C.log("    " + line)
    with open(out) as fh:
        j = json.load(fh)
    # raw: {system: {job: [(iops, MiB/s, p99 us)]}}
    return {s: {job: {"iops": v[0][0], "mib_s": v[0][1], "p99_us": v[0][2]} for job, v in jobs.items()}
            for s, jobs in j["raw"].items()}


# ---------------------------------------------------------------- SQLite

def sqlite_tps(mnt, seconds):
    db = os.path.join(mnt, "bench.db")
    con = sqlite3.connect(db, isolation_level=None)
    con.execute("PRAGMA journal_mode=WAL")
    con.execute("PRAGMA synchronous=FULL")
    con.execute("CREATE TABLE IF NOT EXISTS t (id INTEGER PRIMARY KEY, v BLOB)")
    payload = os.urandom(200)
    n, end = 0, time.monotonic() + seconds
    t0 = time.monotonic()
    while time.monotonic() < end:
        con.execute("BEGIN")
        con.execute("INSERT INTO t (v) VALUES (?)", (payload,))
        con.execute("COMMIT")
        n += 1
    el = time.monotonic() - t0
    con.close()
    return n / el


def run_sqlite(cfg, workdir):
    img = os.path.join(workdir, "sqlite.img")
    mnt = os.path.join(workdir, "sqlite.mnt")
    rounds = []
    for rnd in range(cfg["blockdev_rounds"]):
        systems = [("raw-loop", lambda: RawLoop(img)),
                   ("volmig", lambda: VolmigDevice(workdir, img, f"sql{rnd}")),
                   ("volmig-direct", lambda: VolmigDevice(workdir, img, f"sqld{rnd}", direct=True))]
        if rnd % 2:
            systems.reverse()
        row = {}
        for name, make in systems:
            C.make_target(img, cfg["blockdev_sqlite_mib"] * C.MiB)
            s = make()
            dev = s.start()
            try:
                mount_ext4(dev, mnt)
                try:
                    row[name] = sqlite_tps(mnt, cfg["blockdev_sqlite_s"])
                finally:
                    umount(mnt)
            finally:
                s.stop()
            C.log(f"  sqlite round {rnd + 1} {name:<14} {row[name]:8.0f} TPS")
        rounds.append(row)
    os.unlink(img)
    return rounds


# ---------------------------------------------------------------- restart stall

def run_restart(cfg, workdir):
    img = os.path.join(workdir, "restart.img")
    mnt = os.path.join(workdir, "restart.mnt")
    runs = []
    for rnd in range(cfg["blockdev_restarts"]):
        C.make_target(img, 512 * C.MiB)
        d = VolmigDevice(workdir, img, f"rst{rnd}", direct=True, keeper=True)
        dev = d.start()
        try:
            mount_ext4(dev, mnt)
            lat, errors, stop = [], [], threading.Event()

            def writer():
                fd = os.open(os.path.join(mnt, "w.dat"), os.O_RDWR | os.O_CREAT, 0o600)
                buf = os.urandom(4096)
                try:
                    while not stop.is_set():
                        off = random.randrange(0, 64 * C.MiB // 4096) * 4096
                        t = time.monotonic()
                        os.pwrite(fd, buf, off)
                        os.fdatasync(fd)
                        lat.append((t, time.monotonic() - t))
                except OSError as e:
                    errors.append(str(e))
                finally:
                    os.close(fd)

            th = threading.Thread(target=writer)
            th.start()
            time.sleep(3)
            t_kill = time.monotonic()
            d.kill()
            time.sleep(cfg["blockdev_down_s"])
            d.restart()
            t_up = time.monotonic()
            time.sleep(3)
            stop.set()
            th.join(timeout=120)
            around = [l for t, l in lat if t >= t_kill - 1]
            stall = max(around) if around else None
            runs.append({"down_s": t_up - t_kill, "stall_s": stall, "errors": errors,
                         "writes": len(lat), "p50_ms": statistics.median(l for _, l in lat) * 1000})
            C.log(f"  restart {rnd + 1}: agent down {t_up - t_kill:.2f} s, writer stall "
                  f"{stall if stall is None else round(stall, 3)} s, errors {errors or 'none'}")
            umount(mnt)
        finally:
            d.stop()
    os.unlink(img)
    return runs


# ---------------------------------------------------------------- the section

def run(cfg, workdir):
    if not os.path.exists(PEER_SCRIPT):
        raise RuntimeError(f"no peer script at {PEER_SCRIPT} (set VOLBENCH_BLOCKDEV_PEERS)")
    C.log(f"blockdev: {cfg['blockdev_rounds']} round(s) of blockdev_peers.py with volmig's device, "
          f"{cfg['blockdev_file_mib']} MiB, {cfg['blockdev_runtime']} s per job")
    rounds = [peers_round(cfg, workdir, r) for r in range(cfg["blockdev_rounds"])]
    jobs = {}
    for job in JOBS:
        row = {}
        for s in ["raw-loop", *PEERS, *VOLMIG]:
            v = [r[s][job]["iops"] for r in rounds if s in r]
            row[s] = {"iops": statistics.median(v) if v else None, "runs_iops": [round(x) for x in v]}
        for s in VOLMIG:
            vs_peer = [r[s][job]["iops"] / max(r[p][job]["iops"] for p in PEERS) for r in rounds]
            vs_raw = [r[s][job]["iops"] / r["raw-loop"][job]["iops"] for r in rounds]
            row[s]["vs_best_peer"] = vs_peer
            row[s]["vs_raw_loop"] = vs_raw
        jobs[job] = row
    C.log("blockdev: SQLite on ext4")
    sql = run_sqlite(cfg, workdir)
    C.log("blockdev: agent restart under a writer")
    restarts = run_restart(cfg, workdir)
    return {"jobs": jobs, "rounds": rounds, "sqlite": sql, "restarts": restarts,
            "file_mib": cfg["blockdev_file_mib"], "runtime_s": cfg["blockdev_runtime"],
            "sqlite_s": cfg["blockdev_sqlite_s"], "peer_script": PEER_SCRIPT}
