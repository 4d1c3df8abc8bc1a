"""Shared helpers of the volmig benchmark harness: processes, fio, the agent,
/proc sampling, caches, machine facts and an interference monitor.

Everything here drives real binaries (volmig-agent, fio, qemu-nbd, nbdkit,
qemu-img, nbdcopy) on files in a scratch directory; nothing is simulated.
"""
import json
import os
import resource
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
AGENT_BIN = os.environ.get("VOLMIG_AGENT") or os.path.join(ROOT, "target/release/volmig-agent")
# The master: `volmig migrate` drives the agent over its control socket.
VOLMIG_BIN = os.environ.get("VOLMIG") or os.path.join(ROOT, "target/release/volmig")
CLK = os.sysconf("SC_CLK_TCK")
MiB = 1 << 20
GiB = 1 << 30

_t_start = time.monotonic()


def log(msg):
    el = time.monotonic() - _t_start
    print(f"[{int(el) // 60:3d}:{int(el) % 60:02d}] {msg}", file=sys.stderr, flush=True)


# ---------------------------------------------------------------- files

def make_random_file(path, mib):
    """Random data, made exactly like the peer script makes its source."""
    if os.path.exists(path):
        os.unlink(path)
    subprocess.run(["dd", "if=/dev/urandom", f"of={path}", "bs=1M", f"count={mib}",
                    "status=none"], check=True)


def make_target(path, size):
    """A fresh, fully sparse target of `size` bytes."""
    if os.path.exists(path):
        os.unlink(path)
    with open(path, "wb") as f:
        f.truncate(size)


def make_sparse_file(path, size, data, extent=MiB):
    """`size` bytes, `data` of them random in `extent`-sized runs spread evenly."""
    if os.path.exists(path):
        os.unlink(path)
    n = data // extent
    stride = size // n
    with open(path, "wb") as f:
        f.truncate(size)
        for i in range(n):
            f.seek(i * stride)
            f.write(os.urandom(extent))
    return {"extents": n, "extent_bytes": extent, "stride_bytes": stride}


def allocated_bytes(path):
    return os.stat(path).st_blocks * 512


def fsync_path(path):
    t0 = time.monotonic()
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
    return time.monotonic() - t0


def drop_caches():
    """Writes dirty data back and drops the page cache (root only)."""
    os.sync()
    try:
        with open("/proc/sys/vm/drop_caches", "w") as f:
            f.write("3\n")
        return True
    except OSError:
        return False


def warm(path):
    """Reads the whole file once so that it sits in the page cache."""
    with open(path, "rb", buffering=0) as f:
        while f.read(8 * MiB):
            pass


# ---------------------------------------------------------------- /proc

