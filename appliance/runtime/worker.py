"""A worker process: owns a wasmtime engine, its sessions and a warm pool.

The web process never runs guest code. It sends requests over a pipe; each
runs on a thread of its own (the supervisor bounds how many at once, and
sends one cell's runs one after the other), and is answered with optional
output chunks and one final message carrying its request id.
A worker that overruns a deadline is killed by the supervisor (pool.py) and
replaced; nothing it held survives, by design.
"""
from __future__ import annotations

import collections
import contextlib
import ctypes
import dataclasses
import importlib
import os
import resource
import shutil
import signal
import tempfile
import threading
import time
import traceback
import uuid
from dataclasses import dataclass, field
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any, Callable

import wasmtime

from appliance.confine import (ConfinementError, Volume, copy_volume, create_volume_in, open_volume_in, remove_tree,
                               remove_volume_in)
from appliance.policy.egress import EgressPolicy, parse_networks
from appliance.runtime.volume_watch import VolumeWatch
from appliance.runtime import code_prep, context, guest_state, landlock, protocol, sandbox, scratch, snapshot_file
from appliance.runtime.broker_client import BrokerClient
from appliance.runtime.governor import STOP_CANCEL
from appliance.runtime.outcome import CRASH_LOST, CRASH_ROLLED_BACK, NO_EXIT, Outcome
from appliance.runtime.loader import Runtimes
from appliance.runtime.modules import PRO_FUNCTIONS, ModuleRefused, ModuleRunner
from appliance.runtime import templates
from appliance.runtime.templates import RuntimeMissing
from appliance.runtime.sessions import Session
from appliance.runtime.stack import GUEST_THREAD_STACK, on_guest_stack, start_guest_thread

PR_SET_NO_NEW_PRIVS = 38
# A request carries at most a 10 MB module or code body (base64) plus small fields.
MAX_REQUEST_FRAME = 64 << 20
STOP_DISK = "disk_limit"  # governor stop reason (reported as status killed, with a T-DISK-1 denial)
CANCEL_REPEAT_S = 0.02  # a cancel stops the run again this often until it has ended
CANCEL_WAIT_S = 5.0  # and answers after this long at most
ENV_TURN_S = 1.0  # the most the turn setting a run's envs may take (out of the run's own limit)
# A lower bound of how fast a snapshot is restored (T-IMAGE-2): ~100 MB measured
# at 0.5 s; a roll-back that may not fit in the time left is left to the next run.
RESTORE_BYTES_PER_S = 100 << 20
ENV_RESTORE_S = 0.25  # the turn putting the cell's envs back (within the supervisor's grace, T-DOS-1)
REFILL_FULL_WAIT_S = 1.0  # the refill loop's own look when the pools are full (a taken session wakes it)
# Prepared one-shot sessions kept per Python template (each ~3 MiB more than a
# warm one). Two, so that one-shot runs sent back to back find one: one is made
# in the gap after a run and is often still being made when the next run
# arrives, which then takes the other (with one, every other run took a cold one).
ONE_SHOT_READY = 2


def static_resolver(hosts: dict[str, list[str]]) -> Any:
    """Resolve only from the operator's map; anything else is a resolve error."""
    from appliance.egress import EgressError  # start-up: the egress client (ssl) loads only when egress is on

    def resolve(host: str, _port: int) -> list[str]:
        found = hosts.get(host.lower().rstrip("."))
        if not found:
            raise EgressError("resolve", f"{host} is not in the egress hosts map")
        return list(found)

    return resolve


def egress_policy(egress: protocol.EgressSpec) -> EgressPolicy:
    """The policy of one run from the web process's message (``services.egress_message``).

    The deny-list is a required field of the message: a request without it is
    refused by the protocol rather than run without it (T-SSRF-1)."""
    return EgressPolicy(enabled=egress.enabled, allow_hosts=tuple(egress.allow_hosts),
                        deny_networks=parse_networks(egress.deny))


def harden_process(max_files: int = 4096) -> dict[str, str]:
    """Defense in depth for a process that runs guests (see SECURITY.md, worker hardening)."""
    done: dict[str, str] = {}
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        ok = libc.prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) == 0
        done["no_new_privs"] = "on" if ok else "failed"
    except OSError:
        done["no_new_privs"] = "unavailable"
    try:
        resource.setrlimit(resource.RLIMIT_NOFILE, (max_files, max_files))
        resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
        done["rlimits"] = f"nofile={max_files} core=0"
    except (ValueError, OSError) as e:
        done["rlimits"] = f"failed: {e}"
    # RLIMIT_AS is deliberately not set: wasmtime reserves several GiB of
    # virtual address space per linear memory (guard regions), so an AS limit
    # breaks instantiation; memory is bounded per Store instead.
    return done


