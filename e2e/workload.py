#!/usr/bin/env python3
"""The e2e workload: checksummed files and a SQLite database on a volmig volume.

  workload.py write  DATA STATE [--kib N] [--rate R]
      Until STATE/stop exists (or SIGTERM): write DATA/files/NNNNNNNN (N KiB of
      random bytes; written, fsynced, renamed, directory fsynced), append
      "NNNNNNNN <sha256>" to DATA/manifest (fsynced), then insert the same
      (n, sha256) into DATA/db.sqlite (WAL, synchronous=FULL, one transaction
      per row). What was acknowledged so far (the last n, rows, the worst
      latency of one step, errors) is in STATE/acked.json, rewritten every
      second and at the end; STATE/done once stopped cleanly. Any I/O error
      ends the process with status 1 (the container restarts: restartCount
      shows it). Started again on the same DATA it continues after the last
      manifest line: a rescheduled pod goes on writing.
  workload.py fill   DATA MIB
      DATA/fill.bin of MIB MiB random bytes and its sha256 in DATA/fill.sha256
      (a large volume with real data, so that a throttled copy takes long).
  workload.py verify DATA [--min-files N] [--min-rows N]
      Every manifest line's file exists with that checksum, the database
      passes PRAGMA integrity_check, every row matches its manifest line,
      there are at least N files and rows, and fill.bin (if any) matches.
      Prints {"files": F, "rows": R, "fill": bool} and exits 0, or says what
      is wrong and exits 1. Safe while a writer runs (a manifest line being
      appended is ignored; SQLite readers see the last commit).

Only the standard library: it runs in python:3-slim as it is.
"""
import argparse
import hashlib
import json
import os
import signal
import sqlite3
import sys
import time

STOP = False


def _on_term(_sig, _frame):
    global STOP
    STOP = True


