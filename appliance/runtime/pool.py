"""The supervisor: a pool of worker processes, from the web process's side.

Guests never run in the web process. Each worker runs up to
``lanes_per_worker`` runs at once, one thread each, and runs of one cell one
after the other. Which waiting run gets a free lane is decided fairly across
tenants by ``appliance.policy.fairness`` (T-FAIR-1); when too many already
wait the pool answers 503 (node queue full) or 429 (this tenant's queue share
full) with Retry-After instead of queueing without bound (T-DOS-2). The last line of defence for wall-clock limits (T-DOS-1) is here:
a worker that has not answered by the run's deadline plus a grace period is
SIGKILLed and replaced; every cell it held is marked lost.

Tenant-bound workers (T-TENANT-1, docs/workers.md): a worker serves one
tenant. It starts confined as an unbound *spare* (it has opened the runtimes
and runs no guest); the first cell or run of a tenant that has no worker
binds a spare (or a new worker) to that tenant, which narrows its sandbox to
that tenant's volume and /tmp directories. A bound worker is never bound
again: when idle (no cells, no runs) for ``SYNAPSE_WORKER_IDLE_S`` or when
the budget is needed by another tenant, it is reclaimed (killed). The pool
keeps ``SYNAPSE_WORKER_SPARES`` spares within a budget of ``SYNAPSE_WORKERS``
processes; when every worker holds live cells of other tenants it starts
more, up to ``SYNAPSE_WORKERS_MAX``, and past that answers 503 ``no_worker``
with Retry-After.
"""
from __future__ import annotations

import dataclasses
import io
import itertools
import logging
import multiprocessing
import os
import queue
import socket
import threading
import time
from dataclasses import dataclass, field
from multiprocessing import popen_spawn_posix, reduction, spawn, util
from multiprocessing import resource_tracker
from multiprocessing.context import SpawnProcess
from typing import Any, Callable, Union

from appliance.config import Settings
from appliance.confine import ConfinementError, remove_tree
from appliance.errors import Busy, CellError, Conflict, RateLimited
from appliance.policy.fairness import FairShare, Ticket
from appliance.runtime import broker, protocol, sandbox, snapshot_file, templates
from appliance.runtime.cache_key import ENGINE_TAG, WASMTIME_VERSION
from appliance.runtime.protocol import ProtocolError, Reply, Request
from appliance.runtime.worker_entry import worker_main  # start-up: not the worker's module (worker_entry.py)
from mirror.registry import Mirror

ChunkCallback = Callable[[int, bytes], None]
ResultCallback = Callable[[int, protocol.ResultBundle], None]  # a streamed run's rich result, as it is shown
START_TIMEOUT_S = 900.0  # the first start may compile the runtimes (minutes)
CONTROL_TIMEOUT_S = 60.0  # bind, drop, stats: no guest code runs
MAX_STALE_FRAMES = 16  # frames for no request in flight before the worker is distrusted (an honest one sends none)
PLACE_TIMEOUT_S = 30.0  # how long a run waits for a worker of its tenant to be bound
NO_WORKER_RETRY_S = 5  # Retry-After of 503 no_worker
RECLAIM_GRACE_S = 0.5  # a worker just picked is not reclaimed for another tenant before its request reaches it
FIRST_WORKER_WAIT_S = 30.0  # how long a run that arrives during start-up waits for the first worker
NOT_READY_RETRY_S = 2  # Retry-After of 503 not_ready


class _Violation:
    """Put in a waiter's queue when the worker broke the protocol (T-PROTO-1)."""

    def __init__(self, why: str) -> None:
        self.why = why


Answer = Union[Reply, _Violation, None]  # None: the worker is gone
log = logging.getLogger("cell.pool")


def cache_is_warm(settings: Settings) -> bool:
    """True when both shipped runtimes are already compiled for this engine."""

    for t in templates.with_runtime():
        # Not Path.with_suffix: the version in the name ("49.0.0") has dots of its own.
        stem = f"{t.pin}-{WASMTIME_VERSION}-{ENGINE_TAG}"
        if not ((settings.cache_dir / f"{stem}.cwasm").is_file() and (settings.cache_dir / f"{stem}.json").is_file()):
            return False
    return True