class Worker:
    def __init__(self, conn: Connection, config: dict[str, Any], *, start_threads: bool = True) -> None:
        """Everything needing wide access is opened here; ``start_threads=False``
        leaves the epoch thread to :meth:`start_threads`, after confinement."""
        self.conn = conn
        self.cfg = config
        self._send_lock = threading.Lock()
        self._lock = threading.Lock()  # the warm pool and the count of requests in flight
        self._in_flight = 0
        self._refilling = False  # a warm session is being made (serve with refill_thread)
        self._stopping = False  # the pipe closed: no new warm session is started
        self._refill_wake = threading.Event()  # set when the last request in flight ends
        hashes = _registry_hashes(config["registry_hashes"]) if "registry_hashes" in config \
            else _mirror_hashes(config.get("mirror_dir"))
        self.runtimes = Runtimes(Path(config["cache_dir"]), registry_hashes=hashes, confining=not start_threads,
                                 verify_memo=config.get("verify_memo"),
                                 use_image=bool(config.get("python_image", True)))
        self.untrusted: dict[str, str] = {}
        self.modules = ModuleRunner(self.runtimes.engine, self.runtimes.base_linker)
        self.sessions: dict[str, Session] = {}
        self.pool_root = Path(config["volumes_dir"]) / ".pool" / f"w{config['index']}-{os.getpid()}"
        _remove_stale_pools(self.pool_root)
        self.pool_root.mkdir(parents=True, exist_ok=True, mode=0o700)
        # The pool sessions' /tmp root (scratch.py), made now: a bound worker cannot make it later.
        self.pool_tmp_root = scratch.tmp_dir_for(str(self.pool_root / "-")).parent
        self.pool_tmp_root.mkdir(parents=True, exist_ok=True, mode=0o700)
        self.tenant: str | None = None  # the one tenant this worker serves, once bound (T-TENANT-1)
        self.snapshot_key = b""  # its snapshots' MAC key, from the bind (T-IMAGE-2)
        # image key -> (store, instance, memory view) of a fresh instance, never run: what captures diff against
        self._base_pages: dict[str, tuple[wasmtime.Store, wasmtime.Instance, memoryview]] = {}
        # T-IMAGE-2: cells whose snapshot file holds exactly their live interpreter's
        # state (captured, and no run since). Kept by this process from what it
        # did itself, never from anything a guest wrote: a crash rolls back only to these.
        self.current_capture: set[str] = set()
        # Roll-backs left to the cell's next run: restoring right after a run
        # that used its whole time could outlast the supervisor's grace.
        self.pending_rollback: set[str] = set()
        self.fifo_dir = tempfile.mkdtemp(prefix="cell-worker-")
        interpreters = [t.name for t in templates.interpreters()]
        self.warm: dict[str, collections.deque[tuple[Any, str]]] = {name: collections.deque() for name in interpreters}
        self.targets = {name: int(config.get("warm", {}).get(name, 0)) for name in interpreters}
        # One-shot sessions of the Python image with their first run's page
        # faults paid (sessions.PY_ONE_SHOT_WARM_UP); only /v1/execute takes
        # them, never a new cell (whose pages should stay the image's).
        self.ready_once: dict[str, collections.deque[tuple[Any, str]]] = {name: collections.deque() for name in interpreters}
        self.once_targets = {name: ONE_SHOT_READY if self.targets[name] and templates.get(name).interpreter
                             and "python" in templates.get(name).languages else 0 for name in interpreters}
        self.preload: dict[str, list[str]] = {k: list(v) for k, v in config.get("preload", {}).items()}
        self.default_memory = int(config["memory_mb"]) << 20
        self.weights = _open_weights(config.get("weights_dir"))
        # T-ESCAPE-3: MCP servers are the supervisor's (the broker); a worker
        # only knows whether the node has any, and starts none.
        self.mcp: Any = BROKERED_MCP if config.get("mcp_servers") else None
        self.broker = BrokerClient(self.send, grace_s=int(config.get("kill_grace_ms", 1000)) / 1000)
        self.disk_watch = VolumeWatch()
        self.in_flight: dict[str, _InFlight] = {}  # cell -> its run now (CancelRequest); under _lock
        # One idle thread per lane, and one for a cancel or a stats request beside them.
        self._threads = RequestThreads(self._serve_one, keep=int(config.get("lanes", 2)) + 1)
        # Session classes are imported now: a confined worker cannot read code
        # outside its read-only set later (T-ESCAPE-1).
        self.session_classes: dict[str, Any] = {}
        for template in interpreters:
            try:
                self.runtimes.get(template)
                self.session_classes[template] = session_class(template)
            except (RuntimeMissing, ImportError, AttributeError) as e:  # that template is refused; the others keep working
                self.untrusted[template] = str(e)
                self.targets[template] = 0
                self.once_targets[template] = 0
        self.runtimes.forget_memo()  # the memo's key stays behind the confinement wall (T-ESCAPE-1)

    def start_threads(self) -> None:
        self.runtimes.start_ticker()

    def scratch_dirs(self) -> tuple[str, ...]:
        """Directories this worker writes outside the volume set: its FIFOs and
        its own pool (warm and one-shot sessions' /data and /tmp)."""
        return (self.fifo_dir, str(self.pool_root), str(self.pool_tmp_root))

    def prepare_tenant(self, tenant_id: str) -> tuple[str, str]:
        """Make the tenant's volume and /tmp roots (0700, never through a
        symlink) while this worker may still write the whole volumes
        directory; the second Landlock layer then admits only these."""
        dirs = sandbox.tenant_dirs(str(self.cfg["volumes_dir"]), tenant_id)
        for path in dirs:
            os.makedirs(path, mode=0o700, exist_ok=True)
            st = os.lstat(path)
            if not os.path.isdir(path) or os.path.islink(path) or st.st_uid != os.geteuid():
                raise sandbox.SandboxError(f"{path} is not a directory of ours")
        snapshots = sandbox.tenant_snapshot_dir(self.cfg, tenant_id)
        if snapshots is not None and os.path.isdir(os.path.dirname(snapshots)):
            os.makedirs(snapshots, mode=0o700, exist_ok=True)
            st = os.lstat(snapshots)
            if not os.path.isdir(snapshots) or os.path.islink(snapshots) or st.st_uid != os.geteuid():
                raise sandbox.SandboxError(f"{snapshots} is not a directory of ours")
        return dirs

    # -- messaging (typed frames, no pickle: appliance/runtime/protocol.py) ----
    def send(self, msg: Any) -> None:
        frame = protocol.encode(msg)
        with self._send_lock:
            self.conn.send_bytes(frame)

    def serve(self, announce: bool = True, refill_thread: bool = False) -> None:
        """Read requests until EOF. ``refill_thread``: warm sessions are made
        on a thread of their own, so a request never waits behind one being
        made (a freshly bound worker starts with none: T-TENANT-1)."""
        if announce:
            self.send(protocol.Ready(pid=os.getpid()))
        if refill_thread:
            threading.Thread(target=self._refill_loop, name="cell-warm", daemon=True).start()
            while self._receive_one():
                pass
            return
        while True:
            if self.conn.poll(0):
                if not self._receive_one():
                    return
                continue
            with self._lock:
                idle = self._in_flight == 0
            if idle and self._refill_one():
                continue
            # Idle and full: sleep until a message (or EOF). Runs in flight:
            # look again soon, so the warm pool refills once they end.
            self.conn.poll(None if idle else 0.05)

    def _receive_one(self) -> bool:
        """Read one request and start it on a thread of its own; False at EOF
        or on a bad frame (only the supervisor writes here: it is gone or broken)."""
        try:
            frame = self.conn.recv_bytes(MAX_REQUEST_FRAME)
            request = protocol.decode(frame, protocol.TO_WORKER, MAX_REQUEST_FRAME)
        except (EOFError, OSError, protocol.ProtocolError):
            return False
        if isinstance(request, protocol.CallAnswer):
            self.broker.deliver(request)  # a host call's answer (T-ESCAPE-3): its run's thread waits for it
            return True
        with self._lock:
            self._in_flight += 1
            if isinstance(request, protocol.ExecRequest) and request.cell_id is not None:
                # Known before its thread starts: a cancel that follows it on the pipe finds it.
                self.in_flight[request.cell_id] = _InFlight()
        self._threads.submit(request)
        return True

    def _serve_one(self, request: protocol.Request) -> None:
        cell_id = request.cell_id if isinstance(request, protocol.ExecRequest) else None
        flight = None
        if cell_id is not None:
            with self._lock:
                flight = self.in_flight.get(cell_id)  # this run's: _receive_one put it there before handing it on
        try:
            try:
                self.send(self.answer(request))
            except (OSError, ValueError):
                pass  # the supervisor closed the pipe: the main loop ends on EOF
        finally:
            with self._lock:
                self._in_flight -= 1
                if self._in_flight == 0 and self._pools_short():
                    self._refill_wake.set()  # only when there is something to make: not a thread switch per run
                # Only this run's entry: once its answer is sent, the cell's next
                # run may already be registered, and a cancel must find that one.
                if cell_id is not None and flight is not None and self.in_flight.get(cell_id) is flight:
                    del self.in_flight[cell_id]
            if flight is not None:
                flight.done.set()

    def answer(self, request: protocol.Request) -> Any:
        """Handle one request; every failure becomes an error reply."""
        req_id = request.req_id
        try:
            return self.handle(request)
        except _Refused as e:
            return dataclasses.replace(e.reply, req_id=req_id)
        except ModuleRefused as e:
            return protocol.ErrorReply(req_id, e.status, e.code, e.message[:protocol.MAX_TEXT])
        except wasmtime.WasmtimeError as e:
            if "exceeds memory limits" in str(e) or "memory minimum size" in str(e):
                return protocol.ErrorReply(req_id, 400, "memory_too_small",
                                           "memory_mb is below what this template needs to start; raise it")
            return protocol.ErrorReply(req_id, 500, "internal", "runtime error")
        except Exception as e:  # a bug here must not kill the worker's other cells
            return protocol.ErrorReply(req_id, 500, "internal", type(e).__name__, traceback.format_exc()[-2000:])

    # -- warm pool -------------------------------------------------------
    def _new_session(self, template: str, volume: str, memory: int, envs: dict[str, str] | None,
                     stdin: bytes | None = None) -> Session:
        """``stdin``: a one-shot Python run's standard input (the service refuses
        it for JavaScript, whose stdin carries the session's commands)."""
        if template in self.untrusted:
            raise ModuleRefused(403, "template_untrusted", self.untrusted[template])
        loaded = self.runtimes.get(template)
        extra = {"stdin": stdin} if stdin else {}
        session: Session = self.session_classes[template](loaded, volume, memory, envs, self.fifo_dir, **extra)
        return session

    def _refill_loop(self) -> None:
        """Keep the warm pool full while no request is in flight (checked
        between sessions; a run in flight pauses it)."""
        while True:
            self._refill_wake.clear()
            with self._lock:
                if self._stopping:
                    return
                idle = self._in_flight == 0
                if idle:
                    self._refilling = True
            try:
                made = idle and self._refill_one()
            finally:
                with self._lock:
                    self._refilling = False
            if not made:
                # Idle and full, or busy: look again shortly, or at once when
                # the last run ends. One-shot runs arriving back to back leave
                # only a few ms between them; a fixed wait here missed every
                # gap and left them making their sessions on the request path.
                # Full: a request that takes a session wakes this loop when it
                # ends, so it looks only now and then by itself.
                with self._lock:
                    short = self._pools_short()
                self._refill_wake.wait(0.05 if short else REFILL_FULL_WAIT_S)

    def _pools_short(self) -> bool:
        """Whether a warm or one-shot session is missing (under ``_lock``)."""
        return (any(len(self.warm[t]) < n for t, n in self.targets.items())
                or any(len(self.ready_once[t]) < n for t, n in self.once_targets.items()))

    def _refill_one(self) -> bool:
        for template, target in self.targets.items():
            if len(self.warm[template]) < target:
                path = str(self.pool_root / uuid.uuid4().hex)
                os.mkdir(path, 0o700)
                try:
                    session = self._new_session(template, path, self.default_memory, None)
                except Exception:
                    _discard(path)
                    scratch.remove_tmp_dir(path)
                    self.targets[template] = len(self.warm[template])  # stop retrying a broken runtime
                    return False
                preload = self.preload.get(template) or []
                if preload:
                    # Pay numpy/pandas import time (~2 s CPU, ~45 MiB) before a client asks.
                    session.run(("import " + ", ".join(preload)).encode(), 60.0, 1 << 16, None, None)
                with self._lock:
                    self.warm[template].append((session, path))
                return True
        return self._refill_once()

    def _refill_once(self) -> bool:
        """Make one one-shot session (the warm pool proper comes first)."""
        for template, target in self.once_targets.items():
            if len(self.ready_once[template]) >= target:
                continue
            path = str(self.pool_root / uuid.uuid4().hex)
            os.mkdir(path, 0o700)
            session: Any = None
            try:
                session = self.session_classes[template](self.runtimes.get(template), path, self.default_memory,
                                                         None, self.fifo_dir, warm_up=True)
                ready = bool(getattr(session, "warmed_up", False))
            except Exception:
                ready = False
            if not ready:  # no image here (or it failed): the warm pool serves one-shots as before
                if session is not None:
                    session.close()
                _discard(path)
                scratch.remove_tmp_dir(path)
                self.once_targets[template] = 0
                return False
            with self._lock:
                self.ready_once[template].append((session, path))
            return True
        return False

    def _take_once(self, template: str, memory: int, envs: dict[str, str] | None) -> tuple[Any, str] | None:
        """A session for a one-shot run: a prepared one, else one of the warm pool."""
        if memory == self.default_memory and not envs:
            with self._lock:
                queue = self.ready_once.get(template)
                if queue:
                    return queue.popleft()
        return self._take_warm(template, memory, envs)

    def _take_warm(self, template: str, memory: int, envs: dict[str, str] | None) -> tuple[Any, str] | None:
        if memory != self.default_memory or envs:
            return None
        with self._lock:
            queue = self.warm.get(template)
            return queue.popleft() if queue else None

    # -- requests --------------------------------------------------------
    def handle(self, request: protocol.Request) -> Any:
        if isinstance(request, protocol.ExecRequest) and self.tenant is not None and request.tenant_id != self.tenant:
            # T-TENANT-1: the supervisor never sends this; Landlock would refuse the files anyway.
            return protocol.ErrorReply(request.req_id, 403, "wrong_tenant", "this worker serves another tenant")
        if isinstance(request, protocol.ExecRequest):
            return self._exec(request)
        if isinstance(request, protocol.BindRequest):
            return self._bind(request)
        if isinstance(request, protocol.CancelRequest):
            return self._cancel(request)
        if isinstance(request, protocol.ForkRequest):
            return self._fork(request)
        if isinstance(request, protocol.CaptureRequest):
            return self._capture(request)
        if isinstance(request, protocol.DropRequest):
            session = self.sessions.pop(request.cell_id, None)
            self.current_capture.discard(request.cell_id)
            self.pending_rollback.discard(request.cell_id)
            if session is not None:
                session.close()
            return protocol.OkReply(request.req_id)
        if isinstance(request, protocol.StatsRequest):
            return protocol.StatsReply(request.req_id, sessions=len(self.sessions),
                                       warm={k: len(v) for k, v in self.warm.items()},
                                       cache_hits=self.runtimes.cache.hits, cache_misses=self.runtimes.cache.misses)
        return protocol.Pong(request.req_id)

    def _bind(self, msg: protocol.BindRequest) -> protocol.OkReply:
        template, volume = msg.template, msg.volume
        memory = int(msg.memory_mb or self.cfg["memory_mb"]) << 20
        envs = msg.envs or None
        warm = None if os.path.exists(volume) else self._take_warm(template, memory, envs)
        if warm is not None:
            session, path = warm
            os.makedirs(os.path.dirname(volume), mode=0o700, exist_ok=True)
            # The session's preopen holds the directory itself, so renaming the
            # warm directory into place hands it to the cell (same inode).
            os.rename(path, volume)
            scratch.move_tmp_dir(path, volume)  # its /tmp goes with it (scratch.py)
        else:
            os.makedirs(volume, mode=0o700, exist_ok=True)
            session = self._new_session(template, volume, memory, envs)
        self.sessions[msg.cell_id] = session
        return protocol.OkReply(msg.req_id, warm=warm is not None)

    def _sink(self, req_id: int, stream: bool) -> Any:
        if not stream:
            return None

        def sink(fd: int, data: bytes) -> None:
            try:
                self.send(protocol.RunChunk(req_id, fd, data))
            except Exception:
                pass

        return sink

    def _result_sink(self, req_id: int, stream: bool) -> Any:
        """A streamed run's rich results, each sent the moment the guest shows it (results_channel.py)."""
        if not stream:
            return None

        def send_result(index: int, bundle: protocol.ResultBundle) -> None:
            self.send(protocol.RunResult(req_id, index, bundle))

        return send_result

    def _exec(self, msg: protocol.ExecRequest) -> protocol.RunReply:
        """One run, in one of three modes: a wasm module, a one-shot
        interpreter, or a cell's persistent interpreter."""
        started = time.perf_counter()
        run = _RunParams(
            timeout_s=max(0.01, msg.timeout_ms / 1000),
            memory=int(msg.memory_mb or self.cfg["memory_mb"]) << 20,
            cap=int(self.cfg["output_cap_bytes"]),
            sink=self._sink(msg.req_id, msg.stream),
            ctx=context.RunContext(governor=None, tenant_id=msg.tenant_id, cell_id=msg.cell_id or "",  # type: ignore[arg-type]
                                   quota_left=msg.quota_left, files_left=msg.files_left,
                                   result_cap=int(self.cfg.get("result_cap_bytes", 8 << 20)),
                                   results_cap=int(self.cfg.get("results_cap_bytes", 16 << 20)),
                                   on_result=self._result_sink(msg.req_id, msg.stream)),
        )
        if not templates.get(msg.template).interpreter:
            outcome, usage = self._exec_module(msg, run)
        elif msg.cell_id is None:
            outcome, usage = self._exec_once(msg, run)
        else:
            outcome, usage = self._exec_in_cell(msg, msg.cell_id, run)
        guest_ms = (time.perf_counter() - started) * 1000
        if run.ctx.on_result is not None:
            outcome.results = []  # each was sent as it was shown (RunResult): the web process lists them
        return protocol.RunReply(msg.req_id, outcome=protocol.RunOutcome(**outcome.to_wire()), guest_ms=guest_ms,
                                 volume_usage=usage)

    def _exec_module(self, msg: protocol.ExecRequest, run: _RunParams) -> tuple[Any, protocol.VolumeUsage | None]:
        """A raw wasm module: compiled (cached), run once against the cell's volume or a scratch one."""
        # T-LIC-2: the Pro features the web process found in the license in
        # force for this run (never anything the guest sent); unknown names drop out.
        features = frozenset(msg.features) & frozenset(PRO_FUNCTIONS)
        module = self.modules.compile(msg.code, msg.is_text, int(self.cfg["module_max_bytes"]), features)
        volume = msg.volume
        tmp = None
        if not volume:
            tmp = tempfile.mkdtemp(dir=self.pool_root)
            volume = tmp
        ctx = run.ctx
        try:
            with Volume(volume) as vol:
                ctx.volume = vol
                grant_pro_resources(ctx, features, self.weights, self.mcp)
                if msg.egress is not None:
                    ctx.egress = egress_policy(msg.egress)  # for the air-gap answer only: the supervisor fetches
                # host_fetch / host_mcp_call go to the supervisor (T-ESCAPE-3)
                ctx.broker = self.broker.for_run(msg.req_id)
                with self._watch(msg, volume, lambda: ctx.governor) as watch:
                    outcome = self.modules.run(module, volume, ctx, run.timeout_s, run.memory, run.cap, run.sink, msg.stdin)
                _note_watch(outcome, watch)
        finally:
            if tmp:
                _discard(tmp)  # T-DOS-1: never lets a cleanup failure replace the run's result
        return outcome, None if tmp else _volume_usage(volume, msg)

    def _exec_once(self, msg: protocol.ExecRequest, run: _RunParams) -> tuple[Any, protocol.VolumeUsage | None]:
        """A one-shot run: a warm session and its scratch volume, then discarded."""
        envs = msg.envs or None
        warm = self._take_once(msg.template, run.memory, envs) if not msg.stdin else None
        if warm is None:
            path = str(self.pool_root / uuid.uuid4().hex)
            os.mkdir(path, 0o700)
            session = self._new_session(msg.template, path, run.memory, envs, msg.stdin)
        else:
            session, path = warm
        try:
            with self._watch(msg, path, _governor_of(run.ctx, session)) as watch:
                outcome = run_prepared(session, msg, run, None, kept=False)
        finally:
            session.close()
            _discard(path)  # T-DOS-1: a deep scratch tree never turns a run into a 500
            scratch.remove_tmp_dir(path)
        outcome.session_alive = False
        _note_watch(outcome, watch)
        return outcome, None

    def _exec_in_cell(self, msg: protocol.ExecRequest, cell_id: str, run: _RunParams) -> tuple[Any, protocol.VolumeUsage | None]:
        """A run in the cell's own interpreter, started afresh if it is gone."""
        if not msg.volume:
            raise ValueError("a cell run needs the cell's volume")
        existing = self.sessions.get(cell_id)
        restarted = restored = False
        python = "python" in templates.get(msg.template).languages
        if existing is not None and existing.alive:
            session = existing
        else:
            if existing is not None:
                existing.close()
            os.makedirs(msg.volume, mode=0o700, exist_ok=True)
            path = self._snapshot_path(cell_id)
            # A paused cell (or one captured before its worker was lost) goes on
            # from its snapshot, even when the request was built before the pause.
            if python and (msg.restore or (existing is None and path is not None and os.path.lexists(path))):
                pending = cell_id in self.pending_rollback and not msg.restore  # the last answer said rolled_back
                self.pending_rollback.discard(cell_id)
                restored_session = self._restore(msg.template, cell_id, msg.volume, run.memory, msg.envs or None)
                if isinstance(restored_session, protocol.ErrorReply):
                    self.current_capture.discard(cell_id)
                    raise _Refused(restored_session)
                session, restored = restored_session, not pending
                # T-IMAGE-2: the file stays, the session's state: a crash in this run rolls back to it.
                self.current_capture.add(cell_id)
            else:
                session = self._new_session(msg.template, msg.volume, run.memory, msg.envs or None)
                restarted = msg.known_session
            self.sessions[cell_id] = session
        with self._lock:
            flight = self.in_flight.get(cell_id)
        began = time.monotonic()
        with self._watch(msg, msg.volume, _governor_of(run.ctx, session)) as watch:
            outcome = run_prepared(session, msg, run, flight)
        cancelled = flight is not None and flight.cancelled and outcome.status == "killed"
        if not outcome.session_alive:
            session.close()
            self.sessions.pop(cell_id, None)
            outcome.note = "the interpreter was stopped; the next run in this cell starts a fresh one (files are kept)"
            if python and msg.persistent and not cancelled:
                self._roll_back(msg, cell_id, run, outcome, run.timeout_s - (time.monotonic() - began))
        else:
            self.current_capture.discard(cell_id)  # the run may have changed its state: the capture is behind
        if cancelled:
            outcome.cancelled = True
            outcome.note = "the run was stopped: its cell was deleted while it ran"
        _note_watch(outcome, watch)
        outcome.restarted = restarted
        outcome.restored = restored
        if not msg.persistent and cell_id in self.sessions:
            self.sessions.pop(cell_id).close()
        return outcome, _volume_usage(msg.volume, msg)

    # -- snapshots: fork, capture, restore (T-IMAGE-2) -------------------------
    def _snapshot_path(self, cell_id: str) -> Path | None:
        root = self.cfg.get("snapshots_dir")
        if not root or self.tenant is None or not self.snapshot_key:
            return None
        return snapshot_file.path_for(str(root), self.tenant, cell_id)

    def _restore(self, template: str, cell_id: str, volume: str, memory: int,
                 envs: dict[str, str] | None) -> Session | protocol.ErrorReply:
        """A new session of ``cell_id`` from its snapshot file. The file is kept:
        it is the new session's state, what a crash in its next run rolls back
        to, until a capture replaces it (or a run that kills the interpreter
        after others deletes it as behind, T-IMAGE-2). A file that fails its
        check is removed, and refused (409)."""
        path = self._snapshot_path(cell_id)
        if path is None:
            return protocol.ErrorReply(0, 409, "cell_lost", "this node keeps no snapshots; the cell's variables are gone")
        assert self.tenant is not None
        try:
            image_key, state = snapshot_file.read(path, self.tenant, cell_id, self.snapshot_key, memory)
        except FileNotFoundError:
            return protocol.ErrorReply(0, 409, "cell_lost", "no snapshot of this cell exists; its variables are gone, "
                                       "its files are kept. The next run starts a fresh interpreter.")
        except snapshot_file.SnapshotRefused as e:
            _unlink(path)
            return protocol.ErrorReply(0, 409, "snapshot_invalid",
                                       f"the cell's snapshot was refused and discarded ({e}); its variables are gone, "
                                       "its files are kept. The next run starts a fresh interpreter.")
        loaded = self.runtimes.get(template)
        if loaded.image is None or loaded.image.key != image_key:
            _unlink(path)
            return protocol.ErrorReply(0, 409, "snapshot_stale",
                                       "the cell's snapshot was taken with another Python image and was discarded; "
                                       "its variables are gone, its files are kept.")
        try:
            session: Session = self.session_classes[template](loaded, volume, memory, envs, self.fifo_dir,
                                                              restore=state)
        except (guest_state.StateError, RuntimeError, wasmtime.WasmtimeError) as e:
            _unlink(path)
            return protocol.ErrorReply(0, 409, "snapshot_invalid",
                                       f"the cell's snapshot could not be restored and was discarded: {str(e)[:200]}")
        return session

    def _roll_back(self, msg: protocol.ExecRequest, cell_id: str, run: _RunParams, outcome: Any, left_s: float) -> None:
        """The run killed the cell's interpreter (trap, deadline, memory): go
        back to the capture taken before it when that capture is current, and
        say so in the answer. A capture that is behind (runs since) is removed,
        so that no later run silently brings back older variables (T-IMAGE-2).
        The restore is done now when it fits in what is left of the run's time
        plus half the supervisor's grace (``left_s``: time left), else by the
        cell's next run; either way this answer says ``rolled_back``."""
        path = self._snapshot_path(cell_id)
        current = cell_id in self.current_capture
        self.current_capture.discard(cell_id)
        if path is None:
            return
        if not current:
            _unlink(path)
            outcome.note = ("the interpreter was stopped and no capture of this cell from before this run was available "
                            "(a cell is captured once it has been idle for SYNAPSE_CELL_CAPTURE_IDLE_S after a run); "
                            "the next run starts a fresh interpreter (files are kept)")
            return
        assert msg.volume is not None
        outcome.note = ("the interpreter was stopped; the cell was rolled back to its capture from before this run: "
                        "its variables from before the run are kept, this run's changes to them are gone, its files "
                        "are as the run left them")
        try:
            size = os.lstat(path).st_size
        except OSError:
            size = 0
        grace_s = int(self.cfg.get("kill_grace_ms", 1000)) / 1000
        if size / RESTORE_BYTES_PER_S >= left_s + grace_s / 2:
            self.pending_rollback.add(cell_id)  # the next run restores it, keeping the file
            self.current_capture.add(cell_id)
            outcome.rolled_back = True
            outcome.stderr = _swap_last(outcome.stderr, CRASH_LOST, CRASH_ROLLED_BACK)
            return
        restored = self._restore(msg.template, cell_id, msg.volume, run.memory, msg.envs or None)
        if isinstance(restored, protocol.ErrorReply):
            outcome.note = (f"the interpreter was stopped and the cell could not be rolled back ({restored.message}); "
                            "the next run starts a fresh interpreter (files are kept)")[:4000]
            return
        self.sessions[cell_id] = restored
        self.current_capture.add(cell_id)  # the new session is the file's state
        outcome.session_alive = True
        outcome.rolled_back = True
        outcome.stderr = _swap_last(outcome.stderr, CRASH_LOST, CRASH_ROLLED_BACK)

    def _live_python(self, cell_id: str) -> Any:
        session = self.sessions.get(cell_id)
        if session is None or not session.alive or not hasattr(session, "snapshot") \
                or not getattr(session, "from_image", False):
            return None
        return session

    def _capture(self, msg: protocol.CaptureRequest) -> Any:
        """Write the state of an idle cell to its snapshot file (the supervisor
        holds the cell's lock: no run is in it)."""
        session = self._live_python(msg.cell_id)
        path = self._snapshot_path(msg.cell_id)
        if session is None or path is None:
            return protocol.ErrorReply(msg.req_id, 409, "not_capturable",
                                       "this cell has no Python interpreter here that can be captured")
        assert self.tenant is not None
        image = self.runtimes.get(self._template_of(session)).image
        if image is None:
            return protocol.ErrorReply(msg.req_id, 409, "not_capturable", "no Python image")
        if msg.cell_id in self.current_capture and os.path.isfile(path):
            # No run since its last capture (an idle capture, most often): the
            # file already is this state. A stop with hundreds of long-idle
            # cells writes nothing again.
            if msg.release:
                self.sessions.pop(msg.cell_id, None)
                session.close()
            return protocol.OkReply(msg.req_id)
        # Only the pages that differ from the image: an idle cell's snapshot is its own few MB.
        # Views of the idle cell's memory (no copy): written out before it runs again (its lock is held).
        state = session.snapshot_diff(self._image_pages(image), copy=False)
        snapshot_file.write(path, state, image.key, self.tenant, msg.cell_id, self.snapshot_key)
        del state
        self.current_capture.add(msg.cell_id)
        if msg.release:  # paused: the next run restores it from the file
            self.sessions.pop(msg.cell_id, None)
            session.close()
        return protocol.OkReply(msg.req_id)

    def _image_pages(self, image: Any) -> memoryview:
        """The memory of a fresh instance of the image, made once per image and
        kept (never run, never written: its pages stay the image's, shared
        copy-on-write with every cell started from it)."""
        with self._lock:
            known = self._base_pages.get(image.key)
        if known is not None:
            return known[2]
        store = wasmtime.Store(self.runtimes.engine)
        store.set_wasi(wasmtime.WasiConfig())  # nothing runs: instantiation only lays out the image's memory
        instance = on_guest_stack(lambda: image.pre.instantiate(store))
        memory = instance.exports(store)["memory"]
        assert isinstance(memory, wasmtime.Memory)
        view = guest_state.memory_view(memory, store)  # only read (memcmp), never written
        with self._lock:
            self._base_pages.setdefault(image.key, (store, instance, view))
            return self._base_pages[image.key][2]

    def _template_of(self, session: Any) -> str:
        for name, cls in self.session_classes.items():
            if type(session) is cls:
                return name
        raise ValueError("unknown session class")

    def _fork(self, msg: protocol.ForkRequest) -> Any:
        """A new cell from the state of ``msg.cell_id``: its files copied within
        the tenant's quota, its interpreter captured and restored into a new
        session (no file in between)."""
        if self.tenant is None:
            return protocol.ErrorReply(msg.req_id, 409, "fork_unsupported", "this worker is not bound")
        memory = int(msg.memory_mb or self.cfg["memory_mb"]) << 20
        pending = msg.cell_id in self.pending_rollback and not msg.restore
        if self._live_python(msg.cell_id) is None and (msg.restore or pending):
            self.pending_rollback.discard(msg.cell_id)
            restored = self._restore(msg.template, msg.cell_id, msg.volume, memory, msg.envs or None)
            if isinstance(restored, protocol.ErrorReply):
                self.current_capture.discard(msg.cell_id)
                return dataclasses.replace(restored, req_id=msg.req_id)
            self.sessions[msg.cell_id] = restored
            self.current_capture.add(msg.cell_id)  # the file stays the session's state (T-IMAGE-2)
        source = self._live_python(msg.cell_id)
        if source is None:
            return protocol.ErrorReply(msg.req_id, 409, "fork_unsupported",
                                       "this cell has no live Python interpreter started from the image to fork")
        tenant_dir = Path(msg.volume).parent
        if Path(msg.new_volume).parent != tenant_dir or tenant_dir.name != self.tenant:
            return protocol.ErrorReply(msg.req_id, 403, "wrong_tenant", "a fork stays in its tenant")
        new_tmp = scratch.tmp_dir_for(msg.new_volume)
        made: list[tuple[Path, str]] = []
        try:
            # T-DISK-1: both copies together within what the tenant may still add.
            bytes_left, entries_left = msg.volume_limit.bytes, msg.volume_limit.entries
            for src_dir, dst in ((tenant_dir, Path(msg.new_volume)), (scratch.tmp_dir_for(msg.volume).parent, new_tmp)):
                create_volume_in(dst.parent, dst.name)
                made.append((dst.parent, dst.name))
                try:
                    src = open_volume_in(src_dir, Path(msg.volume).name)
                except ConfinementError as e:
                    if e.code == "not_found":
                        continue  # a cell without a /tmp yet
                    raise
                with src, open_volume_in(dst.parent, dst.name) as out:
                    usage = copy_volume(src, out, bytes_left, entries_left)
                bytes_left -= usage.bytes
                entries_left -= usage.entries
            loaded = self.runtimes.get(msg.template)
            if loaded.image is None:
                raise RuntimeError("no Python image")
            # Only the pages that differ from the image are written: the rest stay shared (copy-on-write).
            state = source.snapshot_diff(self._image_pages(loaded.image))
            session: Session = self.session_classes[msg.template](loaded, msg.new_volume, memory, msg.envs or None,
                                                                  self.fifo_dir, restore=state)
        except ConfinementError as e:
            for parent, name in made:
                _remove_made(parent, name)
            if e.code == "too_large":
                return protocol.ErrorReply(msg.req_id, 413, "quota_exceeded",
                                           "the fork's copy of the cell's files would cross the tenant's disk quota "
                                           "or file limit")
            return protocol.ErrorReply(msg.req_id, 409, "fork_failed", f"the cell's files could not be copied: {e.message}")
        except BaseException:
            for parent, name in made:
                _remove_made(parent, name)
            raise
        self.sessions[msg.new_cell_id] = session
        return protocol.OkReply(msg.req_id)

    def _cancel(self, msg: protocol.CancelRequest) -> protocol.OkReply:
        """Stop the run in flight in a cell (it is being deleted) and answer once
        it has ended. The stop is repeated until then: a turn that starts after
        one stop arms its own deadline afresh (per-run envs take several turns)."""
        with self._lock:
            flight = self.in_flight.get(msg.cell_id)
        if flight is None:
            return protocol.OkReply(msg.req_id)
        flight.cancelled = True
        give_up = time.monotonic() + CANCEL_WAIT_S  # then the supervisor's own deadline applies (T-DOS-1)
        while True:
            gov = getattr(self.sessions.get(msg.cell_id), "governor", None)
            if gov is not None:
                gov.stop(STOP_CANCEL)
            if flight.done.wait(CANCEL_REPEAT_S) or time.monotonic() > give_up:
                return protocol.OkReply(msg.req_id)

    def _watch(self, msg: protocol.ExecRequest, volume: str, governor: Callable[[], Any]) -> Any:
        """Stop the guest when its volume crosses what the tenant may hold (T-DISK-1)."""
        limit = msg.volume_limit
        if limit is None:
            return contextlib.nullcontext(None)

        def stop() -> None:
            gov = governor()
            if gov is not None:
                gov.stop(STOP_DISK)

        return self.disk_watch.watch(volume, limit.bytes, limit.entries, stop)


