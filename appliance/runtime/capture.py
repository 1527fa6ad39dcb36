"""Captured guest output with caps (threat T-DOS-1: output floods).

wasmtime calls the ``stdout_custom`` / ``stderr_custom`` writers on one of
its own worker threads, synchronously with the guest's write: by the time a
guest call returns, every byte it wrote has been delivered here. The writers
never raise; past the cap they keep the first ``cap`` bytes, mark the run
truncated and ask the governor to stop the guest.
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
        self.marker: bytes | None = None  # end-of-run marker on stderr (JS sessions)
        self.marker_seen = threading.Event()
        self.marker_rc: int | None = None
        self._marker_tail = bytearray()
        self.active = False

    def reset(self, cap: int, sink: ChunkSink | None, governor: Governor | None) -> None:
        with self._lock:
            self._bufs = {1: bytearray(), 2: bytearray()}
            self.cap = cap
            self.truncated = False
            self.sink = sink
            self.governor = governor
            self.marker_seen.clear()
            self.marker_rc = None
            self._marker_tail = bytearray()
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
            if fd == 2 and self.marker is not None:
                data = self._strip_marker(data)
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

    def _strip_marker(self, data: bytes) -> bytes:
        assert self.marker is not None
        joined = bytes(self._marker_tail) + data
        idx = joined.find(self.marker)
        if idx < 0:
            # Hold back a possible partial marker at the end of this write.
            keep = 0
            for k in range(min(len(self.marker) - 1, len(joined)), 0, -1):
                if self.marker.startswith(joined[-k:]):
                    keep = k
                    break
            self._marker_tail = bytearray(joined[len(joined) - keep :]) if keep else bytearray()
            return joined[: len(joined) - keep]
        end = joined.find(b"\n", idx)
        if end < 0:
            self._marker_tail = bytearray(joined[idx:])
            return joined[:idx]
        try:
            self.marker_rc = int(joined[idx + len(self.marker) : end])
        except ValueError:
            self.marker_rc = 1
        self._marker_tail = bytearray()
        self.marker_seen.set()
        return joined[:idx] + joined[end + 1 :]

    def finish(self) -> tuple[str, str, bool]:
        with self._lock:
            self.active = False
            out = self._bufs[1].decode("utf-8", "replace")
            err = self._bufs[2].decode("utf-8", "replace")
            return out, err, self.truncated
