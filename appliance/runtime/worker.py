"""A worker process: owns a wasmtime engine, its sessions and a warm pool.

The web process never runs guest code. It sends one request at a time over a
pipe; the worker answers with optional output chunks and one final message.
A worker that overruns a deadline is killed by the supervisor (pool.py) and
replaced; nothing it held survives, by design.
"""
from __future__ import annotations

import collections
import ctypes
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
from dataclasses import dataclass
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

import wasmtime

from appliance.runtime import context, landlock, protocol, sandbox
from appliance.runtime.loader import Runtimes
from appliance.runtime.modules import ModuleRefused, ModuleRunner
from appliance.runtime import templates
from appliance.runtime.templates import RuntimeMissing
from appliance.runtime.sessions import Session

PR_SET_NO_NEW_PRIVS = 38
# A request carries at most a 10 MB module or code body (base64) plus small fields.
MAX_REQUEST_FRAME = 64 << 20


def static_resolver(hosts: dict[str, list[str]]) -> Any:
    """Resolve only from the operator's map; anything else is a resolve error."""
    from appliance.egress import EgressError

    def resolve(host: str, _port: int) -> list[str]:
        found = hosts.get(host.lower().rstrip("."))
        if not found:
            raise EgressError("resolve", f"{host} is not in the egress hosts map")
        return list(found)

    return resolve


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
        hashes = _registry_hashes(config["registry_hashes"]) if "registry_hashes" in config \
            else _mirror_hashes(config.get("mirror_dir"))
        self.runtimes = Runtimes(Path(config["cache_dir"]), registry_hashes=hashes, confining=not start_threads)
        self.untrusted: dict[str, str] = {}
        self.modules = ModuleRunner(self.runtimes.engine, self.runtimes.base_linker)
        self.sessions: dict[str, Session] = {}
        self.pool_root = Path(config["volumes_dir"]) / ".pool" / f"w{config['index']}-{os.getpid()}"
        self.pool_root.mkdir(parents=True, exist_ok=True, mode=0o700)
        self.fifo_dir = tempfile.mkdtemp(prefix="cell-worker-")
        interpreters = [t.name for t in templates.interpreters()]
        self.warm: dict[str, collections.deque[tuple[Any, str]]] = {name: collections.deque() for name in interpreters}
        self.targets = {name: int(config.get("warm", {}).get(name, 0)) for name in interpreters}
        self.preload: dict[str, list[str]] = {k: list(v) for k, v in config.get("preload", {}).items()}
        self.default_memory = int(config["memory_mb"]) << 20
        self.weights = _open_weights(config.get("weights_dir"))
        self.mcp = _open_mcp(config.get("mcp_servers"))
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

    def start_threads(self) -> None:
        self.runtimes.start_ticker()

    def scratch_dirs(self) -> tuple[str, ...]:
        """Directories this worker writes outside the volume set (its FIFOs)."""
        return (self.fifo_dir,)

    # -- messaging (typed frames, no pickle: appliance/runtime/protocol.py) ----
    def send(self, msg: Any) -> None:
        frame = protocol.encode(msg)
        with self._send_lock:
            self.conn.send_bytes(frame)

    def serve(self) -> None:
        self.send(protocol.Ready(pid=os.getpid()))
        while True:
            if not self.conn.poll(0):
                if self._refill_one():
                    continue
            try:
                frame = self.conn.recv_bytes(MAX_REQUEST_FRAME)
            except (EOFError, OSError):
                return
            try:
                request = protocol.decode(frame, protocol.TO_WORKER, MAX_REQUEST_FRAME)
            except protocol.ProtocolError:
                return  # only the supervisor writes here: a bad frame means it is gone or broken
            self.send(self.answer(request))

    def answer(self, request: protocol.Request) -> Any:
        """Handle one request; every failure becomes an error reply."""
        req_id = request.req_id
        try:
            return self.handle(request)
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
    def _new_session(self, template: str, volume: str, memory: int, envs: dict[str, str] | None) -> Session:
        if template in self.untrusted:
            raise ModuleRefused(403, "template_untrusted", self.untrusted[template])
        loaded = self.runtimes.get(template)
        session: Session = self.session_classes[template](loaded, volume, memory, envs, self.fifo_dir)
        return session

    def _refill_one(self) -> bool:
        for template, target in self.targets.items():
            if len(self.warm[template]) < target:
                path = str(self.pool_root / uuid.uuid4().hex)
                os.mkdir(path, 0o700)
                try:
                    session = self._new_session(template, path, self.default_memory, None)
                except Exception:
                    shutil.rmtree(path, ignore_errors=True)
                    self.targets[template] = len(self.warm[template])  # stop retrying a broken runtime
                    return False
                preload = self.preload.get(template) or []
                if preload:
                    # Pay numpy/pandas import time (~2 s CPU, ~45 MiB) before a client asks.
                    session.run(("import " + ", ".join(preload)).encode(), 60.0, 1 << 16, None, None)
                self.warm[template].append((session, path))
                return True
        return False

    def _take_warm(self, template: str, memory: int, envs: dict[str, str] | None) -> tuple[Any, str] | None:
        if memory != self.default_memory or envs or not self.warm.get(template):
            return None
        return self.warm[template].popleft()

    # -- requests --------------------------------------------------------
    def handle(self, request: protocol.Request) -> Any:
        if isinstance(request, protocol.ExecRequest):
            return self._exec(request)
        if isinstance(request, protocol.BindRequest):
            return self._bind(request)
        if isinstance(request, protocol.DropRequest):
            session = self.sessions.pop(request.cell_id, None)
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
                                   quota_left=msg.quota_left),
        )
        if not templates.get(msg.template).interpreter:
            outcome, usage = self._exec_module(msg, run)
        elif msg.cell_id is None:
            outcome, usage = self._exec_once(msg, run)
        else:
            outcome, usage = self._exec_in_cell(msg, msg.cell_id, run)
        guest_ms = (time.perf_counter() - started) * 1000
        return protocol.RunReply(msg.req_id, outcome=protocol.RunOutcome(**outcome.to_wire()), guest_ms=guest_ms,
                                 volume_bytes=usage)

    def _exec_module(self, msg: protocol.ExecRequest, run: _RunParams) -> tuple[Any, int | None]:
        """A raw wasm module: compiled (cached), run once against the cell's volume or a scratch one."""
        from appliance.confine import Volume
        from appliance.policy.egress import EgressPolicy

        module = self.modules.compile(msg.code, msg.is_text, int(self.cfg["module_max_bytes"]), msg.pro)
        volume = msg.volume
        tmp = None
        if not volume:
            tmp = tempfile.mkdtemp(dir=self.pool_root)
            volume = tmp
        ctx = run.ctx
        try:
            with Volume(volume) as vol:
                ctx.volume = vol
                if msg.pro:  # Pro host functions see their resources only under a Pro license
                    ctx.weights, ctx.mcp = self.weights, self.mcp
                if msg.egress is not None:
                    ctx.egress = EgressPolicy(enabled=msg.egress.enabled, allow_hosts=tuple(msg.egress.allow_hosts))
                    ctx.resolver = static_resolver(msg.egress.hosts) if msg.egress.hosts is not None else None
                outcome = self.modules.run(module, volume, ctx, run.timeout_s, run.memory, run.cap, run.sink, msg.stdin)
                usage = vol.usage_bytes() if not tmp else None
        finally:
            if tmp:
                shutil.rmtree(tmp, ignore_errors=True)
        return outcome, usage

    def _exec_once(self, msg: protocol.ExecRequest, run: _RunParams) -> tuple[Any, int | None]:
        """A one-shot run: a warm session and its scratch volume, then discarded."""
        envs = msg.envs or None
        warm = self._take_warm(msg.template, run.memory, envs) if not msg.stdin else None
        if warm is None:
            path = str(self.pool_root / uuid.uuid4().hex)
            os.mkdir(path, 0o700)
            session = self._new_session(msg.template, path, run.memory, envs)
        else:
            session, path = warm
        try:
            outcome = session.run(msg.code, run.timeout_s, run.cap, run.sink, run.ctx)
        finally:
            session.close()
            shutil.rmtree(path, ignore_errors=True)
        outcome.session_alive = False
        return outcome, None

    def _exec_in_cell(self, msg: protocol.ExecRequest, cell_id: str, run: _RunParams) -> tuple[Any, int | None]:
        """A run in the cell's own interpreter, started afresh if it is gone."""
        if not msg.volume:
            raise ValueError("a cell run needs the cell's volume")
        existing = self.sessions.get(cell_id)
        restarted = False
        if existing is not None and existing.alive:
            session = existing
        else:
            if existing is not None:
                existing.close()
            os.makedirs(msg.volume, mode=0o700, exist_ok=True)
            session = self._new_session(msg.template, msg.volume, run.memory, msg.envs or None)
            self.sessions[cell_id] = session
            restarted = msg.known_session
        outcome = session.run(msg.code, run.timeout_s, run.cap, run.sink, run.ctx)
        if not outcome.session_alive:
            session.close()
            self.sessions.pop(cell_id, None)
            outcome.note = "the interpreter was stopped; the next run in this cell starts a fresh one (files are kept)"
        outcome.restarted = restarted
        if not msg.persistent and cell_id in self.sessions:
            self.sessions.pop(cell_id).close()
        return outcome, _volume_usage(msg.volume)


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
            from mirror.registry import Mirror

            return set(Mirror(Path(mirror_dir)).trusted_template_hashes().get(template, set()))
        except Exception:
            return set()  # an unverifiable registry trusts nothing

    return lookup


