"""Scale: N concurrent idle migrations of separate volumes on one agent.
Aggregate throughput, per-session fairness (min/max of the sessions'
durations), the agent's memory (VmRSS sampled every 50 ms, VmHWM) and the
dirty map's size (its state file, sampled while the sessions run)."""
import os
import subprocess
import time

import common as C

DEFAULT_GRAIN = 64 << 10
DIRTY_MAP_HEADER = 4096  # 512 header words (node-agent/src/monitor/dirty_map.rs)


def run(cfg, workdir):
    size_mib = cfg["scale_mib"]
    counts = cfg["scale_counts"]
    nmax = max(counts)
    C.log(f"scale: {counts} concurrent sessions of {size_mib} MiB each, cold cache")
    srcs = [os.path.join(workdir, f"scale-src{i}.img") for i in range(nmax)]
    dsts = [os.path.join(workdir, f"scale-dst{i}.img") for i in range(nmax)]
    for s in srcs:
        C.make_random_file(s, size_mib)
    os.sync()
    out = {"size_mib": size_mib, "counts": counts, "runs": []}
    for n in counts:
        for d in dsts[:n]:
            C.make_target(d, size_mib * C.MiB)
        agent = C.Agent(workdir, {f"v{i}": srcs[i] for i in range(n)}, tag=f"scale{n}").start()
        try:
            C.drop_caches()
            time.sleep(0.3)
            rss_idle, _ = C.proc_mem(agent.pid)
            cpu0 = C.proc_cpu(agent.pid)
            t0 = time.monotonic()
            procs = [subprocess.Popen(agent.migrate_cmd(f"v{i}", dsts[i], mode="Auto", verify="None",
                                                        wait=True),
                                      stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
                     for i in range(n)]
            rss_peak, map_bytes = rss_idle or 0, {}
            while any(p.poll() is None for p in procs):
                rss, _ = C.proc_mem(agent.pid)
                rss_peak = max(rss_peak, rss or 0)
                try:
                    for f in os.listdir(agent.state):
                        if f.endswith(".dirty"):
                            map_bytes[f] = max(map_bytes.get(f, 0),
                                               os.path.getsize(os.path.join(agent.state, f)))
                except OSError:
                    pass
                if time.monotonic() - t0 > cfg["mig_timeout"]:
                    break
                time.sleep(0.05)
            wall_cmd = time.monotonic() - t0
            cpu = C.proc_cpu(agent.pid) - cpu0
            _, hwm = C.proc_mem(agent.pid)
            errors = [p.stderr.read().strip() for p in procs if p.wait() != 0]
            durs, starts, ends, phases, phase_ms = [], [], [], [], []
            for i in range(n):
                rec = agent.status(f"v{i}")["record"]
                phases.append(rec["phase"])
                phase_ms.append(C.phase_summary(rec).get("phase_ms"))
                pts = rec["phase_times"]
                s_ms = pts[0]["start_ms"]
                e_ms = max((p["end_ms"] or p["start_ms"]) for p in pts)
                starts.append(s_ms)
                ends.append(e_ms)
                durs.append((e_ms - s_ms) / 1000)
            wall = (max(ends) - min(starts)) / 1000
            r = {
                "sessions": n,
                "all_completed": all(p == "Completed" for p in phases) and not errors,
                "errors": errors[:3],
                "wall_s": wall,
                "wall_cmd_s": wall_cmd,
                "aggregate_mib_s": n * size_mib / wall if wall > 0 else None,
                "durations_s": durs,
                "phase_ms": phase_ms,
                "fairness_min_over_max": min(durs) / max(durs) if max(durs) > 0 else None,
                "agent_cpu_s": cpu,
                "agent_cores": cpu / wall_cmd,
                "rss_idle_mib": (rss_idle or 0) / C.MiB,
                "rss_peak_mib": rss_peak / C.MiB,
                "vmhwm_mib": (hwm or 0) / C.MiB,
                "rss_growth_per_session_mib": (rss_peak - (rss_idle or 0)) / n / C.MiB,
                "dirty_map_file_bytes": max(map_bytes.values()) if map_bytes else None,
            }
            out["runs"].append(r)
            C.log(f"  {n} session(s): {r['aggregate_mib_s']:.0f} MiB/s aggregate, fairness "
                  f"{r['fairness_min_over_max']:.2f}, RSS {r['rss_idle_mib']:.1f} -> "
                  f"{r['rss_peak_mib']:.1f} MiB (HWM {r['vmhwm_mib']:.1f}), agent {r['agent_cores']:.2f} cores")
        finally:
            agent.stop()
    for p in srcs + dsts:
        if os.path.exists(p):
            os.unlink(p)
    vol = size_mib * C.MiB
    grains_per_tib = (1 << 40) // DEFAULT_GRAIN
    out["dirty_map"] = {
        "grain": DEFAULT_GRAIN,
        "computed_bytes_per_tib": grains_per_tib // 8,
        "computed_per_session_bytes": DIRTY_MAP_HEADER + (vol // DEFAULT_GRAIN + 7) // 8,
    }
    seen = [r["dirty_map_file_bytes"] for r in out["runs"] if r["dirty_map_file_bytes"]]
    if seen:
        m = max(seen)
        out["dirty_map"]["measured_file_bytes"] = m
        out["dirty_map"]["measured_bytes_per_tib"] = (m - DIRTY_MAP_HEADER) * (1 << 40) // vol
    return out
