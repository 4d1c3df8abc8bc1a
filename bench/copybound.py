"""Copy bound and sparse volumes: an idle volmig migration against
`qemu-img convert -n -f raw -O raw` and `nbdcopy` on the same files.

Every run writes into a fresh sparse target and is timed until the target is
durable: the tool's own time plus an fsync of the target afterwards (volmig
flushes the target itself before cutover; qemu-img convert and nbdcopy by
default do not, so the fsync puts them on the same footing). `cold` runs drop
the page cache first (the source is read from the disk), `hot` runs read the
source once before (it is served from memory)."""
import os
import statistics
import subprocess
import time

import common as C

TOOLS = ["volmig", "qemu-img", "nbdcopy"]


def tool_cmd(tool, src, dst):
    if tool == "qemu-img":
        return ["qemu-img", "convert", "-n", "-f", "raw", "-O", "raw", src, dst]
    if tool == "nbdcopy":
        return ["nbdcopy", src, dst]
    raise ValueError(tool)


def copy_once(tool, src, dst, size, workdir, cache, verify="None"):
    """One timed copy into a fresh target; returns a dict of figures."""
    C.make_target(dst, size)
    agent = None
    if tool == "volmig":
        agent = C.Agent(workdir, {"vol": src}, tag="copy").start()
    if cache == "cold":
        ok = C.drop_caches()
        if not ok:
            cache = "cold-unavailable"
    else:
        os.sync()
        C.warm(src)
    r = {"tool": tool, "cache": cache}
    try:
        if agent:
            cmd = agent.migrate_cmd("vol", dst, mode="Auto", verify=verify, wait=True)
            cpu0 = C.proc_cpu(agent.pid)
            t0_ms, t0 = time.time() * 1000, time.monotonic()
            p = subprocess.run(cmd, capture_output=True, text=True, timeout=1800)
            r["tool_s"] = time.monotonic() - t0
            r["cpu_s"] = C.proc_cpu(agent.pid) - cpu0
            if p.returncode != 0:
                raise RuntimeError(f"migrate failed: {(p.stderr or p.stdout).strip()[-300:]}")
            rec = agent.status("vol")["record"]
            ph = C.phase_summary(rec, t0_ms)
            r["phase_ms"] = ph["phase_ms"]
            r["terminating_s"] = ph["terminating_ms"] / 1000
            r["verified"] = rec.get("verified")
            r["rss_hwm_mib"] = (C.proc_mem(agent.pid)[1] or 0) / C.MiB
        else:
            cmd = tool_cmd(tool, src, dst)
            cpu0 = C.children_cpu()
            t0 = time.monotonic()
            p = subprocess.run(cmd, capture_output=True, text=True, timeout=1800)
            r["tool_s"] = time.monotonic() - t0
            r["cpu_s"] = C.children_cpu() - cpu0
            if p.returncode != 0:
                raise RuntimeError(f"{tool} failed: {p.stderr.strip()[-300:]}")
        r["command"] = " ".join(cmd)
        r["fsync_s"] = C.fsync_path(dst)
        r["total_s"] = r["tool_s"] + r["fsync_s"]
        r["target_allocated"] = C.allocated_bytes(dst)
    finally:
        if agent:
            agent.stop()
    return r


def _median_by(runs, tool, cache, key="total_s"):
    v = [x[key] for x in runs if x["tool"] == tool and x["cache"].startswith(cache) and key in x]
    return statistics.median(v) if v else None


def run_copy(cfg, workdir):
    size_mib = cfg["copy_mib"]
    src, dst = os.path.join(workdir, "copy-src.img"), os.path.join(workdir, "copy-dst.img")
    C.log(f"copy bound: {size_mib} MiB random, {cfg['copy_reps']} rep(s), cold and hot cache")
    C.make_random_file(src, size_mib)
    C.fsync_path(src)
    runs = []
    for rep in range(cfg["copy_reps"]):
        for cache in ("cold", "hot"):
            order = TOOLS[rep % 3:] + TOOLS[:rep % 3]
            for tool in order:
                r = copy_once(tool, src, dst, size_mib * C.MiB, workdir, cache)
                r["mib_s"] = size_mib / r["total_s"]
                runs.append(r)
                C.log(f"  {tool:<9} {cache:<5} {r['total_s']:6.2f} s (fsync {r['fsync_s']:.2f}) "
                      f"= {r['mib_s']:6.0f} MiB/s, cpu {r['cpu_s']:.2f} s")
    C.log("  volmig --verify Full (idle, cold), for the record")
    vf = copy_once("volmig", src, dst, size_mib * C.MiB, workdir, "cold", verify="Full")
    vf["mib_s"] = size_mib / vf["total_s"]
    C.log(f"    {vf['total_s']:.2f} s total, of which Terminating (verify) {vf['terminating_s']:.2f} s, "
          f"verified {vf.get('verified')}")
    summary = {}
    for cache in ("cold", "hot"):
        row = {}
        for tool in TOOLS:
            t = _median_by(runs, tool, cache)
            cpu = _median_by(runs, tool, cache, "cpu_s")
            row[tool] = {"total_s": t, "mib_s": size_mib / t if t else None, "cpu_s": cpu}
        q = row["qemu-img"]["mib_s"]
        row["ratio_vs_qemu_img"] = row["volmig"]["mib_s"] / q if q else None
        best = max(row[t]["mib_s"] or 0 for t in TOOLS if t != "volmig")
        row["ratio_vs_best"] = row["volmig"]["mib_s"] / best if best else None
        summary[cache] = row
    os.unlink(src)
    if os.path.exists(dst):
        os.unlink(dst)
    return {"size_mib": size_mib, "reps": cfg["copy_reps"], "runs": runs, "summary": summary,
            "verify_full": vf}


def run_sparse(cfg, workdir, dense=None):
    vol_mib, data_mib = cfg["sparse_size_mib"], cfg["sparse_data_mib"]
    src, dst = os.path.join(workdir, "sparse-src.img"), os.path.join(workdir, "sparse-dst.img")
    C.log(f"sparse: {vol_mib} MiB volume with {data_mib} MiB of data in 1 MiB extents, cold cache")
    layout = C.make_sparse_file(src, vol_mib * C.MiB, data_mib * C.MiB)
    C.fsync_path(src)
    runs = []
    for rep in range(cfg["sparse_reps"]):
        for tool in TOOLS:
            r = copy_once(tool, src, dst, vol_mib * C.MiB, workdir, "cold")
            runs.append(r)
            C.log(f"  {tool:<9} {r['total_s']:6.2f} s, target allocated "
                  f"{r['target_allocated'] / C.MiB:.0f} MiB, cpu {r['cpu_s']:.2f} s")
    summary = {}
    for tool in TOOLS:
        t = _median_by(runs, tool, "cold")
        alloc = statistics.median([x["target_allocated"] for x in runs if x["tool"] == tool])
        d = None
        if dense and dense.get("size_mib") == data_mib:
            d = dense["summary"]["cold"][tool]["total_s"]
        summary[tool] = {"total_s": t, "target_allocated_mib": alloc / C.MiB,
                         "dense_same_data_s": d,
                         "sparse_over_dense": (t / d) if (t and d) else None,
                         "data_mib_s": data_mib / t if t else None}
    q = summary["qemu-img"]["total_s"]
    summary["ratio_time_vs_qemu_img"] = summary["volmig"]["total_s"] / q if q else None
    os.unlink(src)
    if os.path.exists(dst):
        os.unlink(dst)
    return {"size_mib": vol_mib, "data_mib": data_mib, "layout": layout, "runs": runs,
            "summary": summary}