def tenant_queue_cap(settings: Settings) -> int:
    """Runs one tenant may have waiting: the configured cap, else its queue
    share — half of what the node lets wait, and never so many that its
    waiting and running requests hold half of the web server's threads
    (T-FAIR-1)."""
    if settings.tenant_max_queued:
        return settings.tenant_max_queued
    lanes = settings.workers * settings.lanes_per_worker
    return max(1, min(-(-(settings.queue_max + settings.workers) // 2), (settings.http_threads - lanes) // 2))


class _CleanSpawnPopen(popen_spawn_posix.Popen):
    """multiprocessing's spawn start, with the worker's environment built
    from an allow-list (T-ESCAPE-4): the service's own environment (metrics
    token, license path, SYNAPSE_*) never reaches a process that runs guests.
    Same steps as the standard library's ``_launch`` (Python 3.11), but the
    child is started with ``os.posix_spawn`` and an explicit environment."""

    def _launch(self, process_obj: Any) -> None:
        tracker_fd = int(resource_tracker.getfd())  # type: ignore[arg-type]
        fds: list[int] = self._fds  # type: ignore[attr-defined]
        fds.append(tracker_fd)
        prep_data = spawn.get_preparation_data(process_obj._name)
        if process_obj._target is worker_main:
            # Start-up: the worker need not run the service's main module (`cell
            # serve`'s CLI, its settings and their imports): its entry point is
            # found by its own module's name.
            prep_data.pop("init_main_from_name", None)
            prep_data.pop("init_main_from_path", None)
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

    def __reduce__(self) -> tuple[Any, ...]:
        # Start-up: the child gets a plain SpawnProcess (only the parent starts
        # one), so it does not import this module and everything it imports
        # (the broker, the TUF registry, ...): ~0.2 s of a worker's start.
        return object.__new__, (SpawnProcess,), dict(self.__dict__)


def sandbox_config(settings: Settings) -> dict[str, Any]:
    """What a worker needs to confine itself (T-ESCAPE-1..4); the rw volume set is a parameter.
    No network and no process creation whatever the config: host_fetch and MCP
    go through the supervisor's broker (T-ESCAPE-3)."""
    forbidden = [settings.db_path.parent, settings.keys_dir, settings.config_dir, settings.license_path,
                 settings.mirror_dir]
    return {
        "mode": settings.worker_sandbox,
        # A spare's first layer: all volumes and snapshots; a bound worker's
        # second layer narrows both to its tenant's directories.
        "volume_set": [str(settings.volumes_dir), str(settings.snapshots_dir)],
        "forbidden": [str(p) for p in forbidden],
    }


def registry_hashes(settings: Settings) -> dict[str, list[str]]:
    """The verified trust registry's runtime hashes, read here so workers never open mirror/."""
    try:
        return {t: sorted(h) for t, h in Mirror(settings.mirror_dir).trusted_template_hashes().items()}
    except Exception:
        return {}  # an unverifiable registry trusts nothing


class WorkerLost(Exception):
    pass


class WorkerOverran(WorkerLost):
    """The worker did not answer by the run's deadline plus the grace period."""


class WorkerReplaced(WorkerLost):
    """The worker was gone before this request was sent: nothing ran."""


@dataclass
class WorkerHandle:
    index: int
    generation: int
    process: Any
    conn: Any
    send_lock: threading.Lock = field(default_factory=threading.Lock)
    state_lock: threading.Lock = field(default_factory=threading.Lock)
    pending: dict[int, "queue.SimpleQueue[Answer]"] = field(default_factory=dict)
    dead: bool = False  # the pipe closed: every pending request is told, none waits for ever
    cells: set[str] = field(default_factory=set)
    running: int = 0
    runs: int = 0
    # T-TENANT-1: "starting" -> "spare" -> "binding" -> "bound"; "retired" once reclaimed or lost.
    state: str = "starting"
    tenant: str | None = None  # the one tenant it serves (set when a bind starts)
    idle_since: float = field(default_factory=time.monotonic)

    @property
    def busy(self) -> bool:
        return self.running > 0


def _hang_up(handle: WorkerHandle) -> None:
    """Tell a worker the service is stopping: end-of-file on its pipe.

    Closing our end is not enough while the pipe's reader thread is blocked
    reading it: the kernel keeps the socket open until that read returns, so
    the worker never sees EOF and is killed only after the close deadline.
    shutdown() ends the socket itself: the worker reads EOF and exits, and our
    reader wakes up, sees EOF and closes the connection (it is its only closer)."""
    with handle.state_lock:
        if handle.dead:  # the reader saw EOF already: it closes (or closed) the connection
            return
        try:
            # Duplicated under the lock: the reader closes the connection only
            # after it marks the handle dead, so the descriptor is still ours.
            fd = os.dup(handle.conn.fileno())
        except (OSError, ValueError):
            return
    try:
        with socket.socket(fileno=fd) as sock:
            sock.shutdown(socket.SHUT_RDWR)
    except OSError:
        pass


class WorkerPool:
    def __init__(self, settings: Settings, progress: Callable[[str], None] | None = None,
                 target: Callable[[Any, dict[str, Any]], None] = worker_main) -> None:
        self.settings = settings
        self._target = target  # the worker's entry point (tests start hostile stand-ins)
        self._mp = multiprocessing.get_context("spawn")
        self._workers: list[WorkerHandle | None] = []  # slots; None: no process in it
        self._place = threading.Condition()  # spares, binds and reclaims (T-TENANT-1)
        self._refilling = False
        self.reclaim_grace_s = RECLAIM_GRACE_S
        self._waiting = 0
        self._state_lock = threading.Lock()
        self._replace_locks: dict[int, threading.Lock] = {}  # per worker index: replacements run in parallel
        self._cell_locks: dict[str, threading.Lock] = {}
        self._fair_lock = threading.RLock()
        self._fair_cv = threading.Condition(self._fair_lock)
        # A run waiting for a lane sleeps on a condition of its own (on the same
        # lock): a freed lane wakes only the run it was granted to, not every waiter.
        self._lane_waits: dict[Ticket, threading.Condition] = {}
        self.fair = FairShare(settings.workers, settings.lanes_per_worker, settings.tenant_max_runs,
                              tenant_queue_cap(settings))
        self._req_ids = itertools.count(1)
        self._generation = itertools.count(1)
        self.kills = 0
        self.progress = progress
        self.closed = False
        self._sandbox_in_force: dict[str, Any] = {"volume_set": []}
        self.broker = broker.Broker(settings)  # host calls made for workers (T-ESCAPE-3)
        self._snapshot_secret: bytes | None = None  # read once, kept here: never sent to a worker (T-IMAGE-2)
        self._up = False  # a worker has started and confined itself: a run can be served (guarded by _place)
        self.start_error: str | None = None  # why the first workers did not start (start_in_background)
        self._start_done = threading.Event()  # every first worker is up, or one failed
        self._start_pending = 0  # first workers not yet up (guarded by _place)
        self.waiting_for_start = 0  # requests waiting for the first worker (guarded by _place)

    def snapshot_key(self, tenant: str) -> bytes:
        """The MAC key of ``tenant``'s cell snapshots (T-IMAGE-2); empty when the
        node's secret cannot be had (snapshots are then neither written nor read)."""
        if self._snapshot_secret is None:
            try:
                self._snapshot_secret = snapshot_file.node_secret(self.settings.keys_dir)
            except (OSError, snapshot_file.SnapshotRefused) as e:
                log.error("cell snapshots are off: %s", e)
                return b""
        return snapshot_file.tenant_key(self._snapshot_secret, tenant)

    # -- lifecycle -------------------------------------------------------
    def _config(self, index: int) -> dict[str, Any]:
        s = self.settings
        return {
            "index": index,
            "cache_dir": str(s.cache_dir),
            "verify_memo": str(s.keys_dir / "verify-memo"),  # remembered runtime hashes; read before confinement
            "volumes_dir": str(s.volumes_dir),
            "snapshots_dir": str(s.snapshots_dir),
            "memory_mb": s.memory_mb,
            "lanes": s.lanes_per_worker,  # the worker keeps this many request threads (worker.RequestThreads)
            "output_cap_bytes": s.output_cap_bytes,
            "result_cap_bytes": s.result_cap_bytes,
            "results_cap_bytes": s.results_cap_bytes,
            "module_max_bytes": s.module_max_bytes,
            "warm": {t.name: int(getattr(s, t.warm_setting)) for t in templates.interpreters() if t.warm_setting},
            "preload": {t.name: list(getattr(s, t.preload_setting)) for t in templates.interpreters() if t.preload_setting},
            "python_image": s.python_image == "on",
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
        # From here on one thread reads the pipe and hands each message to the
        # request it answers (several runs share a worker's pipe).
        threading.Thread(target=self._read, args=(handle,), name=f"cell-pipe-{handle.index}", daemon=True).start()

    def _receive(self, handle: WorkerHandle) -> Reply:
        """One frame from a worker, decoded and checked (T-PROTO-1). A frame
        over the cap raises OSError from the connection before it is read."""
        frame = handle.conn.recv_bytes(self._max_frame())
        reply: Reply = protocol.decode(frame, protocol.FROM_WORKER, self._max_frame())
        return reply

    def _max_frame(self) -> int:
        return protocol.max_frame_bytes(self.settings.output_cap_bytes, self.settings.results_cap_bytes)

    def _read(self, handle: WorkerHandle) -> None:
        """The one reader of a worker's pipe: each typed frame goes to the request
        it answers. A frame that breaks the protocol ends the reading: every
        waiting request is told, and the worker is replaced (T-PROTO-1)."""
        verdict: _Violation | None = None
        stale = 0
        while True:
            try:
                reply = self._receive(handle)
            except ProtocolError as e:
                verdict = _Violation(str(e))
                break
            except Exception:  # EOF or an oversized frame: the worker is gone or not to be trusted
                break
            if isinstance(reply, protocol.HOST_CALLS):
                refusal = self.broker.admit(handle.generation, reply)  # T-ESCAPE-3: only the run in flight here
                if refusal is not None:
                    verdict = _Violation(refusal)
                    break
            with handle.state_lock:
                waiter = (None if isinstance(reply, protocol.Ready) or reply.req_id is None
                          else handle.pending.get(reply.req_id))
            if waiter is None:
                stale += 1  # an answer for a request no longer waiting (or none at all)
                if stale > MAX_STALE_FRAMES:
                    verdict = _Violation("too many frames for no request")
                    break
                continue
            waiter.put(reply)
        with handle.state_lock:
            handle.dead = True
            waiters = list(handle.pending.values())
        for waiter in waiters:
            waiter.put(verdict)  # nobody waits for an answer that cannot come
        if verdict is not None:
            try:
                handle.process.kill()  # nothing more it says is read; its runs are answered killed
            except Exception:
                pass
        try:
            handle.conn.close()  # only this thread reads the pipe, so only it closes it
        except OSError:
            pass

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
        # T-TENANT-1: start with the spares only; bound workers start on demand.
        others = [self._spawn(i) for i in range(1, self._spare_target())]
        if warm:
            self._await_ready(first, START_TIMEOUT_S)
        for handle in others:
            self._await_ready(handle, START_TIMEOUT_S)
        for handle in (first, *others):
            handle.state = "spare"
        self._workers = [first, *others]
        with self._place:
            self._up = True
        self._start_done.set()

    # -- start-up without waiting (issue 18, docs/operations.md) -------------
    def start_in_background(self) -> None:
        """Like :meth:`start`, but returns once the first spares are spawned:
        the web server listens while they load and confine themselves.
        The sandbox check still refuses here, before anything is served
        (T-ESCAPE-1). Each spare is marked ready as soon as it says so; a run
        that comes earlier waits for it (:meth:`_await_first_worker`). If one
        of them fails, :attr:`start_error` says why and :meth:`wait_started`
        returns False: the caller stops the service (fail closed)."""
        self.check_sandbox()
        warm = self._cache_warm()
        with self._place:
            # With a cold cache the first worker compiles the runtimes alone.
            count = self._spare_target() if warm else 1
            handles = [self._spawn(i) for i in range(count)]
            self._workers = list(handles)
            self._start_pending = count
        for handle in handles:
            threading.Thread(target=self._start_one, args=(handle, not warm), name=f"cell-start-{handle.index}",
                             daemon=True).start()

    def _start_one(self, handle: WorkerHandle, then_others: bool) -> None:
        try:
            self._await_ready(handle, START_TIMEOUT_S)
        except (RuntimeError, OSError, EOFError) as e:
            self._start_failed(handle, str(e) or type(e).__name__)
            return
        with self._place:
            if handle.state == "starting" and handle.tenant is None:
                handle.state = "spare"
            self._up = True
            self._place.notify_all()
            rest = [self._spawn(i) for i in range(1, self._spare_target())] if then_others and not self.closed else []
            self._workers.extend(rest)
            self._start_pending += len(rest) - 1
            done = self._start_pending == 0
        for other in rest:
            threading.Thread(target=self._start_one, args=(other, False), name=f"cell-start-{other.index}",
                             daemon=True).start()
        if done:
            self._start_done.set()

    def _start_failed(self, handle: WorkerHandle, why: str) -> None:
        if not self.closed:
            log.error("a worker did not start: %s", why)
        with self._place:
            if self.start_error is None:
                self.start_error = why
            self._retire_locked(handle)
            self._place.notify_all()  # runs waiting for the first worker are refused (503 not_ready)
        self._finish_retire(handle)  # no spare is started in its place: the caller stops the service
        self._start_done.set()

    def wait_started(self, timeout: float | None = None) -> bool:
        """Block until every first worker is up (True) or one failed (False)."""
        self._start_done.wait(timeout)
        return self._start_done.is_set() and self.start_error is None

    def ready(self) -> bool:
        """True once a run can be served: a worker has started and confined itself."""
        return self._up and self.start_error is None and not self.closed

    def _await_first_worker(self) -> None:
        """A run that arrives while the node starts waits, on the placement
        condition, for the first worker; past FIRST_WORKER_WAIT_S, or if the
        workers could not start, 503 not_ready with Retry-After."""
        if self._up:
            return
        end = time.monotonic() + FIRST_WORKER_WAIT_S
        with self._place:
            self.waiting_for_start += 1
            try:
                while not self._up:
                    left = end - time.monotonic()
                    if self.closed or self.start_error is not None or left <= 0:
                        raise Busy("the service is starting: no worker is ready yet; retry shortly", code="not_ready",
                                   retry_after=NOT_READY_RETRY_S)
                    self._place.wait(left)
            finally:
                self.waiting_for_start -= 1

    def _handles(self) -> list[WorkerHandle]:
        return [w for w in self._workers if w is not None]

    def close(self) -> None:
        with self._place:
            self.closed = True
            handles = self._handles()
            self._place.notify_all()
        self.broker.shutdown()  # the stdio MCP servers it started
        for handle in handles:
            _hang_up(handle)
        # One deadline for all: the workers end at the same time, not one after the other.
        deadline = time.monotonic() + 3
        for handle in handles:
            # Not join(timeout): a compromised worker can close its spawn
            # sentinel, and join() then blocks in waitpid for as long as the
            # worker lives (T-ESCAPE-1). is_alive() never blocks.
            while handle.process.is_alive() and time.monotonic() < deadline:
                time.sleep(0.02)
            if handle.process.is_alive():
                handle.process.kill()
                handle.process.join(timeout=2)
            self._remove_worker_dirs(handle)

    # -- placement (T-TENANT-1) ---------------------------------------------
    def worker(self, index: int) -> WorkerHandle:
        handle = self._workers[index] if 0 <= index < len(self._workers) else None
        if handle is None:
            raise WorkerReplaced("no worker holds this slot any more")
        return handle

    def pick_for_cell(self, tenant: str) -> WorkerHandle:
        """A worker bound to ``tenant`` with room for one more cell (binding one if needed)."""
        return self.worker_for(tenant, cell=True)

    def pick_for_run(self, tenant: str) -> WorkerHandle:
        """A worker bound to ``tenant`` for a one-shot run (binding one if needed)."""
        return self.worker_for(tenant, cell=False)

    def assign(self, handle: WorkerHandle, cell_id: str) -> None:
        """Record that ``handle`` now holds the interpreter of ``cell_id``."""
        with self._state_lock:
            handle.cells.add(cell_id)
            handle.idle_since = time.monotonic()

    def release(self, index: int, cell_id: str) -> None:
        with self._state_lock:
            handle = self._workers[index] if 0 <= index < len(self._workers) else None
            if handle is not None:
                handle.cells.discard(cell_id)
                handle.idle_since = time.monotonic()

    def _spare_target(self) -> int:
        return max(1, min(self.settings.worker_spares, self.settings.workers))

    def _usable(self, w: WorkerHandle) -> bool:
        return not w.dead and w.process.is_alive()

    def _reclaimable(self, w: WorkerHandle, now: float, idle_s: float) -> bool:
        """A bound worker nobody needs: no cells, no request in flight, idle long enough."""
        return (w.state == "bound" and not w.cells and w.running == 0 and not w.pending
                and now - w.idle_since >= idle_s)

    def worker_for(self, tenant: str, *, cell: bool) -> WorkerHandle:
        """The placement rule (T-TENANT-1): runs and cells of ``tenant`` only
        ever go to a worker bound to ``tenant``. A tenant without one (or whose
        workers are full of cells) gets a spare bound to it; without a spare, a
        new worker within the budget; without room, the idle worker of another
        tenant is reclaimed; failing that the budget grows up to
        ``SYNAPSE_WORKERS_MAX``; past it, 503 no_worker."""
        if not isinstance(tenant, str) or not protocol.TENANT_ID.fullmatch(tenant):
            raise CellError("this tenant id cannot be bound to a worker", code="bad_tenant")  # fail closed
        self._await_first_worker()
        end = time.monotonic() + PLACE_TIMEOUT_S
        victim: WorkerHandle | None = None
        with self._place:
            while True:
                if self.closed:
                    raise Busy("the service is stopping", retry_after=NO_WORKER_RETRY_S)
                live = [w for w in self._handles() if self._usable(w)]
                mine = [w for w in live if w.tenant == tenant]
                ready = [w for w in mine if w.state == "bound"
                         and (not cell or len(w.cells) < self.settings.max_cells_per_worker)]
                if ready:
                    best = min(ready, key=(lambda w: (len(w.cells), w.running)) if cell else (lambda w: (w.running, w.runs)))
                    best.idle_since = time.monotonic()  # not reclaimed before the request reaches it
                    return best
                coming = [w for w in mine if w.state in ("starting", "binding")]
                spare = next((w for w in live if w.state == "spare"), None)
                if not coming and spare is not None:
                    handle = spare
                    handle.state, handle.tenant = "binding", tenant
                    spawn = False
                    break
                starting_spare = any(w.state == "starting" and w.tenant is None for w in live)
                if not coming and not starting_spare:
                    count = len(self._handles())
                    now = time.monotonic()
                    if count >= self.settings.workers:
                        victims = [w for w in live if w.tenant != tenant
                                   and self._reclaimable(w, now, self.reclaim_grace_s)]
                        victim = min(victims, key=lambda w: w.idle_since) if victims else None
                    if count < self.settings.workers or victim is not None or count < self.settings.worker_ceiling:
                        if victim is not None:
                            self._retire_locked(victim)
                        index = self._free_slot()
                        handle = self._spawn(index)
                        handle.state, handle.tenant = "starting", tenant
                        self._workers[index] = handle
                        spawn = True
                        break
                    raise Busy("every worker holds live cells of other tenants and the node's worker budget is spent; "
                               "retry later", code="no_worker", retry_after=NO_WORKER_RETRY_S)
                left = end - time.monotonic()
                if left <= 0:
                    raise Busy("timed out waiting for a worker", code="no_worker", retry_after=NO_WORKER_RETRY_S)
                self._place.wait(min(left, 1.0))  # a spare or a bind of this tenant is on its way
        if victim is not None:
            self._finish_retire(victim)
        try:
            if spawn:
                self._await_ready(handle, START_TIMEOUT_S)
            bind = protocol.TenantBindRequest(0, tenant_id=tenant, snapshot_key=self.snapshot_key(tenant))
            reply = self._exchange(handle, bind, None, None)
            if not isinstance(reply, protocol.OkReply):
                raise WorkerLost(f"the worker answered {type(reply).__name__} to its tenant bind")
        except (WorkerLost, RuntimeError) as e:
            log.error("binding a worker to a tenant failed: %s", e)
            self._retire(handle)
            raise Busy("no worker could be bound to this tenant", code="no_worker", retry_after=NO_WORKER_RETRY_S) from None
        with self._place:
            handle.state = "bound"
            handle.idle_since = time.monotonic()
            with self._fair_cv:
                self.fair.dedicate(handle.index, tenant)
            self._place.notify_all()
        self._start_spares()
        return handle

    def _free_slot(self) -> int:
        for i, w in enumerate(self._workers):
            if w is None:
                return i
        self._workers.append(None)
        return len(self._workers) - 1

    def _start_spares(self) -> None:
        """Top the spares up in the background: never on a request's path."""
        with self._place:
            if self._refilling or self.closed or not self._spare_wanted():
                return
            self._refilling = True
        threading.Thread(target=self._refill_spares, name="cell-spares", daemon=True).start()

    def _spare_wanted(self) -> bool:
        handles = self._handles()
        spares = sum(1 for w in handles if w.tenant is None and w.state in ("starting", "spare"))
        return spares < self._spare_target() and len(handles) < self.settings.workers

    def _refill_spares(self) -> None:
        try:
            while True:
                with self._place:
                    if self.closed or not self._spare_wanted():
                        return
                    index = self._free_slot()
                    handle = self._spawn(index)
                    self._workers[index] = handle
                try:
                    self._await_ready(handle, START_TIMEOUT_S)
                except RuntimeError as e:
                    if not self.closed:
                        log.error("a spare worker did not start: %s", e)
                    self._retire(handle)
                    return
                with self._place:
                    if handle.state == "starting" and handle.tenant is None:
                        handle.state = "spare"
                    self._place.notify_all()
        finally:
            with self._place:
                self._refilling = False

    def _retire_locked(self, handle: WorkerHandle) -> None:
        """Take ``handle`` out of its slot (caller holds the placement lock)."""
        handle.state = "retired"
        if 0 <= handle.index < len(self._workers) and self._workers[handle.index] is handle:
            self._workers[handle.index] = None
            with self._fair_cv:
                self.fair.dedicate(handle.index, None)

    def _finish_retire(self, handle: WorkerHandle) -> None:
        """Kill a retired worker and remove its pool directories (a bound
        worker may not remove them itself: they sit outside its tenant's)."""
        try:
            handle.process.kill()
            handle.process.join(timeout=5)
        except Exception:
            pass
        self._remove_worker_dirs(handle)

    def _retire(self, handle: WorkerHandle) -> None:
        with self._place:
            self._retire_locked(handle)
            self._place.notify_all()
        self._finish_retire(handle)
        self._start_spares()

    def _remove_worker_dirs(self, handle: WorkerHandle) -> None:
        pid = handle.process.pid
        if pid is None:
            return
        pool_dir = self.settings.volumes_dir / ".pool"
        for path in (pool_dir / f"w{handle.index}-{pid}", pool_dir / ".tmp" / f"w{handle.index}-{pid}"):
            try:
                remove_tree(path)
            except (ConfinementError, OSError) as e:
                log.warning("could not remove %s: %s", path, e)

    def reclaim_idle(self, now: float | None = None) -> int:
        """Reclaim bound workers idle (no cells, no runs) for ``SYNAPSE_WORKER_IDLE_S``,
        and spares above the target; returns how many were stopped."""
        moment = time.monotonic() if now is None else now
        with self._place:
            handles = self._handles()
            idle = [w for w in handles if self._reclaimable(w, moment, self.settings.worker_idle_s)]
            spares = [w for w in handles if w.state == "spare"]
            idle += spares[self._spare_target():] if len(handles) - len(idle) > self.settings.workers else []
            for w in idle:
                self._retire_locked(w)
            if idle:
                self._place.notify_all()
        for w in idle:
            log.info("reclaimed worker %d (pid %s)", w.index, w.process.pid)
            self._finish_retire(w)
        self._start_spares()
        return len(idle)

    def binding_status(self) -> dict[str, Any]:
        """Tenant binding as /v1/status shows it. No tenant id and no count of
        tenants: any tenant's key reads /v1/status (T-TENANT-1)."""
        handles = self._handles()
        return {"mode": "one tenant per worker", "bound": sum(1 for w in handles if w.state == "bound"),
                "spares": sum(1 for w in handles if w.state == "spare"),
                "starting": sum(1 for w in handles if w.state in ("starting", "binding")),
                "budget": self.settings.workers, "max": self.settings.worker_ceiling,
                "spare_target": self._spare_target(), "idle_reclaim_s": self.settings.worker_idle_s}

    def sandbox_status(self) -> dict[str, Any]:
        """The second wall as the operator sees it: what the kernel offers, what
        the workers were told, and each worker's seccomp state from /proc."""
        offered = sandbox.probe()
        box = self._sandbox_in_force
        return {
            "mode": self.settings.worker_sandbox,
            "landlock_abi": offered["landlock_abi"],
            "seccomp": offered["seccomp"],
            "network": "denied",  # every worker: host_fetch / MCP through the broker (T-ESCAPE-3)
            "process_spawn": False,
            "volume_set": "one tenant's volume and /tmp directories per bound worker; none for a spare",
            "tenant_binding": self.binding_status(),
            "workers": [{"pid": w.process.pid, "state": w.state, **sandbox.process_status(w.process.pid)}
                        for w in self._ready()],
        }

    def _ready(self) -> list[WorkerHandle]:
        """Workers that have confined themselves (a starting one has not yet)."""
        return [w for w in self._handles() if w.state in ("spare", "binding", "bound")]

    def stats(self) -> dict[str, Any]:
        with self._fair_cv:
            fair = self.fair.stats()
        ready = self._ready()
        return {
            "workers": len(ready),
            "bound": sum(1 for w in ready if w.state == "bound"),
            "spares": sum(1 for w in ready if w.state == "spare"),
            "busy": sum(1 for w in ready if w.busy),
            "running": sum(w.running for w in ready),
            "lanes": fair["lanes"],  # no per-tenant figures: any tenant may read this (T-TENANT-1)
            "waiting": self._waiting,
            "cells": sum(len(w.cells) for w in ready),
            "kills": self.kills,
            "pids": [w.process.pid for w in ready],
        }

    # -- admission (T-DOS-2, T-FAIR-1) -------------------------------------
    def _cell_lock(self, cell_id: str) -> threading.Lock:
        with self._state_lock:
            return self._cell_locks.setdefault(cell_id, threading.Lock())

    def forget_cell(self, cell_id: str) -> None:
        with self._state_lock:
            self._cell_locks.pop(cell_id, None)

    def _admit(self, tenant: str) -> None:
        with self._state_lock:
            if self._waiting >= self.settings.queue_max + max(self.settings.workers, len(self._handles())):
                raise Busy("every worker is busy and the queue is full", retry_after=1)  # T-DOS-2
            with self._fair_cv:
                if not self.fair.admit(tenant):
                    # T-FAIR-1: this tenant already has its share of the queue waiting.
                    raise RateLimited("this tenant already has its share of runs waiting for a worker; retry when one ends",
                                      code="tenant_busy", retry_after=1)
            self._waiting += 1

    def _leave(self, tenant: str) -> None:
        with self._state_lock:
            self._waiting -= 1
            with self._fair_cv:
                self.fair.leave(tenant)

    def _take_lane(self, index: int, tenant: str, timeout: float) -> Ticket:
        end = time.monotonic() + timeout
        with self._fair_cv:
            ticket = self.fair.request(tenant, index)
            self._wake_granted(self.fair.dispatch())
            if ticket.granted:
                return ticket
            mine = threading.Condition(self._fair_lock)
            self._lane_waits[ticket] = mine  # registered before the lock is let go: no grant is missed
            try:
                while not ticket.granted:
                    left = end - time.monotonic()
                    if left <= 0:
                        self.fair.cancel(ticket)
                        raise Busy("timed out waiting for a worker", retry_after=1)
                    mine.wait(left)
            finally:
                del self._lane_waits[ticket]
        return ticket

    def _wake_granted(self, granted: list[Ticket]) -> None:
        """Wake the runs whose tickets were just granted (caller holds the fairness lock)."""
        for ticket in granted:
            waiting = self._lane_waits.get(ticket)
            if waiting is not None:  # None: the caller's own ticket, granted before it waited
                waiting.notify()

    def _free_lane(self, ticket: Ticket) -> None:
        with self._fair_cv:
            self.fair.release(ticket)
            self._wake_granted(self.fair.dispatch())

    # -- calls -----------------------------------------------------------
    def call(self, handle: WorkerHandle, msg: Request, *, deadline_s: float | None, on_chunk: ChunkCallback | None = None,
             tenant: str = "", cell_id: str | None = None, on_result: ResultCallback | None = None,
             cell_wait_s: float = 30.0) -> Reply:
        """Send one request to a worker and wait for its final message.

        ``deadline_s`` is the run's own limit; the worker is killed if it has
        not answered by then plus the grace period. None = control message
        (bind, drop): it takes no lane. Requests naming ``cell_id`` run one
        after the other; runs wait for a lane of ``handle``'s worker, granted
        fairly across tenants. A malformed or oversized answer costs the
        worker its life: after one bad frame nothing it says is trusted
        (T-PROTO-1). ``cell_wait_s`` 0: a cell running code is refused at
        once (409 cell_busy) rather than waited for.
        """
        # T-TENANT-1: a worker only ever receives requests of the tenant it is bound to.
        if (handle.state != "bound" or handle.tenant is None or (tenant and tenant != handle.tenant)
                or (isinstance(msg, protocol.ExecRequest) and msg.tenant_id != handle.tenant)):
            if handle.state == "retired":
                raise WorkerReplaced("the worker was reclaimed")
            raise CellError("refused to send a request to a worker bound to another tenant", code="wrong_worker")
        self._admit(tenant)
        cell_lock = self._cell_lock(cell_id) if cell_id is not None else None
        ticket: Ticket | None = None
        try:
            if cell_lock is not None and not (cell_lock.acquire(blocking=False) if cell_wait_s <= 0
                                              else cell_lock.acquire(timeout=cell_wait_s)):
                if cell_wait_s <= 0:
                    raise Conflict("the cell is running code; try again between runs", code="cell_busy")
                raise Busy("timed out waiting for this cell's previous run", retry_after=1)
            try:
                if deadline_s is not None:
                    ticket = self._take_lane(handle.index, tenant, 30.0)
            except BaseException:
                if cell_lock is not None:
                    cell_lock.release()
                raise
        finally:
            self._leave(tenant)
        try:
            return self._exchange(handle, msg, deadline_s, on_chunk, on_result)
        finally:
            if ticket is not None:
                self._free_lane(ticket)
            if cell_lock is not None:
                cell_lock.release()

    def _exchange(self, handle: WorkerHandle, msg: Request, deadline_s: float | None,
                  on_chunk: ChunkCallback | None, on_result: ResultCallback | None = None) -> Reply:
        if self._workers[handle.index] is not handle:  # replaced while we waited
            raise WorkerReplaced("worker was replaced")
        if handle.dead or not handle.process.is_alive():  # died while idle (e.g. killed from outside)
            self.check_alive()  # this one and any other that died with it: the answer reflects a settled pool
            self._replace(handle, "died while idle")  # no-op once replaced; covers a pipe closed before the exit
            raise WorkerReplaced("worker had died and was replaced")
        req_id = next(self._req_ids)
        answers: queue.SimpleQueue[Answer] = queue.SimpleQueue()
        with handle.state_lock:
            if handle.dead:
                raise WorkerReplaced("worker had died")
            handle.pending[req_id] = answers
            handle.running += 1
            handle.runs += 1
        grace = self.settings.kill_grace_ms / 1000
        limit = time.monotonic() + (CONTROL_TIMEOUT_S if deadline_s is None else deadline_s + grace)
        # What an honest worker can stream: each stream up to its cap
        # (T-PROTO-1: more is a violation).
        chunk_budget = 2 * self.settings.output_cap_bytes + (1 << 16)
        self.broker.open(handle.generation, req_id, msg, deadline_s)  # what this run's host calls may use
        results_seen = 0
        results_budget = self.settings.results_cap_bytes  # T-DOS-1: a run's results, streamed one by one
        try:
            try:
                frame = protocol.encode(dataclasses.replace(msg, req_id=req_id))
                with handle.send_lock:
                    handle.conn.send_bytes(frame)
            except (OSError, ValueError):
                self._replace(handle, "died")
                raise WorkerLost("the worker died during the run and was replaced") from None
            while True:
                try:
                    reply = answers.get(timeout=max(0.0, limit - time.monotonic()))
                except queue.Empty:
                    # T-DOS-1: the last line of defence for a run's wall-clock limit.
                    self._replace(handle, "overran its deadline")
                    raise WorkerOverran("the worker overran the run's deadline and was replaced") from None
                if reply is None:
                    self._replace(handle, "died")
                    raise WorkerLost("the worker died during the run and was replaced")
                if isinstance(reply, _Violation):
                    self._replace(handle, "sent a malformed message")
                    raise WorkerLost("the worker sent a malformed message and was replaced")  # its words are not repeated
                if isinstance(reply, protocol.RunChunk):
                    chunk_budget -= len(reply.data)
                    if chunk_budget < 0:
                        self._replace(handle, "streamed more than the output caps allow")
                        raise WorkerLost("the worker streamed more than the output caps allow and was replaced")
                    if on_chunk is not None:
                        on_chunk(reply.fd, reply.data)
                    continue
                if isinstance(reply, protocol.HOST_CALLS):
                    self._answer_call(handle, reply, limit)  # admitted by the reader (T-ESCAPE-3)
                    continue
                if isinstance(reply, protocol.RunResult):
                    # In order, within the count and the run's cap (T-PROTO-1, T-DOS-1).
                    results_budget -= sum(len(v) for v in reply.result.data.values())
                    if reply.index != results_seen or results_budget < 0:
                        self._replace(handle, "streamed results out of order or over the caps")
                        raise WorkerLost("the worker streamed results out of order or over the caps and was replaced")
                    results_seen += 1
                    if on_result is not None:
                        on_result(reply.index, reply.result)
                    continue
                return reply
        finally:
            self.broker.close(req_id)
            with handle.state_lock:
                handle.pending.pop(req_id, None)
                handle.running -= 1
                handle.idle_since = time.monotonic()

    def cancel(self, handle: WorkerHandle, cell_id: str) -> bool:
        """Stop the run in flight in ``cell_id`` on ``handle``'s worker at once
        (its cell is being deleted); returns once that run has ended. It takes
        no lane and not the cell's lock, which the run it stops holds. False
        when nothing was running there."""
        with self._state_lock:
            lock = self._cell_locks.get(cell_id)
        if lock is None or not lock.locked():
            return False
        try:
            reply = self._exchange(handle, protocol.CancelRequest(0, cell_id=cell_id), None, None)
        except WorkerLost:
            return False
        return isinstance(reply, protocol.OkReply)

    # -- the host-call broker (T-ESCAPE-3; the logic is in broker.py) ---------
    def _answer_call(self, handle: WorkerHandle, call: protocol.HostCall, limit: float) -> None:
        """Make a worker's host call and send the answer. A worker that stops
        reading its pipe cannot hold this thread past the run's limit: the
        worker is killed then, which ends the send."""
        answer = protocol.encode(self.broker.serve(handle.generation, call))
        token = self.broker.send_watch.start(limit, lambda: _kill_quietly(handle))
        try:
            with handle.send_lock:
                handle.conn.send_bytes(answer)
        except (OSError, ValueError):
            pass  # the worker is gone: its reader reports it to this run
        finally:
            self.broker.send_watch.done(token)

    def _replace(self, handle: WorkerHandle, why: str) -> None:
        """Kill a worker, once however many of its requests notice; other runs
        on it are answered killed. Its slot is freed and a spare started in
        the background (T-TENANT-1: its cells' next runs bind a worker of
        their tenant again)."""
        with self._place:
            if self._workers[handle.index] is not handle:
                return  # already replaced by another request or the maintenance loop
            self.kills += 1
            log.warning("worker %d (pid %s) %s; stopped", handle.index, handle.process.pid, why)
            self._retire_locked(handle)
            self._place.notify_all()
        self._finish_retire(handle)  # its pipe reader sees EOF and tells every pending request
        self._start_spares()

    def generation_of(self, index: int) -> int:
        """The generation of the worker in slot ``index``; 0 when the slot is empty."""
        handle = self._workers[index] if 0 <= index < len(self._workers) else None
        return handle.generation if handle is not None else 0

    def check_alive(self) -> None:
        """Replace workers that died between requests (e.g. killed from outside),
        reclaim idle bound ones and keep the spares topped up (T-TENANT-1)."""
        for handle in self._handles():
            if not handle.process.is_alive() and handle.state != "starting" and self._workers[handle.index] is handle:
                self._replace(handle, "died while idle")
        self.reclaim_idle()


def _kill_quietly(handle: WorkerHandle) -> None:
    try:
        handle.process.kill()
    except Exception:
        pass
