"""volmig benchmark harness: runs every section, writes the results JSON and
renders docs/BENCHMARKS.md. Started by bench/run, which installs the tools
and builds the agent first; see `bench/run --help`."""
import argparse
import json
import os
import shutil
import sys
import tempfile
import time
import traceback

import common as C

CONFIGS = {
    "quick": {
        "frontend_file_mib": 1024, "frontend_rounds": 1, "frontend_runtime": 2, "frontend_ramp": 1,
        "load_sizes": [256], "load_verify_full": False, "peer_timeout": 600, "mig_timeout": 300,
        "copy_mib": 256, "copy_reps": 1,
        "sparse_size_mib": 4096, "sparse_data_mib": 256, "sparse_reps": 1,
        "scale_mib": 256, "scale_counts": [1, 4],
        "blockdev_rounds": 1, "blockdev_file_mib": 512, "blockdev_runtime": 3,
        "blockdev_sqlite_mib": 512, "blockdev_sqlite_s": 4, "blockdev_restarts": 1, "blockdev_down_s": 0.3,
    },
    "full": {
        "frontend_file_mib": 1024, "frontend_rounds": 3, "frontend_runtime": 8, "frontend_ramp": 1,
        "load_sizes": [1024, 4096], "load_verify_full": True, "peer_timeout": 900, "mig_timeout": 600,
        "copy_mib": 1024, "copy_reps": 3,
        "sparse_size_mib": 16384, "sparse_data_mib": 1024, "sparse_reps": 2,
        "scale_mib": 256, "scale_counts": [1, 2, 4, 8],
        "blockdev_rounds": 3, "blockdev_file_mib": 1024, "blockdev_runtime": 6,
        "blockdev_sqlite_mib": 1024, "blockdev_sqlite_s": 8, "blockdev_restarts": 3, "blockdev_down_s": 0.3,
    },
}
SECTIONS = ["frontend", "migration", "copy", "sparse", "scale", "blockdev"]