class _Refused(Exception):
    """A request answered with an error reply from deep inside its handling."""

    def __init__(self, reply: protocol.ErrorReply) -> None:
        super().__init__(reply.message)
        self.reply = reply


def _swap_last(text: str, old: str, new: str) -> str:
    """``text`` with its last ``old`` (the host's own words, after the guest's output) made ``new``."""
    head, found, tail = text.rpartition(old)
    return f"{head}{new}{tail}" if found else text


def _unlink(path: Path) -> None:
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass


def _remove_made(parent: Path, name: str) -> None:
    try:
        remove_volume_in(parent, name)
    except (ConfinementError, OSError):
        pass


class RequestThreads:
    """The threads requests run on: long-lived, reused, each with the guest's
    stack (stack.py, T-DOS-1), so a run pays neither a thread start nor the
    stack check. Never a queue: a request goes to a thread already waiting
    for one, or to a new thread when none is, so a cancel or a run is never
    held behind another run. At most ``keep`` idle threads stay; more end.

    Each idle thread waits on a hand-off of its own, and a request goes to
    the one that became idle last: its stack and caches are the warmest, and
    only that thread wakes. (One queue shared by all idle threads woke them
    in turn, and a thread could take the request another had just been woken
    for, which then went back to sleep: ~3 context switches more per run,
    measured with runs sent back to back.)"""

    def __init__(self, serve: Callable[[Any], None], keep: int) -> None:
        self._serve = serve
        self._keep = max(1, keep)
        self._lock = threading.Lock()
        self._idle: list[_HandOff] = []  # waiting threads, the last to become idle last; none promised a request

    def submit(self, request: Any) -> None:
        with self._lock:
            waiting = self._idle.pop() if self._idle else None  # that thread is this request's alone
        if waiting is not None:
            waiting.give(request)
        else:
            start_guest_thread(lambda: self._loop(request), "cell-request")

    def _loop(self, request: Any) -> None:
        mine = _HandOff()
        while True:
            self._serve(request)
            with self._lock:
                if len(self._idle) >= self._keep:
                    return
                self._idle.append(mine)
            request = mine.take()