def fsync_dir(path):
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_json(path, obj):
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(obj, f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def read_manifest(data):
    """{n: sha} of the complete lines; a partial last line is left out."""
    out = {}
    path = os.path.join(data, "manifest")
    if not os.path.exists(path):
        return out
    with open(path, "rb") as f:
        raw = f.read()
    lines = raw.split(b"\n")
    for i, line in enumerate(lines[:-1]):  # the text after the last \n is partial (or empty)
        parts = line.decode("ascii", "replace").split()
        if len(parts) != 2 or not parts[0].isdigit() or len(parts[1]) != 64:
            raise ValueError(f"manifest line {i + 1} is malformed: {line[:100]!r}")
        out[int(parts[0])] = parts[1]
    return out


def open_db(data):
    db = sqlite3.connect(os.path.join(data, "db.sqlite"), timeout=30, isolation_level=None)
    db.execute("PRAGMA journal_mode=WAL")
    db.execute("PRAGMA synchronous=FULL")
    db.execute("CREATE TABLE IF NOT EXISTS rows (n INTEGER PRIMARY KEY, sha TEXT NOT NULL, t REAL NOT NULL)")
    return db


def cmd_write(a):
    signal.signal(signal.SIGTERM, _on_term)
    signal.signal(signal.SIGINT, _on_term)
    files = os.path.join(a.data, "files")
    os.makedirs(files, exist_ok=True)
    os.makedirs(a.state, exist_ok=True)
    for name in ("stop", "done"):
        try:
            os.unlink(os.path.join(a.state, name))
        except FileNotFoundError:
            pass
    # Continue after the last complete manifest line; drop a partial one.
    mpath = os.path.join(a.data, "manifest")
    if os.path.exists(mpath):
        with open(mpath, "rb") as f:
            raw = f.read()
        keep = raw.rfind(b"\n") + 1
        if keep != len(raw):
            with open(mpath, "r+b") as f:
                f.truncate(keep)
                os.fsync(f.fileno())
    done = read_manifest(a.data)
    n = max(done) if done else 0
    db = open_db(a.data)
    # Rows the previous writer did not commit after its manifest line.
    have = {r[0] for r in db.execute("SELECT n FROM rows")}
    for k in sorted(set(done) - have):
        db.execute("INSERT INTO rows (n, sha, t) VALUES (?, ?, ?)", (k, done[k], time.time()))
    rows = db.execute("SELECT count(*) FROM rows").fetchone()[0]
    mf = open(mpath, "ab")
    stats = {"first": n + 1, "last": n, "rows": rows, "writes": 0, "worst_latency_ms": 0.0,
             "errors": 0, "started": time.time()}
    acked = os.path.join(a.state, "acked.json")
    write_json(acked, stats)
    last_save = time.monotonic()
    period = 1.0 / a.rate if a.rate > 0 else 0.0
    try:
        while not STOP and not os.path.exists(os.path.join(a.state, "stop")):
            t0 = time.monotonic()
            n += 1
            body = os.urandom(a.kib * 1024)
            sha = hashlib.sha256(body).hexdigest()
            name = os.path.join(files, f"{n:08d}")
            with open(name + ".tmp", "wb") as f:
                f.write(body)
                f.flush()
                os.fsync(f.fileno())
            os.replace(name + ".tmp", name)
            fsync_dir(files)
            mf.write(f"{n:08d} {sha}\n".encode())
            mf.flush()
            os.fsync(mf.fileno())
            db.execute("BEGIN IMMEDIATE")
            db.execute("INSERT INTO rows (n, sha, t) VALUES (?, ?, ?)", (n, sha, time.time()))
            db.execute("COMMIT")
            took = (time.monotonic() - t0) * 1000
            stats.update(last=n, rows=stats["rows"] + 1, writes=stats["writes"] + 1,
                         worst_latency_ms=round(max(stats["worst_latency_ms"], took), 1))
            if time.monotonic() - last_save >= 1.0:
                write_json(acked, stats)
                last_save = time.monotonic()
            if period:
                time.sleep(max(0.0, period - (time.monotonic() - t0)))
    except (OSError, sqlite3.Error) as e:
        stats["errors"] += 1
        stats["error"] = f"{type(e).__name__}: {e}"
        write_json(acked, stats)
        print(f"workload: FAILED after n={stats['last']}: {stats['error']}", file=sys.stderr, flush=True)
        sys.exit(1)
    mf.close()
    db.close()
    write_json(acked, stats)
    open(os.path.join(a.state, "done"), "w").close()
    print(f"workload: stopped: {json.dumps(stats)}", flush=True)
    # Stay up (the pod must not restart): idle until SIGTERM.
    while not STOP:
        time.sleep(1)


def cmd_fill(a):
    h = hashlib.sha256()
    path = os.path.join(a.data, "fill.bin")
    with open(path + ".tmp", "wb") as f:
        for _ in range(a.mib):
            chunk = os.urandom(1 << 20)
            h.update(chunk)
            f.write(chunk)
        f.flush()
        os.fsync(f.fileno())
    os.replace(path + ".tmp", path)
    with open(os.path.join(a.data, "fill.sha256"), "w") as f:
        f.write(h.hexdigest() + "\n")
        f.flush()
        os.fsync(f.fileno())
    fsync_dir(a.data)
    print(json.dumps({"fill_mib": a.mib, "sha256": h.hexdigest()}))


def sha_of(path):
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def cmd_verify(a):
    bad = []
    # The database first: a row is committed after its manifest line, so the
    # manifest read afterwards has a line for every row seen here.
    db_rows = []
    dbpath = os.path.join(a.data, "db.sqlite")
    if not os.path.exists(dbpath):
        bad.append("db.sqlite is missing")
    else:
        db = sqlite3.connect(f"file:{dbpath}?mode=ro", uri=True, timeout=30)
        ic = [r[0] for r in db.execute("PRAGMA integrity_check")]
        if ic != ["ok"]:
            bad.append(f"SQLite integrity_check: {ic[:5]}")
        db_rows = db.execute("SELECT n, sha FROM rows").fetchall()
        db.close()
    try:
        manifest = read_manifest(a.data)
    except ValueError as e:
        manifest = {}
        bad.append(str(e))
    for n, sha in sorted(manifest.items()):
        p = os.path.join(a.data, "files", f"{n:08d}")
        if not os.path.exists(p):
            bad.append(f"file {n:08d} is in the manifest but missing")
        elif sha_of(p) != sha:
            bad.append(f"file {n:08d}: checksum mismatch")
        if len(bad) > 20:
            break
    if manifest and sorted(manifest) != list(range(min(manifest), max(manifest) + 1)):
        bad.append("the manifest has gaps")
    for n, sha in db_rows:
        if manifest.get(n) != sha:
            bad.append(f"row {n} does not match the manifest")
            if len(bad) > 40:
                break
    rows = len(db_rows)
    if len(manifest) < a.min_files:
        bad.append(f"{len(manifest)} files, fewer than the {a.min_files} acknowledged")
    if rows < a.min_rows:
        bad.append(f"{rows} rows, fewer than the {a.min_rows} acknowledged")
    fill = os.path.exists(os.path.join(a.data, "fill.sha256"))
    if fill:
        want = open(os.path.join(a.data, "fill.sha256")).read().strip()
        if not os.path.exists(os.path.join(a.data, "fill.bin")) or sha_of(os.path.join(a.data, "fill.bin")) != want:
            bad.append("fill.bin does not match fill.sha256")
    if bad:
        for b in bad:
            print(f"verify: {b}", file=sys.stderr)
        sys.exit(1)
    print(json.dumps({"files": len(manifest), "rows": rows, "fill": fill}))


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="cmd", required=True)
    w = sub.add_parser("write")
    w.add_argument("data")
    w.add_argument("state")
    w.add_argument("--kib", type=int, default=16)
    w.add_argument("--rate", type=float, default=20.0, help="steps per second (0: unthrottled)")
    f = sub.add_parser("fill")
    f.add_argument("data")
    f.add_argument("mib", type=int)
    v = sub.add_parser("verify")
    v.add_argument("data")
    v.add_argument("--min-files", type=int, default=0)
    v.add_argument("--min-rows", type=int, default=0)
    a = p.parse_args()
    {"write": cmd_write, "fill": cmd_fill, "verify": cmd_verify}[a.cmd](a)


if __name__ == "__main__":
    main()
