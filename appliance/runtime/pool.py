"""The supervisor: a pool of worker processes, from the web process's side.

Guests never run in the web process. Each worker runs one request at a time;
a request waits for its worker's lock, and when too many already wait the
pool answers 503 with Retry-After instead of queueing without bound
(T-DOS-2). The last line of defence for wall-clock limits (T-DOS-1) is here:
a worker that has not answered by the run's deadline plus a grace period is
SIGKILLed and replaced; every cell it held is marked lost.
"""
from __future__ import annotations

import dataclasses
import io
import itertools
import logging
import multiprocessing
import os
import threading
import time
from dataclasses import dataclass, field
from multiprocessing import popen_spawn_posix, reduction, spawn, util
from multiprocessing.context import SpawnProcess
from typing import Any, Callable

from appliance.config import Settings
from appliance.errors import Busy, CellError
from appliance.runtime import protocol, sandbox, templates
from appliance.runtime.protocol import ProtocolError, Reply, Request
from appliance.runtime.worker import worker_main

ChunkCallback = Callable[[int, bytes], None]
START_TIMEOUT_S = 900.0  # the first start may compile the runtimes (minutes)
CONTROL_TIMEOUT_S = 60.0  # bind, drop, stats: no guest code runs
MAX_STALE_FRAMES = 16
log = logging.getLogger("cell.pool")


def cache_is_warm(settings: Settings) -> bool:
    """True when both shipped runtimes are already compiled for this engine."""
    from appliance.runtime.engine import ENGINE_TAG, WASMTIME_VERSION

    for t in templates.with_runtime():
        stem = settings.cache_dir / f"{t.pin}-{WASMTIME_VERSION}-{ENGINE_TAG}"
        if not (stem.with_suffix(".cwasm").is_file() and stem.with_suffix(".json").is_file()):
            return False
    return True


class _CleanSpawnPopen(popen_spawn_posix.Popen):
    """multiprocessing's spawn start, with the worker's environment built
    from an allow-list (T-ESCAPE-4): the service's own environment (metrics
    token, license path, SYNAPSE_*) never reaches a process that runs guests.
    Same steps as the standard library's ``_launch`` (Python 3.11), but the
    child is started with ``os.posix_spawn`` and an explicit environment."""

    def _launch(self, process_obj: Any) -> None:
        from multiprocessing import resource_tracker

        tracker_fd = int(resource_tracker.getfd())  # type: ignore[arg-type]
        fds: list[int] = self._fds  # type: ignore[attr-defined]
        fds.append(tracker_fd)
        prep_data = spawn.get_preparation_data(process_obj._name)
        fp = io.BytesIO()
        popen_spawn_posix.set_spawning_popen(self)  # type: ignore[attr-defined]
        try:
            reduction.dump(prep_data, fp)
            reduction.dump(process_obj, fp)
        finally:
            popen_spawn_posix.set_spawning_popen(None)  # type: ignore[attr-defined]
        parent_r = child_w = child_r = parent_w = None
        try:
            parent_r, child_w = os.pipe()
            child_r, parent_w = os.pipe()
            cmd = spawn.get_command_line(tracker_fd=tracker_fd, pipe_handle=child_r)
            fds.extend([child_r, child_w])
            env = sandbox.worker_environment(os.environ, keep_fd=child_w)
            # dup2(fd, fd) clears close-on-exec in the child only: these pipes
            # never leak into another process started meanwhile.
            actions = [(os.POSIX_SPAWN_DUP2, fd, fd) for fd in sorted(set(fds))]
            self.pid = os.posix_spawn(spawn.get_executable(), cmd, env, file_actions=actions)
            self.sentinel = parent_r
            with open(parent_w, "wb", closefd=False) as f:
                f.write(fp.getbuffer())
        finally:
            fds_to_close = [fd for fd in (parent_r, parent_w) if fd is not None]
            self.finalizer = util.Finalize(self, util.close_fds, fds_to_close)  # type: ignore[attr-defined]
            for fd in (child_r, child_w):
                if fd is not None:
                    os.close(fd)


class _WorkerProcess(SpawnProcess):
    @staticmethod
    def _Popen(process_obj: Any) -> Any:
        return _CleanSpawnPopen(process_obj)


