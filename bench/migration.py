"""Live migration under load: the QEMU peer script (run as it is, its printed
lines parsed) beside volmig-agent driven through the same workload shape:
fio randwrite 4k, iodepth 8, nbd over a unix socket, 8 s baseline, then 20 s
time-based with the migration started 2 s in, on a fresh random source made
with dd right before, like the script does."""
import os
import re
import shutil
import subprocess
import sys
import threading
import time

import common as C

PEER_RE = {
    "baseline": re.compile(r"baseline randwrite 4k qd8: (\d+) IOPS, max lat ([\d.]+) ms"),
    "mirror": re.compile(r"mirror \((\S+)\) (\d+) MiB under load: ready after ([\d.]+)s, "
                         r"complete after ([\d.]+)s, pivot ([\d.]+) ms"),
    "workload": re.compile(r"workload during migration: (\d+) IOPS \((\d+)% of baseline\), "
                           r"max lat ([\d.]+) ms"),
    "idle": re.compile(r"idle mirror (\d+) MiB: ([\d.]+)s = (\d+) MiB/s"),
    "convert": re.compile(r"offline qemu-img convert (\d+) MiB: ([\d.]+)s = (\d+) MiB/s"),
}

MIG_START_S = 2.0  # both sides start the migration 2 s after starting fio


def find_peer_script():
    cands = [os.environ.get("VOLBENCH_PEER_SCRIPT"),
             os.path.join(C.ROOT, "..", "shared", "peers", "qemu_mirror_bench.py"),
             "/work/shared/peers/qemu_mirror_bench.py"]
    for c in cands:
        if c and os.path.isfile(c):
            return os.path.realpath(c)
    return None


def _children(pid):
    return [(p, comm) for p, (ppid, comm, _) in C.proc_table().items() if ppid == pid]


def _cpu_at(samples, t):
    """CPU seconds of the last sample at or before t (or the first one)."""
    best = samples[0][1] if samples else None
    for ts, c in samples:
        if ts <= t:
            best = c
    return best


def run_peer(script, size, mode, workdir, timeout):
    tag = f"qemu-{mode}-{size}"
    tmp = os.path.join(workdir, "peer-tmp")
    os.makedirs(tmp, exist_ok=True)
    iops_prefix = os.path.join(workdir, f"{tag}")
    env = dict(os.environ, PATH=f"{os.path.join(C.HERE, 'shim')}:{os.environ.get('PATH', '')}",
               TMPDIR=tmp, VOLBENCH_IOPS_LOG=iops_prefix, VOLBENCH_REAL_FIO=C.REAL_FIO,
               PYTHONUNBUFFERED="1")
    cmd = ["python3", script, "--size-mib", str(size), "--mode", mode]
    C.log(f"  QEMU peer: {' '.join(cmd)}")
    os.sync()
    t_start = time.monotonic()
    p = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
                         start_new_session=True)
    lines, errs = [], []

    def reader(stream, sink):
        for line in stream:
            sink.append((time.monotonic(), line.rstrip("\n")))

    th = [threading.Thread(target=reader, args=(p.stdout, lines), daemon=True),
          threading.Thread(target=reader, args=(p.stderr, errs), daemon=True)]
    for t in th:
        t.start()
    qsd_pid, qsd_samples = None, []
    timed_out = False
    while p.poll() is None:
        if time.monotonic() - t_start > timeout:
            timed_out = True
            C.kill_group(p)
            break
        if qsd_pid is None:
            for pid, comm in _children(p.pid):
                if comm.startswith("qemu-storage"):
                    qsd_pid = pid
        if qsd_pid is not None:
            c = C.proc_cpu(qsd_pid)
            if c is not None:
                qsd_samples.append((time.monotonic(), c))
        time.sleep(0.2)
    p.wait()
    for t in th:
        t.join(5)
    shutil.rmtree(tmp, ignore_errors=True)
    res = {"system": "QEMU", "mode": mode, "size_mib": size, "command": " ".join(cmd),
           "exit_code": p.returncode, "timed_out": timed_out,
           "stdout": [ln for _, ln in lines],
           "stderr_tail": [ln for _, ln in errs if "connected to NBD" not in ln][-8:]}
    t_base = t_mirror = None
    for ts, ln in lines:
        for k, rx in PEER_RE.items():
            m = rx.search(ln)
            if not m:
                continue
            if k == "baseline":
                res["baseline_iops"] = float(m.group(1))
                res["baseline_max_lat_ms"] = float(m.group(2))
                t_base = ts
            elif k == "mirror":
                res["ready_s"] = float(m.group(3))
                res["migration_s"] = float(m.group(4))
                res["cutover_s"] = float(m.group(4))
                res["stall_ms"] = float(m.group(5))
                t_mirror = ts
            elif k == "workload":
                res["load_iops"] = float(m.group(1))
                res["share"] = float(m.group(1)) / max(res.get("baseline_iops", 1), 1)
                res["max_lat_ms"] = float(m.group(3))
            elif k == "idle":
                res["idle_mirror_s"] = float(m.group(2))
                res["idle_mirror_mib_s"] = float(m.group(3))
            elif k == "convert":
                res["convert_s"] = float(m.group(2))
                res["convert_mib_s"] = float(m.group(3))
    res["converged"] = "migration_s" in res
    if t_base and t_mirror and qsd_samples:
        c0, c1 = _cpu_at(qsd_samples, t_base), _cpu_at(qsd_samples, t_mirror)
        res["server_cores"] = (c1 - c0) / (t_mirror - t_base) if c1 is not None else None
    rows = C.read_fio_log(f"{iops_prefix}_iops.1.log")
    res["iops_series"] = rows
    if res["converged"] and rows:
        res["window_iops"] = C.window_iops(rows, MIG_START_S, MIG_START_S + res["migration_s"])
        if res["window_iops"] is not None and res.get("baseline_iops"):
            res["window_share"] = res["window_iops"] / res["baseline_iops"]
    for f in os.listdir(workdir):
        if f.startswith(tag + "_"):
            os.unlink(os.path.join(workdir, f))
    C.log(f"    -> {_fmt(res)}")
    return res