def proc_cpu(pid):
    """CPU seconds (user+system, all threads) of a live process, or None."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            s = f.read()
    except OSError:
        return None
    fields = s[s.rindex(")") + 2:].split()
    return (int(fields[11]) + int(fields[12])) / CLK


def proc_mem(pid):
    """(VmRSS, VmHWM) in bytes, or (None, None)."""
    out = {}
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith(("VmRSS:", "VmHWM:")):
                    k, v = line.split(":", 1)
                    out[k] = int(v.split()[0]) * 1024
    except OSError:
        return None, None
    return out.get("VmRSS"), out.get("VmHWM")


def children_cpu():
    r = resource.getrusage(resource.RUSAGE_CHILDREN)
    return r.ru_utime + r.ru_stime


def system_busy():
    """(busy, total) jiffies from /proc/stat."""
    with open("/proc/stat") as f:
        v = [int(x) for x in f.readline().split()[1:]]
    idle = v[3] + v[4]
    return sum(v[:8]) - idle, sum(v[:8])


# ---------------------------------------------------------------- processes

def wait_socket(path, proc=None, timeout=30.0, kind=socket.SOCK_STREAM):
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"{proc.args[0]} exited with {proc.returncode} before listening on {path}")
        if os.path.exists(path):
            s = socket.socket(socket.AF_UNIX, kind)
            try:
                s.connect(path)
                return
            except OSError:
                pass
            finally:
                s.close()
        time.sleep(0.02)
    raise TimeoutError(f"nothing listening on {path}")


def stop(proc, timeout=15.0):
    """SIGTERM, then SIGKILL, this one process (by its pid)."""
    if proc is None or proc.poll() is not None:
        return
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def kill_group(proc, timeout=10.0):
    """Ends a child started with start_new_session=True and its process group."""
    if proc.poll() is None:
        try:
            os.killpg(proc.pid, signal.SIGTERM)
        except ProcessLookupError:
            pass
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            try:
                os.killpg(proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            proc.wait()


def tool_version(cmd):
    try:
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=10)
        return (out.stdout or out.stderr).strip().splitlines()[0]
    except Exception as e:  # noqa: BLE001 - informational only
        return f"unknown ({e})"


# ---------------------------------------------------------------- fio

REAL_FIO = shutil.which("fio") or "fio"


def fio_cmd(uri, rw, bs, iodepth, runtime, ramp=0, name="w", extra=()):
    cmd = [REAL_FIO, f"--name={name}", "--ioengine=nbd", f"--uri={uri}", f"--rw={rw}",
           f"--bs={bs}", f"--iodepth={iodepth}", "--time_based", f"--runtime={runtime}",
           "--output-format=json"]
    if ramp:
        cmd.append(f"--ramp_time={ramp}")
    return cmd + list(extra)


def fio_parse(out):
    """fio's nbd engine prints a line before the JSON; skip it like the peer script."""
    return json.loads(out[out.index("{"):])


def fio_run(cmd, timeout=None):
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    if p.returncode != 0:
        raise RuntimeError(f"fio failed ({p.returncode}): {p.stderr.strip()[-500:]}")
    return fio_parse(p.stdout)


def fio_summary(job, ddir):
    d = job[ddir]
    pct = d.get("clat_ns", {}).get("percentile", {})
    return {
        "iops": d["iops"],
        "mib_s": d["bw_bytes"] / MiB,
        "p99_us": pct.get("99.000000", 0) / 1000,
        "mean_lat_us": d["lat_ns"]["mean"] / 1000,
        "max_lat_ms": d["lat_ns"]["max"] / 1e6,
        "ios": d["total_ios"],
        "fio_cpu_pct": job.get("usr_cpu", 0) + job.get("sys_cpu", 0),
    }


def read_fio_log(path):
    """[(t_ms, value)] of a fio iops/lat log."""
    rows = []
    try:
        with open(path) as f:
            for line in f:
                parts = line.split(",")
                if len(parts) >= 2:
                    rows.append((int(parts[0]), int(parts[1])))
    except OSError:
        pass
    return rows


def window_iops(rows, t0_s, t1_s):
    """Mean IOPS of the 250 ms log buckets that end inside [t0, t1]."""
    vals = [v for t, v in rows if t0_s * 1000 < t <= max(t1_s * 1000, t0_s * 1000 + 250)]
    return sum(vals) / len(vals) if vals else None


# ---------------------------------------------------------------- volmig agent