def main():
    ap = argparse.ArgumentParser(prog="bench/run", description=__doc__)
    ap.add_argument("--quick", action="store_true", help="smoke run: small sizes, one round (a few minutes)")
    ap.add_argument("--only", default="", help=f"comma-separated sections ({','.join(SECTIONS)})")
    ap.add_argument("--docs", dest="docs", action="store_true", default=None,
                    help="write docs/BENCHMARKS.md and docs/migration_iops.png (default: full mode only)")
    ap.add_argument("--no-docs", dest="docs", action="store_false")
    ap.add_argument("--workdir", default=None, help="scratch directory (default: a new one under /tmp)")
    ap.add_argument("--keep", action="store_true", help="keep the scratch directory")
    ap.add_argument("--render", metavar="RESULTS_JSON",
                    help="only render an existing results JSON into the docs")
    a = ap.parse_args()
    import report

    results_dir = os.path.join(C.HERE, "results")
    os.makedirs(results_dir, exist_ok=True)
    if a.render:
        with open(a.render) as fh:
            res = json.load(fh)
        res["goals"] = report.goals(res)
        res["observations"] = report.observations(res)
        write_docs(res, a.docs is not False, results_dir, res["meta"]["stamp"])
        return 0

    mode = "quick" if a.quick else "full"
    cfg = dict(CONFIGS[mode])
    if os.environ.get("VOLBENCH_LOAD_SIZES"):
        # e.g. VOLBENCH_LOAD_SIZES=1024 for a focused look at one size
        cfg["load_sizes"] = [int(x) for x in os.environ["VOLBENCH_LOAD_SIZES"].split(",")]
    only = [s for s in a.only.split(",") if s] or SECTIONS
    for s in only:
        if s not in SECTIONS:
            ap.error(f"unknown section {s!r}")
    docs = a.docs if a.docs is not None else (mode == "full" and only == SECTIONS)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    workdir = a.workdir or tempfile.mkdtemp(prefix="volbench-", dir="/tmp")
    os.makedirs(workdir, exist_ok=True)
    cmd = "bench/run" + (" --quick" if a.quick else "") + (f" --only {a.only}" if a.only else "")
    res = {
        "meta": {"mode": mode, "command": cmd, "started": report.now(), "stamp": stamp,
                 "sections_run": only, "workdir": workdir, "agent_bin": C.AGENT_BIN},
        "config": cfg,
        "machine": C.machine_facts(),
        "sections": {},
    }
    C.log(f"volmig benchmarks, {mode} mode, sections {','.join(only)}, scratch {workdir}")
    if not C.drop_caches():
        C.log("WARNING: cannot drop the page cache (not root?): 'cold' runs are not cold")
        res["meta"]["drop_caches"] = False
    mon = C.Interference().start()
    t0 = time.monotonic()
    import blockdev
    import copybound
    import frontend
    import migration
    import scale
    runners = {
        "frontend": lambda: frontend.run(cfg, workdir),
        "migration": lambda: migration.run(cfg, workdir),
        "copy": lambda: copybound.run_copy(cfg, workdir),
        "sparse": lambda: copybound.run_sparse(cfg, workdir, res["sections"].get("copy")),
        "scale": lambda: scale.run(cfg, workdir),
        "blockdev": lambda: blockdev.run(cfg, workdir),
    }
    try:
        for s in only:
            mon.section(s)
            ts = time.monotonic()
            try:
                res["sections"][s] = runners[s]()
            except Exception as e:  # noqa: BLE001 - keep the other sections' results
                traceback.print_exc()
                res["sections"][s] = {"error": f"{type(e).__name__}: {e}"}
            res["sections"][s]["elapsed_s"] = round(time.monotonic() - ts, 1)
            mon.end_section()
            C.log(f"{s} done in {res['sections'][s]['elapsed_s']:.0f} s")
    finally:
        res["interference"] = mon.close()
        res["meta"]["duration_min"] = (time.monotonic() - t0) / 60
        res["goals"] = report.goals(res)
        res["observations"] = report.observations(res)
        path = os.path.join(results_dir, f"{stamp}-{mode}.json")
        res["meta"]["results_file"] = os.path.relpath(
            os.path.join(results_dir, f"latest-{mode}.json") if only == SECTIONS else path, C.ROOT)
        with open(path, "w") as fh:
            json.dump(res, fh, indent=1)
        if only == SECTIONS:
            shutil.copyfile(path, os.path.join(results_dir, f"latest-{mode}.json"))
        C.log(f"results: {path}")
        write_docs(res, docs, results_dir, stamp)
        if not a.keep and not a.workdir:
            shutil.rmtree(workdir, ignore_errors=True)
    print_summary(res)
    return 0


def write_docs(res, docs, results_dir, stamp):
    import report
    if docs:
        md = os.path.join(C.ROOT, "docs", "BENCHMARKS.md")
        png = os.path.join(C.ROOT, "docs", "migration_iops.png")
        rel = "migration_iops.png"
    else:
        md = os.path.join(results_dir, f"{stamp}-{res['meta']['mode']}.md")
        png = os.path.join(results_dir, f"{stamp}-{res['meta']['mode']}-migration_iops.png")
        rel = os.path.basename(png)
    try:
        if not report.plot(res, png):
            rel = None
    except Exception as e:  # noqa: BLE001 - a missing plot must not lose the numbers
        C.log(f"plot failed: {e}")
        rel = None
    report.render(res, md, rel)
    C.log(f"report: {md}" + (f", plot: {png}" if rel else ""))


def print_summary(res):
    print()
    print(f"== goals ({res['meta']['mode']} run, {res['meta']['duration_min']:.1f} min)")
    for g in res.get("goals", []):
        print(f"  [{g['status']:>6}] {g['goal']}: {g['numbers']}")


if __name__ == "__main__":
    sys.exit(main())
