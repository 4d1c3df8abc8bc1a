#!/usr/bin/env python3
"""The e2e workload: writes checksummed 4 KiB blocks to a volume through the
agent's NBD frontend and records every acknowledged write; then verifies a
device image (or the volume over NBD) against that record.

  writer.py write  --uri 'nbd+unix:///data?socket=/var/lib/volmig/nbd.sock' --state /state
      Writes until <state>/stop exists, then flushes, writes <state>/acked.json
      and <state>/done, and idles (the pod stays up: its restartCount and UID
      are part of the test). Any NBD error ends the process with status 1.
  writer.py verify --acked acked.json (--image target.bin | --uri URI)
      Every acknowledged block must hold exactly its last acknowledged content.

A block is: block index (u64) | sequence number (u64) | writer id (u32) |
random bytes | crc32 of everything before it (u32), little-endian.
"""
import argparse
import hashlib
import json
import os
import random
import struct
import sys
import threading
import time
import zlib

BLOCK = 4096


def make_block(index, seq, writer):
    head = struct.pack("<QQI", index, seq, writer)
    body = head + random.randbytes(BLOCK - len(head) - 4)
    return body + struct.pack("<I", zlib.crc32(body))


def block_ok(block):
    return zlib.crc32(block[:-4]) == struct.unpack("<I", block[-4:])[0]


def connect(uri):
    import nbd  # python3-libnbd

    h = nbd.NBD()
    h.connect_uri(uri)
    return h


def dump(state, acked, stats):
    tmp = os.path.join(state, "acked.json.tmp")
    with open(tmp, "w") as f:
        json.dump({"block_size": BLOCK, "stats": stats, "acked": acked}, f)
        f.flush()
        os.fsync(f.fileno())
    os.rename(tmp, os.path.join(state, "acked.json"))


def write(args):
    os.makedirs(args.state, exist_ok=True)
    for name in ("stop", "done"):
        if os.path.exists(os.path.join(args.state, name)):
            os.unlink(os.path.join(args.state, name))
    probe = connect(args.uri)
    blocks = min(probe.get_size() // BLOCK, args.blocks)
    probe.shutdown()
    print(f"writer: {blocks} blocks of {BLOCK} bytes, {args.threads} connections", flush=True)
    acked = {}  # block index -> [seq, sha256 of the block]
    lock = threading.Lock()
    stats = {"writes": 0, "errors": 0, "worst_latency_ms": 0.0}
    stop = threading.Event()
    failed = []

    def run(writer):
        try:
            h = connect(args.uri)
            seq = 0
            mine = [i for i in range(blocks) if i % args.threads == writer]
            while not stop.is_set():
                i = random.choice(mine)
                seq += 1
                buf = make_block(i, seq, writer)
                t0 = time.monotonic()
                h.pwrite(buf, i * BLOCK)  # returns once the agent acknowledged it
                ms = (time.monotonic() - t0) * 1000
                with lock:
                    acked[str(i)] = [seq, hashlib.sha256(buf).hexdigest()]
                    stats["writes"] += 1
                    stats["worst_latency_ms"] = max(stats["worst_latency_ms"], round(ms, 3))
                if args.rate:
                    time.sleep(1.0 / args.rate)
            h.flush()
            h.shutdown()
        except Exception as e:  # an NBD error is a failed test
            failed.append(f"writer {writer}: {e}")
            stop.set()

    threads = [threading.Thread(target=run, args=(w,)) for w in range(args.threads)]
    for t in threads:
        t.start()
    while not stop.is_set():
        if os.path.exists(os.path.join(args.state, "stop")):
            stop.set()
            break
        time.sleep(1)
        with lock:
            dump(args.state, dict(acked), dict(stats))
            print(f"writer: {stats['writes']} writes acknowledged, worst latency {stats['worst_latency_ms']} ms", flush=True)
    for t in threads:
        t.join()
    with lock:
        stats["errors"] = len(failed)
        dump(args.state, dict(acked), dict(stats))
    if failed:
        print("writer: FAILED: " + "; ".join(failed), file=sys.stderr, flush=True)
        sys.exit(1)
    open(os.path.join(args.state, "done"), "w").close()
    print(f"writer: stopped after {stats['writes']} acknowledged writes to {len(acked)} blocks", flush=True)
    if args.idle:
        while True:
            time.sleep(3600)


def verify(args):
    rec = json.load(open(args.acked))
    acked = rec["acked"]
    if args.image:
        f = open(args.image, "rb")
        read = lambda off: os.pread(f.fileno(), BLOCK, off)  # noqa: E731
    else:
        h = connect(args.uri)
        read = lambda off: h.pread(BLOCK, off)  # noqa: E731
    bad = []
    for i, (seq, digest) in acked.items():
        block = read(int(i) * BLOCK)
        if len(block) != BLOCK or hashlib.sha256(block).hexdigest() != digest:
            got = "short read" if len(block) != BLOCK else (
                f"seq {struct.unpack('<QQI', block[:20])[1]}" if block_ok(block) else "not a written block")
            bad.append(f"block {i}: want seq {seq}, found {got}")
    where = args.image or args.uri
    if bad:
        print(f"verify: FAILED: {len(bad)} of {len(acked)} acknowledged blocks wrong on {where}", file=sys.stderr)
        for b in bad[:20]:
            print("  " + b, file=sys.stderr)
        sys.exit(1)
    if not acked:
        print("verify: FAILED: no acknowledged writes recorded", file=sys.stderr)
        sys.exit(1)
    print(f"verify: all {len(acked)} acknowledged blocks ({rec['stats']['writes']} writes) intact on {where}")


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="cmd", required=True)
    w = sub.add_parser("write")
    w.add_argument("--uri", required=True)
    w.add_argument("--state", required=True)
    w.add_argument("--blocks", type=int, default=1 << 30, help="use at most this many blocks")
    w.add_argument("--threads", type=int, default=2, help="connections, each on its own blocks")
    w.add_argument("--rate", type=float, default=0, help="writes per second per connection (0 = as fast as acknowledged)")
    w.add_argument("--idle", action="store_true", help="stay alive after stopping")
    v = sub.add_parser("verify")
    v.add_argument("--acked", required=True)
    g = v.add_mutually_exclusive_group(required=True)
    g.add_argument("--image")
    g.add_argument("--uri")
    args = p.parse_args()
    (write if args.cmd == "write" else verify)(args)


if __name__ == "__main__":
    main()