class _HandOff:
    """One idle request thread's slot: ``give`` (once per wait) wakes only that thread."""

    def __init__(self) -> None:
        self._full = threading.Lock()
        self._full.acquire()  # held while empty: ``take`` blocks on it
        self._request: Any = None

    def give(self, request: Any) -> None:
        self._request = request
        self._full.release()

    def take(self) -> Any:
        self._full.acquire()
        request, self._request = self._request, None
        return request


@dataclass
class _InFlight:
    """A cell's run while it is in the worker: whether a cancel asked it to stop."""
    cancelled: bool = False
    done: threading.Event = field(default_factory=threading.Event)


def run_prepared(session: Session, msg: protocol.ExecRequest, run: _RunParams, flight: _InFlight | None,
                 *, kept: bool = True) -> Any:
    """One run in an interpreter session, with the host's preparation of its
    source (code_prep.py: Python's common indentation, Node's imports) and, when
    the request has ``run_envs``, a turn that sets them before and one that puts
    the cell's own back after, so they are seen by this run only. The setting
    turn's time comes out of the run's own limit. ``kept=False``: the session
    is closed after this run (a one-shot), so nothing is put back."""
    python = "python" in templates.get(msg.template).languages
    code = code_prep.dedent_python(msg.code) if python else code_prep.node_imports(msg.code)
    language = "python" if python else "javascript"
    if flight is not None and flight.cancelled:
        return _killed(session)
    if not msg.run_envs:
        return session.run(code, run.timeout_s, run.cap, run.sink, run.ctx)
    started = time.monotonic()
    setup = session.run(code_prep.env_set(language, msg.run_envs), min(ENV_TURN_S, max(0.05, run.timeout_s / 4)),
                        1 << 16, None, None)
    if flight is not None and flight.cancelled:
        return _killed(session)
    if setup.status != "ok" or not session.alive:
        setup.note = "the run's envs could not be set; the code did not run"
        setup.session_alive = session.alive
        return setup
    left = max(0.01, run.timeout_s - (time.monotonic() - started))
    outcome = session.run(code, left, run.cap, run.sink, run.ctx)
    if kept and session.alive and not (flight is not None and flight.cancelled):
        restore = session.run(code_prep.env_restore(language), ENV_RESTORE_S, 1 << 16, None, None)
        if restore.status != "ok" or not session.alive:
            outcome.session_alive = False  # the cell's environment is unknown now: the caller drops the session
    return outcome