class Agent:
    """One `volmig-agent serve` process with its own state directory, and
    the local master (`volmig migrate` over the agent's control socket,
    records in its own state directory) that migrates its volumes."""

    def __init__(self, workdir, exports, tag="agent"):
        self.workdir = workdir
        self.exports = dict(exports)
        self.sock = os.path.join(workdir, f"{tag}.nbd.sock")
        self.ctl = os.path.join(workdir, f"{tag}.ctl.sock")
        self.state = os.path.join(workdir, f"{tag}.state")
        self.master_state = os.path.join(workdir, f"{tag}.master")
        self.logpath = os.path.join(workdir, f"{tag}.log")
        self.proc = None

    def start(self):
        shutil.rmtree(self.state, ignore_errors=True)
        shutil.rmtree(self.master_state, ignore_errors=True)
        cmd = [AGENT_BIN, "serve", "--state-dir", self.state]
        for name, path in self.exports.items():
            cmd += ["--export", f"{name}={path}"]
        cmd += ["--nbd-unix", self.sock, "--control", self.ctl]
        self.cmdline = cmd
        self._log = open(self.logpath, "ab")
        self.proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=self._log,
                                     env=dict(os.environ, RUST_LOG="warn", NO_COLOR="1"))
        wait_socket(self.sock, self.proc)
        wait_socket(self.ctl, self.proc)
        return self

    @property
    def pid(self):
        return self.proc.pid

    def uri(self, name="vol"):
        return f"nbd+unix:///{name}?socket={self.sock}"

    def migrate_cmd(self, vol, target, mode="Auto", verify="None", wait=True, sync_goal="100ms"):
        """`volmig migrate`: runs until the session ends (exit 0 only when it
        Completed), as many at once as asked (no queue)."""
        if not wait:
            raise ValueError("volmig migrate always waits for the end")
        return [VOLMIG_BIN, "migrate", "--quiet", "--state-dir", self.master_state,
                "--agent", f"unix://{self.ctl}", "--max-concurrent", "0",
                vol, target, "--mode", mode, "--sync-goal", sync_goal, "--bandwidth", "0",
                "--verify", verify]

    def status(self, vol):
        """{"record": the master's session record}."""
        out = subprocess.run([VOLMIG_BIN, "status", "--state-dir", self.master_state, vol, "--json"],
                             capture_output=True, text=True, timeout=30)
        if out.returncode != 0:
            raise RuntimeError(f"status {vol}: {out.stderr.strip()}")
        return {"record": json.loads(out.stdout)}

    def abort(self, vol):
        subprocess.run([VOLMIG_BIN, "abort", "--state-dir", self.master_state, vol],
                       capture_output=True, timeout=30)

    def stop(self):
        stop(self.proc)
        if getattr(self, "_log", None):
            self._log.close()


def phase_summary(record, t0_ms=None):
    """Times (s) out of a session record's phase timeline; relative to t0_ms if given."""
    pts = record.get("phase_times", [])
    if not pts:
        return {}
    base = t0_ms if t0_ms is not None else pts[0]["start_ms"]
    by = {}
    for p in pts:
        d = by.setdefault(p["phase"], {"start_ms": p["start_ms"], "end_ms": p["end_ms"], "ms": 0})
        d["end_ms"] = p["end_ms"]
        if p["end_ms"] is not None:
            d["ms"] += p["end_ms"] - p["start_ms"]
    end_ms = max((p["end_ms"] or p["start_ms"]) for p in pts)
    out = {
        "phase_ms": {k: v["ms"] for k, v in by.items()},
        "end_s": (end_ms - base) / 1000,
        "start_s": (pts[0]["start_ms"] - base) / 1000,
    }
    if "Resuming" in by and by["Resuming"]["end_ms"]:
        out["cutover_s"] = (by["Resuming"]["end_ms"] - base) / 1000
    out["terminating_ms"] = by.get("Terminating", {}).get("ms", 0)
    return out


# ---------------------------------------------------------------- machine & interference

def machine_facts():
    def first(cmd):
        try:
            return subprocess.run(cmd, capture_output=True, text=True, timeout=10).stdout.strip()
        except Exception:  # noqa: BLE001
            return "?"
    mem = 0
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith("MemTotal:"):
                mem = int(line.split()[1]) * 1024
    cpu = "?"
    with open("/proc/cpuinfo") as f:
        for line in f:
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    df = first(["df", "-T", "/tmp"]).splitlines()
    tmpfs = df[-1].split()[1] if len(df) > 1 else "?"
    return {
        "nproc": os.cpu_count(),
        "cpu": cpu,
        "mem_gib": round(mem / GiB, 1),
        "kernel": os.uname().release,
        "tmp_fs": tmpfs,
        "tmp_dev": df[-1].split()[0] if len(df) > 1 else "?",
        "versions": {
            "fio": tool_version(["fio", "--version"]),
            "qemu-img": tool_version(["qemu-img", "--version"]),
            "qemu-nbd": tool_version(["qemu-nbd", "--version"]),
            "nbdkit": tool_version(["nbdkit", "--version"]),
            "nbdcopy": tool_version(["nbdcopy", "--version"]),
            "python": sys.version.split()[0],
        },
        "git": {
            "commit": first(["git", "-C", ROOT, "rev-parse", "--short", "HEAD"]),
            "dirty": bool(first(["git", "-C", ROOT, "status", "--porcelain", "--untracked-files=no"])),
        },
    }


