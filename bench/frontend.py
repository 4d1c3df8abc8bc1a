"""Frontend: fio's nbd engine against volmig-agent, qemu-nbd and nbdkit's file
plugin serving the same file, one server at a time, interleaved job by job
(each job runs on each server before the next job; the server order rotates)
so that machine noise hits all servers alike. Medians over the rounds."""
import os
import statistics
import subprocess
import time

import common as C

JOBS = [
    # name, rw, bs, iodepth
    ("randread 4k qd1", "randread", "4k", 1),
    ("randread 4k qd8", "randread", "4k", 8),
    ("randread 4k qd32", "randread", "4k", 32),
    ("randwrite 4k qd1", "randwrite", "4k", 1),
    ("randwrite 4k qd8", "randwrite", "4k", 8),
    ("randwrite 4k qd32", "randwrite", "4k", 32),
    ("seqread 1M qd8", "read", "1M", 8),
    ("seqwrite 1M qd8", "write", "1M", 8),
]

SERVERS = ["volmig", "qemu-nbd", "nbdkit"]


def server_cmd(kind, path, sock, workdir):
    if kind == "qemu-nbd":
        # -t: keep serving after a client disconnects. cache=writeback and
        # aio=threads are qemu-nbd's defaults, spelled out: buffered I/O,
        # like volmig's agent.
        return ["qemu-nbd", "-f", "raw", "-t", "-k", sock, "-x", "vol",
                "--cache=writeback", "--aio=threads", path]
    if kind == "nbdkit":
        # file plugin, default (page cache) mode, parallel thread model.
        return ["nbdkit", "-f", "-U", sock, "file", path]
    raise ValueError(kind)


class Server:
    def __init__(self, kind, path, workdir):
        self.kind, self.path, self.workdir = kind, path, workdir
        self.sock = os.path.join(workdir, f"fe-{kind}.sock")

    def start(self):
        if self.kind == "volmig":
            self.agent = C.Agent(self.workdir, {"vol": self.path}, tag="fe-volmig").start()
            self.proc = self.agent.proc
            self.uri = self.agent.uri("vol")
            self.cmdline = " ".join(self.agent.cmdline)
            return self
        if os.path.exists(self.sock):
            os.unlink(self.sock)
        cmd = server_cmd(self.kind, self.path, self.sock, self.workdir)
        self.cmdline = " ".join(cmd)
        self.proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL,
                                     stderr=open(os.path.join(self.workdir, f"fe-{self.kind}.log"), "ab"))
        C.wait_socket(self.sock, self.proc)
        self.uri = f"nbd+unix:///vol?socket={self.sock}"
        return self

    def stop(self):
        if self.kind == "volmig":
            self.agent.stop()
        else:
            C.stop(self.proc)


def run(cfg, workdir):
    size_mib = cfg["frontend_file_mib"]
    path = os.path.join(workdir, "frontend.img")
    C.log(f"frontend: {size_mib} MiB random file, {cfg['frontend_rounds']} round(s) of "
          f"{len(JOBS)} jobs x {len(SERVERS)} servers, {cfg['frontend_runtime']} s each")
    C.make_random_file(path, size_mib)
    C.fsync_path(path)
    C.warm(path)
    raw = {s: {j[0]: [] for j in JOBS} for s in SERVERS}
    cmdlines = {}
    for rnd in range(cfg["frontend_rounds"]):
        for ji, (name, rw, bs, qd) in enumerate(JOBS):
            order = SERVERS[(rnd + ji) % 3:] + SERVERS[:(rnd + ji) % 3]
            for kind in order:
                srv = Server(kind, path, workdir).start()
                cmdlines[kind] = srv.cmdline
                try:
                    cmd = C.fio_cmd(srv.uri, rw, bs, qd, cfg["frontend_runtime"],
                                    ramp=cfg["frontend_ramp"], name="fe")
                    cpu0, t0 = C.proc_cpu(srv.proc.pid), time.monotonic()
                    out = C.fio_run(cmd, timeout=cfg["frontend_runtime"] * 4 + 60)
                    cpu1, t1 = C.proc_cpu(srv.proc.pid), time.monotonic()
                finally:
                    srv.stop()
                ddir = "write" if "write" in rw else "read"
                r = C.fio_summary(out["jobs"][0], ddir)
                cores = (cpu1 - cpu0) / (t1 - t0) if cpu0 is not None and cpu1 is not None else None
                r["server_cores"] = cores
                r["server_cpu_us_per_io"] = (cores / r["iops"] * 1e6) if cores and r["iops"] else None
                raw[kind][name].append(r)
                if ddir == "write":
                    C.fsync_path(path)  # write back outside the next measurement
                C.log(f"  {name:<18} {kind:<9} {r['iops']:>9.0f} IOPS {r['mib_s']:>8.1f} MiB/s "
                      f"p99 {r['p99_us']:>8.1f} us  server {cores or 0:.2f} cores")
    res = {}
    for name, rw, bs, qd in JOBS:
        row = {}
        for kind in SERVERS:
            runs = raw[kind][name]
            med = {k: statistics.median([x[k] for x in runs if x.get(k) is not None] or [0])
                   for k in ("iops", "mib_s", "p99_us", "mean_lat_us", "server_cores",
                             "server_cpu_us_per_io", "fio_cpu_pct")}
            med["runs_iops"] = [round(x["iops"]) for x in runs]
            row[kind] = med
        peers = [row[p] for p in SERVERS if p != "volmig"]
        best_iops = max(p["iops"] for p in peers)
        best_p99 = min(p["p99_us"] for p in peers)
        row["ratio_iops"] = row["volmig"]["iops"] / best_iops if best_iops else None
        row["ratio_p99"] = row["volmig"]["p99_us"] / best_p99 if best_p99 else None
        row["best_peer"] = max((p for p in SERVERS if p != "volmig"), key=lambda p: row[p]["iops"])
        res[name] = row
    os.unlink(path)
    return {"jobs": res, "servers": cmdlines, "file_mib": size_mib,
            "runtime_s": cfg["frontend_runtime"], "ramp_s": cfg["frontend_ramp"],
            "rounds": cfg["frontend_rounds"],
            "job_defs": [{"name": j[0], "rw": j[1], "bs": j[2], "iodepth": j[3]} for j in JOBS]}