def _killed(session: Session) -> Outcome:
    return Outcome(NO_EXIT, "killed", "", "", False, session_alive=session.alive)


@dataclass
class _RunParams:
    """What every run mode needs, worked out once from the request."""
    timeout_s: float
    memory: int
    cap: int
    sink: Any
    ctx: context.RunContext


def session_class(template: str) -> Any:
    """The interpreter session class the registry names for ``template``."""
    ref = templates.get(template).session
    if ref is None:
        raise ValueError(f"template {template!r} has no interpreter session")
    module_name, _, class_name = ref.partition(":")
    return getattr(importlib.import_module(module_name), class_name)


def grant_pro_resources(ctx: context.RunContext, features: frozenset[str], weights: Any, mcp: Any) -> None:
    """T-LIC-2: each Pro host function gets its resource only when the license grants its feature.

    The import check already refused modules that use an ungranted function;
    this keeps the resource itself out of reach as well (defence in depth).
    """
    ctx.weights = weights if "load_weights" in features else None
    ctx.mcp = mcp if "host_mcp_call" in features else None


def _registry_hashes(table: dict[str, list[str]]) -> Any:
    """Hashes the verified trust registry lists per template, as the
    supervisor read them (a worker never opens mirror/: T-ESCAPE-1)."""
    trusted = {str(k): {str(h) for h in v} for k, v in table.items()}
    return lambda template: set(trusted.get(template, set()))