def _open_weights(path: str | None) -> Any:
    """The operator's read-only weights directory, if present (T-PRO-1)."""
    from appliance.confine import ConfinementError, Volume

    if not path or not os.path.isdir(path):
        return None
    try:
        return Volume(path)
    except (ConfinementError, OSError):
        return None


def _open_mcp(path: str | None) -> Any:
    if not path:
        return None
    from appliance.mcp import McpClient, load_config

    return McpClient(load_config(path))


def _volume_usage(path: str) -> int | None:
    """Bytes in a cell's volume after a run: WASI writes cannot be metered as
    they happen, so quotas are enforced by measuring afterwards (T-DOS-1)."""
    from appliance.confine import ConfinementError, Volume

    try:
        with Volume(path) as vol:
            return vol.usage_bytes()
    except (ConfinementError, OSError):
        return None


def start_confined(conn: Connection, config: dict[str, Any]) -> Worker:
    """Start-up of every pooled worker, in the order the second wall needs:
    drop inherited descriptors, open everything that needs wide access
    (runtimes, module cache, weights, scratch), confine (Landlock + seccomp,
    T-ESCAPE-1/2), and only then start threads. Exits the process if the
    sandbox is required and cannot be applied."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the supervisor decides when we stop
    keep = {conn.fileno()}
    sentinel = os.environ.get(sandbox.KEEP_FD_ENV, "")
    if sentinel.isdigit():
        keep.add(int(sentinel))  # the spawn sentinel: the supervisor's join() relies on it
    sandbox.close_inherited_fds(keep)  # T-ESCAPE-4
    harden_process()
    worker = Worker(conn, config, start_threads=False)
    try:
        sandbox.confine(config, worker.scratch_dirs())
    except (sandbox.SandboxError, landlock.RulesError, OSError) as e:
        os.write(2, f"cell worker: cannot apply the worker sandbox: {e}\n".encode())
        os._exit(3)
    worker.start_threads()
    return worker


def worker_main(conn: Connection, config: dict[str, Any]) -> None:
    worker = start_confined(conn, config)
    try:
        worker.serve()
    finally:
        for session in list(worker.sessions.values()):
            session.close()
        for queue in worker.warm.values():
            for session, path in queue:
                session.close()
                shutil.rmtree(path, ignore_errors=True)
        shutil.rmtree(worker.pool_root, ignore_errors=True)
        shutil.rmtree(worker.fifo_dir, ignore_errors=True)
        worker.sessions.clear()
        if worker.mcp is not None:
            worker.mcp.close()
        if worker.weights is not None:
            worker.weights.close()
        worker.runtimes.close()
        os._exit(0)  # skip interpreter teardown: live Stores at exit make wasmtime panic
