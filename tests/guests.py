"""Tiny hostile guests shared by the tests and the release-gate scripts."""
from __future__ import annotations

import struct
from pathlib import Path

WASM_DIR = Path(__file__).resolve().parent / "wasm"
OP_READ, OP_WRITE, OP_FETCH = 0, 1, 2
PAYLOAD_AT = 1024


def wat(name: str) -> str:
    return (WASM_DIR / name).read_text()


def _escape(data: bytes) -> str:
    return "".join(f"\\{b:02x}" for b in data)


def probe(op: int, a: int, b: int, c: int, d: int, payload: bytes = b"") -> str:
    """A module whose run() makes one cell host call with these raw i32 arguments."""
    header = struct.pack("<5I", op, a & 0xFFFFFFFF, b & 0xFFFFFFFF, c & 0xFFFFFFFF, d & 0xFFFFFFFF)
    return wat("fs_probe.wat").replace("__HEADER__", _escape(header)).replace("__PAYLOAD__", _escape(payload))


def read_probe(path: str, max_len: int = 4096) -> str:
    p = path.encode("utf-8", "surrogatepass")
    return probe(OP_READ, PAYLOAD_AT, len(p), 8192, max_len, p)


def write_probe(path: str, data: bytes) -> str:
    p = path.encode("utf-8", "surrogatepass")
    return probe(OP_WRITE, PAYLOAD_AT, len(p), PAYLOAD_AT + len(p), len(data), p + data)


def fetch_probe(url: str, max_len: int = 4096) -> str:
    u = url.encode("utf-8", "surrogatepass")
    return probe(OP_FETCH, PAYLOAD_AT, len(u), 8192, max_len, u)