def _mirror_hashes(mirror_dir: str | None) -> Any:
    """The same, read from the registry directly (an in-process Worker, as tests build one)."""
    if not mirror_dir:
        return None

    def lookup(template: str) -> set[str]:
        try:
            from mirror.registry import Mirror  # start-up: python-tuf loads only when a runtime misses its pin

            return set(Mirror(Path(mirror_dir)).trusted_template_hashes().get(template, set()))
        except Exception:
            return set()  # an unverifiable registry trusts nothing

    return lookup


def _open_weights(path: str | None) -> Any:
    """The operator's read-only weights directory, if present (T-PRO-1)."""
    if not path or not os.path.isdir(path):
        return None
    try:
        return Volume(path)
    except (ConfinementError, OSError):
        return None


class _BrokeredMcp:
    """Stands for the node's MCP client in a worker: the calls go to the supervisor."""

    def __repr__(self) -> str:
        return "<MCP through the supervisor>"


BROKERED_MCP = _BrokeredMcp()


def _volume_usage(path: str, msg: protocol.ExecRequest) -> protocol.VolumeUsage:
    """Bytes and entries in a cell's volume after a run (T-DISK-1); a walk that
    fails is reported as such and the web process counts it as over quota."""
    bound = msg.volume_limit.entries if msg.volume_limit is not None else None
    try:
        with Volume(path, resolver="walk") as vol:  # a walk by fds: no guest path is resolved, no openat2 probe
            usage = vol.usage(max_entries=None if bound is None else bound + 1)
        tmp = scratch.tmp_usage_after_run(path, None if bound is None else bound + 1)  # its /tmp counts too (scratch.py)
    except (ConfinementError, OSError):
        return protocol.VolumeUsage(measured=False)
    both = scratch.with_tmp(usage, tmp)
    return protocol.VolumeUsage(both.bytes, both.entries, both.complete)


