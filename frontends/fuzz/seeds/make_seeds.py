#!/usr/bin/env python3
"""Writes seed inputs for the nbd_session fuzz target: valid client
conversations (handshake, then requests), so the fuzzer starts past the
magic numbers. Run from this directory; output goes to seeds/nbd_session/."""
import struct, os

IHAVEOPT = 0x49484156454F5054
REQ = 0x25609513
def opt(code, data=b""): return struct.pack(">QII", IHAVEOPT, code, len(data)) + data
def go(name=b"f", infos=(3,)): return opt(7, struct.pack(">I", len(name)) + name + struct.pack(">H", len(infos)) + b"".join(struct.pack(">H", i) for i in infos))
def meta(name=b"f", q=b"base:allocation"): return opt(10, struct.pack(">I", len(name)) + name + struct.pack(">I", 1) + struct.pack(">I", len(q)) + q)
def req(t, off, ln, flags=0, data=b"", cookie=1): return struct.pack(">IHHQQI", REQ, flags, t, cookie, off, ln) + data

hello = struct.pack(">I", 3)
seeds = {
    "simple": hello + go() + req(0, 0, 4096) + req(1, 4096, 8, data=b"A" * 8) + req(3, 0, 0) + req(2, 0, 0),
    "structured": hello + opt(8) + meta() + go() + req(0, 0, 512) + req(7, 0, 1 << 20) + req(6, 0, 4096, flags=2) + req(4, 8192, 4096) + req(2, 0, 0),
    "fua": hello + opt(8) + go() + req(1, 0, 4, flags=1, data=b"abcd") + req(0, (1 << 20) - 4, 8) + req(2, 0, 0),
    "options": hello + opt(3) + opt(6, struct.pack(">I", 1) + b"f" + struct.pack(">H", 0)) + opt(9, struct.pack(">I", 1) + b"f" + struct.pack(">I", 0)) + opt(2),
    "export_name": hello + opt(1, b"f") + req(0, 0, 16) + req(2, 0, 0),
}
os.makedirs("seeds/nbd_session", exist_ok=True)
for k, v in seeds.items():
    open(f"seeds/nbd_session/{k}", "wb").write(v)