def sandbox_config(settings: Settings) -> dict[str, Any]:
    """What a worker needs to confine itself (T-ESCAPE-1..4); the rw volume set is a parameter."""
    network = settings.egress == "on" or settings.mcp_servers is not None
    commands: list[list[str]] = []
    if settings.mcp_servers is not None:
        from appliance.mcp import load_config

        commands = [list(s.command) for s in load_config(settings.mcp_servers).servers.values() if s.transport == "stdio"]
    forbidden = [settings.db_path.parent, settings.keys_dir, settings.config_dir, settings.license_path,
                 settings.mirror_dir]
    return {
        "mode": settings.worker_sandbox,
        "network": network,  # until the host-call broker: host_fetch / MCP over the network
        "mcp_commands": commands,  # until the broker: stdio MCP servers started by the worker
        "volume_set": [str(settings.volumes_dir)],  # today all volumes; one tenant's dir with tenant-bound workers
        "forbidden": [str(p) for p in forbidden],
    }


def registry_hashes(settings: Settings) -> dict[str, list[str]]:
    """The verified trust registry's runtime hashes, read here so workers never open mirror/."""
    try:
        from mirror.registry import Mirror

        return {t: sorted(h) for t, h in Mirror(settings.mirror_dir).trusted_template_hashes().items()}
    except Exception:
        return {}  # an unverifiable registry trusts nothing


class WorkerLost(Exception):
    pass


class WorkerReplaced(WorkerLost):
    """The worker was gone before this request was sent: nothing ran."""


@dataclass
class WorkerHandle:
    index: int
    generation: int
    process: Any
    conn: Any
    lock: threading.Lock = field(default_factory=threading.Lock)
    cells: set[str] = field(default_factory=set)
    busy: bool = False
    runs: int = 0