def run_volmig(size, mode, workdir, timeout, verify="None"):
    tag = f"volmig-{mode}-{size}" + ("" if verify == "None" else f"-verify{verify}")
    d = os.path.join(workdir, tag)
    os.makedirs(d, exist_ok=True)
    src, dst = os.path.join(d, "src.img"), os.path.join(d, "dst.img")
    C.log(f"  volmig {mode} {size} MiB (verify {verify})")
    os.sync()
    C.make_random_file(src, size)
    C.make_target(dst, size * C.MiB)
    agent = C.Agent(d, {"vol": src}, tag="a").start()
    res = {"system": "volmig", "mode": mode, "size_mib": size, "verify": verify}
    try:
        uri = agent.uri("vol")
        base = C.fio_run(C.fio_cmd(uri, "randwrite", "4k", 8, 8), timeout=120)["jobs"][0]["write"]
        res["baseline_iops"] = base["iops"]
        res["baseline_max_lat_ms"] = base["lat_ns"]["max"] / 1e6
        iops_prefix = os.path.join(d, "load")
        fcmd = C.fio_cmd(uri, "randwrite", "4k", 8, 20,
                         extra=[f"--write_lat_log={d}/lat", "--log_avg_msec=250",
                                f"--write_iops_log={iops_prefix}"])
        res["fio_command"] = " ".join(fcmd)
        rss0, _ = C.proc_mem(agent.pid)
        cpu0, tf0 = C.proc_cpu(agent.pid), time.monotonic()
        p = subprocess.Popen(fcmd, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
        time.sleep(MIG_START_S)
        t0_ms, t0 = time.time() * 1000, time.monotonic()
        mcmd = agent.migrate_cmd("vol", dst, mode=mode, verify=verify, wait=True)
        res["migrate_command"] = " ".join(mcmd)
        m = subprocess.Popen(mcmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        rss_peak = rss0 or 0
        while m.poll() is None:
            if time.monotonic() - t0 > timeout:
                agent.abort("vol")
                res["timed_out"] = True
                m.wait(60)
                break
            rss, _ = C.proc_mem(agent.pid)
            rss_peak = max(rss_peak, rss or 0)
            time.sleep(0.1)
        mout, merr = m.communicate()
        res["wait_s"] = time.monotonic() - t0
        res["migrate_exit"] = m.returncode
        if m.returncode != 0:
            res["migrate_error"] = (merr or mout).strip()[-400:]
        fout = p.communicate(timeout=120)[0]
        cpu1, tf1 = C.proc_cpu(agent.pid), time.monotonic()
        job = C.fio_parse(fout)["jobs"][0]["write"]
        res["load_iops"] = job["iops"]
        res["share"] = job["iops"] / max(res["baseline_iops"], 1)
        res["max_lat_ms"] = job["lat_ns"]["max"] / 1e6
        res["server_cores"] = (cpu1 - cpu0) / (tf1 - tf0)
        res["rss_mib"] = {"before": (rss0 or 0) / C.MiB, "peak": rss_peak / C.MiB,
                          "hwm": (C.proc_mem(agent.pid)[1] or 0) / C.MiB}
        st = agent.status("vol")
        rec = st["record"]
        ph = C.phase_summary(rec, t0_ms)
        res["phase"] = rec["phase"]
        res["phase_ms"] = ph.get("phase_ms")
        res["converged"] = rec["phase"] == "Completed" and bool(rec["progress"].get("converged"))
        res["passes"] = rec["progress"].get("passes")
        res["mirror"] = rec["progress"].get("mirror")
        res["bytes_copied"] = rec.get("bytes_copied")
        res["stall_ms"] = rec.get("cutover_stall_ms")
        res["verified"] = rec.get("verified")
        res["error"] = rec.get("error")
        if rec["phase"] == "Completed":
            term = ph.get("terminating_ms", 0) / 1000
            res["total_s"] = ph["end_s"]
            res["migration_s"] = ph["end_s"] - (term if verify != "None" else 0)
            res["cutover_s"] = ph.get("cutover_s")
            res["terminating_s"] = term
            q = rec["phase_times"]
            sync_start = next((x["start_ms"] for x in q if x["phase"] == "Quiescing"), None)
            if sync_start:
                res["ready_s"] = (sync_start - t0_ms) / 1000
        rows = C.read_fio_log(f"{iops_prefix}_iops.1.log")
        res["iops_series"] = rows
        if res.get("migration_s") and rows:
            res["window_iops"] = C.window_iops(rows, MIG_START_S, MIG_START_S + res["migration_s"])
            if res["window_iops"] is not None:
                res["window_share"] = res["window_iops"] / max(res["baseline_iops"], 1)
    except Exception as e:  # noqa: BLE001 - a failed run is a result, not a crash
        res["error"] = f"{type(e).__name__}: {e}"
        res.setdefault("converged", False)
        print(f"volmig run failed: {e}", file=sys.stderr)
    finally:
        agent.stop()
        log_tail = open(agent.logpath, errors="replace").read().strip().splitlines()[-5:]
        if log_tail:
            res["agent_log_tail"] = log_tail
        shutil.rmtree(d, ignore_errors=True)
    C.log(f"    -> {_fmt(res)}")
    return res


def _fmt(r):
    if not r.get("converged"):
        return f"NOT converged ({r.get('error') or r.get('stderr_tail') or r.get('phase')})"
    return (f"base {r.get('baseline_iops', 0):.0f} IOPS, load {r.get('load_iops', 0):.0f} "
            f"({100 * r.get('share', 0):.0f}%), migration {r.get('migration_s', 0):.2f}s, "
            f"max lat {r.get('max_lat_ms', 0):.1f} ms, stall {r.get('stall_ms') or 0:.1f} ms")


def run(cfg, workdir):
    script = find_peer_script()
    out = {"peer_script": script, "sizes_mib": cfg["load_sizes"], "runs": [],
           "sync_goal_ms": 100, "mig_start_s": MIG_START_S}
    if not script:
        C.log("under load: QEMU peer script not found (set VOLBENCH_PEER_SCRIPT); volmig only")
    for size in cfg["load_sizes"]:
        C.log(f"under load: {size} MiB")
        order = [("QEMU", "background"), ("volmig", "Background"), ("QEMU", "write-blocking"),
                 ("volmig", "Mirror"), ("volmig", "Auto")]
        only = os.environ.get("VOLBENCH_MODES")  # e.g. "volmig:Mirror,QEMU:write-blocking"
        if only:
            order = [o for o in order if f"{o[0]}:{o[1]}" in only.split(",")]
        for system, mode in order:
            if system == "QEMU":
                if script:
                    out["runs"].append(run_peer(script, size, mode, workdir, cfg["peer_timeout"]))
            else:
                out["runs"].append(run_volmig(size, mode, workdir, cfg["mig_timeout"]))
    if not cfg.get("load_verify_full"):
        return out
    vsize = cfg["load_sizes"][0]
    C.log(f"under load: one volmig Auto run with --verify Full ({vsize} MiB)")
    out["verify_full"] = run_volmig(vsize, "Auto", workdir, cfg["mig_timeout"], verify="Full")
    return out