def _governor_of(ctx: context.RunContext, session: Any) -> Callable[[], Any]:
    """The governor driving this run: Python sessions and modules put it in the
    run context; a JavaScript session keeps its own."""
    return lambda: ctx.governor or getattr(session, "governor", None)


def _note_watch(outcome: Any, watch: Any) -> None:
    reason = getattr(watch, "tripped", None)
    if reason is None:
        return
    outcome.note = ("the run was stopped: its volume crossed the tenant's disk quota or file limit while it ran"
                    if reason != "unmeasured" else "the run was stopped: its volume could not be measured while it ran")
    outcome.denials.append({"threat": "T-DISK-1", "function": "wasi", "reason": reason})


def _discard(path: str | Path) -> None:
    """Remove a scratch or pool directory the guest may have filled; a failure
    is left for the next worker start (``_remove_stale_pools``), never raised."""
    try:
        remove_tree(path)
    except (ConfinementError, OSError):
        pass


def _remove_stale_pools(own: Path) -> None:
    """Pool directories of earlier workers in this slot (killed at a deadline,
    or a crashed node) hold guest scratch trees nobody else removes."""
    prefix = own.name.split("-", 1)[0] + "-"
    try:
        names = [e.name for e in os.scandir(own.parent) if e.name.startswith(prefix) and e.name != own.name]
    except OSError:
        return
    for name in names:
        _discard(own.parent / name)