def proc_table():
    """Every process: {pid: (ppid, comm, cpu seconds)}, from /proc/*/stat."""
    procs = {}
    for d in os.listdir("/proc"):
        if not d.isdigit():
            continue
        try:
            with open(f"/proc/{d}/stat") as f:
                s = f.read()
        except OSError:
            continue
        comm = s[s.index("(") + 1:s.rindex(")")]
        fields = s[s.rindex(")") + 2:].split()
        ppid = int(fields[1])
        cpu = (int(fields[11]) + int(fields[12])) / CLK
        procs[int(d)] = (ppid, comm, cpu)
    return procs


class Interference:
    """Samples /proc every `period` s and accounts CPU used by processes that
    are neither ours (descendants of this harness) nor kernel threads: other
    tests or builds running on the machine at the same time."""

    def __init__(self, period=2.0):
        self.period = period
        self.me = os.getpid()
        self.prev = {}
        self.sections = {}
        self.current = None
        self.lock = threading.Lock()
        self.stop_ev = threading.Event()
        self.t = threading.Thread(target=self._loop, daemon=True)

    def start(self):
        self.t.start()
        return self

    def section(self, name):
        with self.lock:
            self.current = name
            self.sections.setdefault(name, {"other_cpu_s": 0.0, "top": {}, "wall_s": 0.0,
                                            "busy_share": None, "_busy0": system_busy(),
                                            "_t0": time.monotonic()})

    def end_section(self):
        with self.lock:
            if self.current:
                s = self.sections[self.current]
                b0, t0 = s.pop("_busy0")
                b1, t1 = system_busy()
                s["busy_share"] = round((b1 - b0) / max(t1 - t0, 1), 3)
                s["wall_s"] = round(time.monotonic() - s.pop("_t0"), 1)
            self.current = None

    def _scan(self):
        return proc_table()

    def _ours(self, pid, procs):
        seen = 0
        while pid > 1 and seen < 64:
            if pid == self.me:
                return True
            pid = procs.get(pid, (0,))[0]
            seen += 1
        return False

    def _loop(self):
        while not self.stop_ev.wait(self.period):
            procs = self._scan()
            with self.lock:
                sec = self.sections.get(self.current) if self.current else None
                for pid, (ppid, comm, cpu) in procs.items():
                    if ppid == 2 or pid == 2 or self._ours(pid, procs):
                        continue
                    old = self.prev.get(pid)
                    if old and old[0] == comm and sec is not None:
                        d = cpu - old[1]
                        if d > 0:
                            sec["other_cpu_s"] += d
                            sec["top"][comm] = sec["top"].get(comm, 0) + d
                self.prev = {pid: (comm, cpu) for pid, (ppid, comm, cpu) in procs.items()}

    def close(self):
        self.end_section()
        self.stop_ev.set()
        out = {}
        for k, s in self.sections.items():
            top = sorted(s["top"].items(), key=lambda kv: -kv[1])[:4]
            out[k] = {"other_cpu_s": round(s["other_cpu_s"], 1),
                      "other_cores": round(s["other_cpu_s"] / max(s["wall_s"], 0.1), 2),
                      "busy_share": s["busy_share"], "wall_s": s["wall_s"],
                      "top": [[c, round(v, 1)] for c, v in top if v >= 0.5]}
        return out