class WorkerPool:
    def __init__(self, settings: Settings, progress: Callable[[str], None] | None = None,
                 target: Callable[[Any, dict[str, Any]], None] = worker_main) -> None:
        self.settings = settings
        self._target = target  # the worker's entry point (tests start hostile stand-ins)
        self._mp = multiprocessing.get_context("spawn")
        self._workers: list[WorkerHandle] = []
        self._waiting = 0
        self._state_lock = threading.Lock()
        self._req_ids = itertools.count(1)
        self._generation = itertools.count(1)
        self.kills = 0
        self.progress = progress
        self.closed = False
        self._sandbox_in_force: dict[str, Any] = {"network": False, "mcp_commands": [], "volume_set": []}

    # -- lifecycle -------------------------------------------------------
    def _config(self, index: int) -> dict[str, Any]:
        s = self.settings
        return {
            "index": index,
            "cache_dir": str(s.cache_dir),
            "volumes_dir": str(s.volumes_dir),
            "memory_mb": s.memory_mb,
            "output_cap_bytes": s.output_cap_bytes,
            "module_max_bytes": s.module_max_bytes,
            "warm": {t.name: int(getattr(s, t.warm_setting)) for t in templates.interpreters() if t.warm_setting},
            "preload": {t.name: list(getattr(s, t.preload_setting)) for t in templates.interpreters() if t.preload_setting},
            "weights_dir": str(s.weights_dir),
            "registry_hashes": registry_hashes(s),
            "mcp_servers": str(s.mcp_servers) if s.mcp_servers else None,
            "sandbox": self._remember_sandbox(sandbox_config(s)),  # the settings in force when this worker starts
        }

    def _remember_sandbox(self, box: dict[str, Any]) -> dict[str, Any]:
        self._sandbox_in_force = box
        return box

    def _spawn(self, index: int) -> WorkerHandle:
        parent, child = self._mp.Pipe(duplex=True)
        proc = _WorkerProcess(target=self._target, args=(child, self._config(index)), name=f"cell-worker-{index}", daemon=True)
        proc.start()
        child.close()
        handle = WorkerHandle(index=index, generation=next(self._generation), process=proc, conn=parent)
        return handle

    def _await_ready(self, handle: WorkerHandle, timeout: float) -> None:
        if not handle.conn.poll(timeout):
            handle.process.kill()
            raise RuntimeError(f"worker {handle.index} did not start within {timeout:.0f}s")
        try:
            msg = self._receive(handle)
        except (EOFError, OSError):
            raise RuntimeError(f"worker {handle.index} died while starting (exit code {handle.process.exitcode})") from None
        except ProtocolError as e:
            handle.process.kill()
            raise RuntimeError(f"worker {handle.index} sent a malformed first message: {e}") from None
        if not isinstance(msg, protocol.Ready):
            handle.process.kill()
            raise RuntimeError(f"worker {handle.index} sent {type(msg).__name__} instead of ready")

    def _receive(self, handle: WorkerHandle) -> Reply:
        """One frame from a worker, decoded and checked (T-PROTO-1). A frame
        over the cap raises OSError from the connection before it is read."""
        frame = handle.conn.recv_bytes(self._max_frame())
        reply: Reply = protocol.decode(frame, protocol.FROM_WORKER, self._max_frame())
        return reply

    def _max_frame(self) -> int:
        return protocol.max_frame_bytes(self.settings.output_cap_bytes)

    def _cache_warm(self) -> bool:
        return cache_is_warm(self.settings)

    def check_sandbox(self) -> dict[str, Any]:
        """Fail closed (T-ESCAPE-1): without Landlock and seccomp the service
        does not start, unless the operator set SYNAPSE_WORKER_SANDBOX=off-unsafe."""
        offered = sandbox.probe()
        missing = [name for name, ok in (("Landlock", offered["landlock_abi"] >= 1), ("seccomp", offered["seccomp"]))
                   if not ok]
        if self.settings.worker_sandbox != "required":
            log.warning("SYNAPSE_WORKER_SANDBOX=off-unsafe: workers start even without %s; an engine escape "
                        "would not be contained by the second wall", ", ".join(missing) or "nothing missing today")
        elif missing:
            raise RuntimeError(f"the worker sandbox needs {' and '.join(missing)}, which this kernel does not offer; "
                               "set SYNAPSE_WORKER_SANDBOX=off-unsafe to run without it (not recommended)")
        return offered

    def start(self) -> None:
        self.check_sandbox()
        # With a cold cache the first worker alone compiles the runtimes, so two
        # processes never compile the same multi-GB module at once; with a warm
        # cache every worker starts at the same time.
        warm = self._cache_warm()
        first = self._spawn(0)
        if not warm:
            self._await_ready(first, START_TIMEOUT_S)
        others = [self._spawn(i) for i in range(1, self.settings.workers)]
        if warm:
            self._await_ready(first, START_TIMEOUT_S)
        for handle in others:
            self._await_ready(handle, START_TIMEOUT_S)
        self._workers = [first, *others]

    def close(self) -> None:
        self.closed = True
        for handle in self._workers:
            try:
                handle.conn.close()
            except OSError:
                pass
        for handle in self._workers:
            # Not join(timeout): a compromised worker can close its spawn
            # sentinel, and join() then blocks in waitpid for as long as the
            # worker lives (T-ESCAPE-1). is_alive() never blocks.
            deadline = time.monotonic() + 3
            while handle.process.is_alive() and time.monotonic() < deadline:
                time.sleep(0.02)
            if handle.process.is_alive():
                handle.process.kill()
                handle.process.join(timeout=2)

    # -- placement -------------------------------------------------------
    def worker(self, index: int) -> WorkerHandle:
        return self._workers[index]

    def _alive(self) -> list[WorkerHandle]:
        """Workers whose process still runs (a dead one is replaced by the
        maintenance loop or the next call on it); all of them if none is."""
        alive = [w for w in self._workers if w.process.is_alive()]
        return alive or list(self._workers)

    def pick_for_cell(self) -> WorkerHandle:
        candidates = [w for w in self._alive() if len(w.cells) < self.settings.max_cells_per_worker]
        if candidates:
            return min(candidates, key=lambda w: (len(w.cells), w.busy))
        raise Busy("every worker holds its maximum number of cells", code="capacity", retry_after=5)

    def assign(self, handle: WorkerHandle, cell_id: str) -> None:
        """Record that ``handle`` now holds the interpreter of ``cell_id``."""
        with self._state_lock:
            handle.cells.add(cell_id)

    def release(self, index: int, cell_id: str) -> None:
        with self._state_lock:
            self._workers[index].cells.discard(cell_id)

    def pick_for_run(self) -> WorkerHandle:
        alive = self._alive()
        idle = [w for w in alive if not w.busy]
        return min(idle or alive, key=lambda w: (w.busy, w.runs))

    def sandbox_status(self) -> dict[str, Any]:
        """The second wall as the operator sees it: what the kernel offers, what
        the workers were told, and each worker's seccomp state from /proc."""
        offered = sandbox.probe()
        box = self._sandbox_in_force
        return {
            "mode": self.settings.worker_sandbox,
            "landlock_abi": offered["landlock_abi"],
            "seccomp": offered["seccomp"],
            "network": "allowed" if box["network"] else "denied",
            "process_spawn": bool(box["mcp_commands"]),
            "volume_set": box["volume_set"],
            "workers": [{"pid": w.process.pid, **sandbox.process_status(w.process.pid)} for w in self._workers],
        }

    def stats(self) -> dict[str, Any]:
        return {
            "workers": len(self._workers),
            "busy": sum(1 for w in self._workers if w.busy),
            "waiting": self._waiting,
            "cells": sum(len(w.cells) for w in self._workers),
            "kills": self.kills,
            "pids": [w.process.pid for w in self._workers],
        }

    # -- calls -----------------------------------------------------------
    def call(self, handle: WorkerHandle, request: Request, *, deadline_s: float | None,
             on_chunk: ChunkCallback | None = None) -> Reply:
        """Send one request to a worker and wait for its final message.

        ``deadline_s`` is the run's own limit; the worker is killed if it has
        not answered by then plus the grace period. None = control message.
        A malformed or oversized answer also costs the worker its life: after
        one bad frame nothing it says can be trusted (T-PROTO-1).
        """
        with self._state_lock:
            if self._waiting >= self.settings.queue_max + len(self._workers):
                raise Busy("every worker is busy and the queue is full", retry_after=1)
            self._waiting += 1
        try:
            if not handle.lock.acquire(timeout=30):
                raise Busy("timed out waiting for a worker", retry_after=1)
        finally:
            with self._state_lock:
                self._waiting -= 1
        try:
            current = self._workers[handle.index]
            if current is not handle:  # replaced while we waited
                raise WorkerReplaced("worker was replaced")
            if not handle.process.is_alive():  # died while idle (e.g. killed from outside)
                self._replace(handle, "died while idle")
                raise WorkerReplaced("worker had died and was replaced")
            handle.busy = True
            handle.runs += 1
            req_id = next(self._req_ids)
            request = dataclasses.replace(request, req_id=req_id)
            grace = self.settings.kill_grace_ms / 1000
            limit = time.monotonic() + (CONTROL_TIMEOUT_S if deadline_s is None else deadline_s + grace)
            # What an honest worker can stream: each stream up to its cap
            # (T-PROTO-1: a flood of chunks or stale frames is a violation).
            chunk_budget = 2 * self.settings.output_cap_bytes + (1 << 16)
            stale = 0
            try:
                handle.conn.send_bytes(protocol.encode(request))
                while True:
                    if not handle.conn.poll(max(0.0, limit - time.monotonic())):
                        self._replace(handle, "overran its deadline")
                        raise WorkerLost("the worker overran the run's deadline and was replaced")
                    reply = self._receive(handle)
                    if isinstance(reply, protocol.Ready) or reply.req_id != req_id:
                        stale += 1
                        if stale > MAX_STALE_FRAMES:
                            raise ProtocolError("too many frames for no request")
                        continue
                    if isinstance(reply, protocol.RunChunk):
                        chunk_budget -= len(reply.data)
                        if chunk_budget < 0:
                            raise ProtocolError("more output than the caps allow")
                        if on_chunk is not None:
                            on_chunk(reply.fd, reply.data)
                        continue
                    return reply
            except ProtocolError:
                self._replace(handle, "sent a malformed message")
                raise WorkerLost("the worker sent a malformed message and was replaced") from None
            except (EOFError, OSError, BrokenPipeError):
                self._replace(handle, "died")
                raise WorkerLost("the worker died during the run and was replaced") from None
        finally:
            handle.busy = False
            handle.lock.release()

    def _replace(self, handle: WorkerHandle, why: str) -> None:
        """Kill a worker and start its replacement (called with its lock held)."""
        self.kills += 1
        try:
            handle.process.kill()
            handle.process.join(timeout=5)
        except Exception:
            pass
        try:
            handle.conn.close()
        except OSError:
            pass
        new = self._spawn(handle.index)
        # Publish the new worker only with its lock held until it is ready: a
        # request that picks it waits, instead of reading the pipe at the same
        # time as the readiness check (two readers would steal each other's
        # messages).
        new.lock.acquire()
        self._workers[handle.index] = new
        try:
            self._await_ready(new, START_TIMEOUT_S)
        except RuntimeError as e:
            raise CellError(f"worker replacement failed: {e}") from None
        finally:
            new.lock.release()

    def generation_of(self, index: int) -> int:
        return self._workers[index].generation

    def check_alive(self) -> None:
        """Replace workers that died between requests (e.g. killed from outside)."""
        for handle in list(self._workers):
            if not handle.process.is_alive() and handle.lock.acquire(blocking=False):
                try:
                    if self._workers[handle.index] is handle and not handle.process.is_alive():
                        self._replace(handle, "died while idle")
                finally:
                    handle.lock.release()