def start_confined(conn: Connection, config: dict[str, Any]) -> Worker:
    """Start-up of every pooled worker, in the order the second wall needs:
    drop inherited descriptors, open everything that needs wide access
    (runtimes, module cache, weights, scratch), confine (Landlock + seccomp,
    T-ESCAPE-1/2). No thread is started here: :func:`await_tenant` narrows
    the sandbox to one tenant first (T-TENANT-1). Exits the process if the
    sandbox is required and cannot be applied."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the supervisor decides when we stop
    keep = {conn.fileno()}
    sentinel = os.environ.get(sandbox.KEEP_FD_ENV, "")
    if sentinel.isdigit():
        keep.add(int(sentinel))  # the spawn sentinel: the supervisor's join() relies on it
    sandbox.close_inherited_fds(keep)  # T-ESCAPE-4
    harden_process()
    threading.stack_size(GUEST_THREAD_STACK)  # any thread of a worker may run guest code (stack.py)
    worker = Worker(conn, config, start_threads=False)
    try:
        sandbox.confine(config, worker.scratch_dirs())
    except (sandbox.SandboxError, landlock.RulesError, OSError) as e:
        os.write(2, f"cell worker: cannot apply the worker sandbox: {e}\n".encode())
        os._exit(3)
    return worker


def await_tenant(worker: Worker) -> str:
    """A confined spare: say ready, then wait — one thread, no guest — for the
    supervisor's tenant bind (T-TENANT-1). On it, make the tenant's
    directories, narrow the sandbox to them (a second Landlock layer and the
    final seccomp filter), start threads, and acknowledge. Any other frame, or
    a failure to narrow, ends the process: a worker never serves unbound."""
    worker.send(protocol.Ready(pid=os.getpid()))
    try:
        frame = worker.conn.recv_bytes(MAX_REQUEST_FRAME)
        request = protocol.decode(frame, protocol.TO_SPARE, MAX_REQUEST_FRAME)
    except (EOFError, OSError, protocol.ProtocolError):
        os._exit(0)  # shut down or reclaimed before it was bound
    try:
        worker.prepare_tenant(request.tenant_id)
        sandbox.narrow_to_tenant(worker.cfg, worker.scratch_dirs(), request.tenant_id)
    except (sandbox.SandboxError, landlock.RulesError, OSError) as e:
        os.write(2, f"cell worker: cannot bind to a tenant: {e}\n".encode())
        os._exit(3)
    tenant: str = request.tenant_id
    worker.tenant = tenant
    worker.snapshot_key = request.snapshot_key
    worker.start_threads()
    worker.send(protocol.OkReply(request.req_id))
    return tenant


def worker_main(conn: Connection, config: dict[str, Any]) -> None:
    worker = start_confined(conn, config)
    await_tenant(worker)
    try:
        on_guest_stack(lambda: worker.serve(announce=False, refill_thread=True))
    finally:
        with worker._lock:
            worker._stopping = True
            busy = worker._in_flight > 0 or worker._refilling
        if busy:  # the pipe closed under running requests: never close a Store another thread is driving
            _discard(worker.pool_root)  # guest scratch trees: the iterative, bounded removal (T-DOS-1)
            shutil.rmtree(worker.fifo_dir, ignore_errors=True)
            os._exit(0)
        for session in list(worker.sessions.values()):
            session.close()
        for queue in [*worker.warm.values(), *worker.ready_once.values()]:
            for session, path in queue:
                session.close()
                _discard(path)
                scratch.remove_tmp_dir(path)
        _discard(worker.pool_root)
        try:
            os.rmdir(scratch.tmp_dir_for(str(worker.pool_root / "-")).parent)  # the pool's /tmp root, now empty
        except OSError:
            pass
        shutil.rmtree(worker.fifo_dir, ignore_errors=True)  # the worker's own FIFOs; no guest writes there
        worker.sessions.clear()
        if worker.weights is not None:
            worker.weights.close()
        worker.runtimes.close()
        os._exit(0)  # skip interpreter teardown: live Stores at exit make wasmtime panic
