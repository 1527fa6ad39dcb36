"""Captured guest output with caps (threat T-DOS-1: output floods).

wasmtime calls the ``stdout_custom`` / ``stderr_custom`` writers on one of
its own worker threads, synchronously with the guest's write: by the time a
guest call returns, every byte it wrote has been delivered here. The writers
never raise; past the cap they keep the first ``cap`` bytes, mark the run
truncated and ask the governor to stop the guest.

Output is only ever output: no byte a guest writes is read as a signal to
the host (a JavaScript run ends when the host sees the guest idle, see
command_channel.py; T-DOS-1).
"""
from __future__ import annotations

import threading
from typing import Callable

from appliance.runtime.governor import STOP_OUTPUT, Governor

ChunkSink = Callable[[int, bytes], None]


class Capture:
    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._bufs: dict[int, bytearray] = {1: bytearray(), 2: bytearray()}
        self.cap = 1 << 20
        self.truncated = False
        self.sink: ChunkSink | None = None
        self.governor: Governor | None = None
        self.active = False

    def reset(self, cap: int, sink: ChunkSink | None, governor: Governor | None) -> None:
        with self._lock:
            self._bufs = {1: bytearray(), 2: bytearray()}
            self.cap = cap
            self.truncated = False
            self.sink = sink
            self.governor = governor
            self.active = True

    def writer(self, fd: int) -> Callable[[bytes], int]:
        def write(data: bytes) -> int:
            try:
                self._write(fd, bytes(data))
            except Exception:
                pass
            return len(data)

        return write

    def _write(self, fd: int, data: bytes) -> None:
        sink = None
        chunk = b""
        with self._lock:
            if not data or not self.active:
                return
            buf = self._bufs[fd]
            room = self.cap - len(buf)
            if room <= 0 or len(data) > room:
                chunk = data[: max(0, room)]
                buf += chunk
                if not self.truncated:
                    self.truncated = True
                    if self.governor is not None:
                        self.governor.stop(STOP_OUTPUT)
            else:
                chunk = data
                buf += data
            sink = self.sink
        if sink is not None and chunk:
            sink(fd, chunk)

    def finish(self) -> tuple[str, str, bool]:
        with self._lock:
            self.active = False
            out = self._bufs[1].decode("utf-8", "replace")
            err = self._bufs[2].decode("utf-8", "replace")
            return out, err, self.truncated
