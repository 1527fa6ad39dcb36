"""A worker process: owns a wasmtime engine, its sessions and a warm pool.

The web process never runs guest code. It sends one request at a time over a
pipe; the worker answers with optional output chunks and one final message.
A worker that overruns a deadline is killed by the supervisor (pool.py) and
replaced; nothing it held survives, by design.
"""
from __future__ import annotations

import collections
import contextlib
import ctypes
import os
import resource
import shutil
import signal
import tempfile
import threading
import time
import traceback
import uuid
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any, Callable

import wasmtime

from appliance.quota import VolumeWatch
from appliance.runtime import context
from appliance.runtime.loader import Runtimes
from appliance.runtime.modules import ModuleRefused, ModuleRunner
from appliance.runtime.templates import RuntimeMissing
from appliance.runtime.sessions import JsSession, PythonSession

PR_SET_NO_NEW_PRIVS = 38
STOP_DISK = "disk_limit"  # governor stop reason (reported as status killed, with a T-DISK-1 denial)


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
    def __init__(self, conn: Connection, config: dict[str, Any]) -> None:
        self.conn = conn
        self.cfg = config
        self._send_lock = threading.Lock()
        self.runtimes = Runtimes(Path(config["cache_dir"]), registry_hashes=_registry_hashes(config.get("mirror_dir")))
        self.untrusted: dict[str, str] = {}
        self.modules = ModuleRunner(self.runtimes.engine, self.runtimes.base_linker)
        self.sessions: dict[str, PythonSession | JsSession] = {}
        self.pool_root = Path(config["volumes_dir"]) / ".pool" / f"w{config['index']}-{os.getpid()}"
        _remove_stale_pools(self.pool_root)
        self.pool_root.mkdir(parents=True, exist_ok=True, mode=0o700)
        self.fifo_dir = tempfile.mkdtemp(prefix="cell-worker-")
        self.warm: dict[str, collections.deque[tuple[Any, str]]] = {"python3": collections.deque(), "javascript": collections.deque()}
        self.targets = {"python3": int(config.get("warm_python", 0)), "javascript": int(config.get("warm_javascript", 0))}
        self.default_memory = int(config["memory_mb"]) << 20
        self.weights = _open_weights(config.get("weights_dir"))
        self.mcp = _open_mcp(config.get("mcp_servers"))
        self.disk_watch = VolumeWatch()
        for template in ("python3", "javascript"):
            try:
                self.runtimes.get(template)
            except RuntimeMissing as e:  # that template is refused; the others keep working
                self.untrusted[template] = str(e)
                self.targets[template] = 0

    # -- messaging -------------------------------------------------------
    def send(self, msg: dict[str, Any]) -> None:
        with self._send_lock:
            self.conn.send(msg)

    def serve(self) -> None:
        self.send({"type": "ready", "pid": os.getpid()})
        while True:
            if not self.conn.poll(0):
                if self._refill_one():
                    continue
            try:
                msg = self.conn.recv()
            except (EOFError, OSError):
                return
            try:
                reply = self.handle(msg)
            except ModuleRefused as e:
                reply = {"type": "error", "status": e.status, "code": e.code, "message": e.message}
            except wasmtime.WasmtimeError as e:
                if "exceeds memory limits" in str(e) or "memory minimum size" in str(e):
                    reply = {"type": "error", "status": 400, "code": "memory_too_small",
                             "message": "memory_mb is below what this template needs to start; raise it"}
                else:
                    reply = {"type": "error", "status": 500, "code": "internal", "message": "runtime error"}
            except Exception as e:  # a bug here must not kill the worker's other cells
                reply = {"type": "error", "status": 500, "code": "internal", "message": type(e).__name__, "trace": traceback.format_exc()[-2000:]}
            reply["req_id"] = msg.get("req_id")
            self.send(reply)

    # -- warm pool -------------------------------------------------------
    def _new_session(self, template: str, volume: str, memory: int, envs: dict[str, str] | None) -> PythonSession | JsSession:
        if template in self.untrusted:
            raise ModuleRefused(403, "template_untrusted", self.untrusted[template])
        loaded = self.runtimes.get(template)
        if template == "python3":
            return PythonSession(loaded, volume, memory, envs)
        return JsSession(loaded, volume, memory, envs, self.fifo_dir)

    def _refill_one(self) -> bool:
        for template, target in self.targets.items():
            if len(self.warm[template]) < target:
                path = str(self.pool_root / uuid.uuid4().hex)
                os.mkdir(path, 0o700)
                try:
                    session = self._new_session(template, path, self.default_memory, None)
                except Exception:
                    _discard(path)
                    self.targets[template] = len(self.warm[template])  # stop retrying a broken runtime
                    return False
                preload = self.cfg.get("warm_python_preload") or []
                if template == "python3" and preload:
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
    def handle(self, msg: dict[str, Any]) -> dict[str, Any]:
        op = msg.get("op")
        if op == "bind":
            return self._bind(msg)
        if op == "exec":
            return self._exec(msg)
        if op == "drop":
            session = self.sessions.pop(msg["cell_id"], None)
            if session is not None:
                session.close()
            return {"type": "ok"}
        if op == "stats":
            return {"type": "stats", "sessions": len(self.sessions), "warm": {k: len(v) for k, v in self.warm.items()},
                    "cache_hits": self.runtimes.cache.hits, "cache_misses": self.runtimes.cache.misses}
        if op == "ping":
            return {"type": "pong"}
        return {"type": "error", "status": 400, "code": "bad_op", "message": f"unknown op {op!r}"}

    def _bind(self, msg: dict[str, Any]) -> dict[str, Any]:
        template, volume = msg["template"], msg["volume"]
        memory = int(msg.get("memory_mb") or self.cfg["memory_mb"]) << 20
        envs = msg.get("envs") or None
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
        self.sessions[msg["cell_id"]] = session
        return {"type": "ok", "warm": warm is not None}

    def _sink(self, req_id: Any, stream: bool) -> Any:
        if not stream:
            return None

        def sink(fd: int, data: bytes) -> None:
            try:
                self.send({"type": "chunk", "req_id": req_id, "fd": fd, "data": data})
            except Exception:
                pass

        return sink

    def _exec(self, msg: dict[str, Any]) -> dict[str, Any]:
        template = msg["template"]
        timeout_s = max(0.01, int(msg["timeout_ms"]) / 1000)
        memory = int(msg.get("memory_mb") or self.cfg["memory_mb"]) << 20
        cap = int(self.cfg["output_cap_bytes"])
        sink = self._sink(msg.get("req_id"), bool(msg.get("stream")))
        code: bytes = msg["code"]
        started = time.perf_counter()
        ctx = context.RunContext(governor=None, tenant_id=msg.get("tenant_id", ""), cell_id=msg.get("cell_id") or "",  # type: ignore[arg-type]
                                 quota_left=msg.get("quota_left"), files_left=msg.get("files_left"))
        if template == "wasm":
            from appliance.confine import Volume
            from appliance.policy.egress import EgressPolicy

            module = self.modules.compile(code, bool(msg.get("is_text")), int(self.cfg["module_max_bytes"]), bool(msg.get("pro")))
            volume = msg.get("volume")
            tmp = None
            if not volume:
                tmp = tempfile.mkdtemp(dir=self.pool_root)
                volume = tmp
            try:
                with Volume(volume) as vol:
                    ctx.volume = vol
                    if msg.get("pro"):  # Pro host functions see their resources only under a Pro license
                        ctx.weights, ctx.mcp = self.weights, self.mcp
                    egress = msg.get("egress")
                    if egress:
                        ctx.egress = EgressPolicy(enabled=bool(egress["enabled"]), allow_hosts=tuple(egress["allow_hosts"]))
                        ctx.resolver = static_resolver(egress["hosts"]) if egress.get("hosts") is not None else None
                    with self._watch(msg, volume, lambda: ctx.governor) as watch:
                        outcome = self.modules.run(module, volume, ctx, timeout_s, memory, cap, sink, msg.get("stdin"))
                    _note_watch(outcome, watch)
            finally:
                if tmp:
                    _discard(tmp)  # T-DOS-1: never lets a cleanup failure replace the run's result
            return self._result(outcome, started, None if tmp else _volume_usage(volume, msg))
        cell_id = msg.get("cell_id")
        if cell_id is None:  # one-shot: a warm session and its scratch volume, then discarded
            warm = self._take_warm(template, memory, msg.get("envs")) if not msg.get("stdin") else None
            if warm is None:
                path = str(self.pool_root / uuid.uuid4().hex)
                os.mkdir(path, 0o700)
                session = self._new_session(template, path, memory, msg.get("envs"))
            else:
                session, path = warm
            try:
                with self._watch(msg, path, _governor_of(ctx, session)) as watch:
                    outcome = session.run(code, timeout_s, cap, sink, ctx)
            finally:
                session.close()
                _discard(path)  # T-DOS-1: a deep scratch tree never turns a run into a 500
            outcome.session_alive = False
            _note_watch(outcome, watch)
            return self._result(outcome, started)
        existing = self.sessions.get(cell_id)
        restarted = False
        if existing is not None and existing.alive:
            session = existing
        else:
            if existing is not None:
                existing.close()
            volume = msg["volume"]
            os.makedirs(volume, mode=0o700, exist_ok=True)
            session = self._new_session(template, volume, memory, msg.get("envs"))
            self.sessions[cell_id] = session
            restarted = bool(msg.get("known_session"))
        with self._watch(msg, msg["volume"], _governor_of(ctx, session)) as watch:
            outcome = session.run(code, timeout_s, cap, sink, ctx)
        if not outcome.session_alive:
            session.close()
            self.sessions.pop(cell_id, None)
            outcome.note = "the interpreter was stopped; the next run in this cell starts a fresh one (files are kept)"
        _note_watch(outcome, watch)
        outcome.restarted = restarted
        if not msg.get("persistent", True) and cell_id in self.sessions:
            self.sessions.pop(cell_id).close()
        return self._result(outcome, started, _volume_usage(msg["volume"], msg))

    def _watch(self, msg: dict[str, Any], volume: str, governor: Callable[[], Any]) -> Any:
        """Stop the guest when its volume crosses what the tenant may hold (T-DISK-1)."""
        limit = msg.get("volume_limit") or {}
        max_bytes, max_entries = limit.get("bytes"), limit.get("entries")
        if not isinstance(max_bytes, int) or not isinstance(max_entries, int):
            return contextlib.nullcontext(None)

        def stop() -> None:
            gov = governor()
            if gov is not None:
                gov.stop(STOP_DISK)

        return self.disk_watch.watch(volume, max_bytes, max_entries, stop)

    def _result(self, outcome: Any, started: float, volume_usage: dict[str, object] | None = None) -> dict[str, Any]:
        guest_ms = (time.perf_counter() - started) * 1000
        return {"type": "result", "outcome": outcome.to_wire(), "guest_ms": guest_ms, "volume_usage": volume_usage}


def _registry_hashes(mirror_dir: str | None) -> Any:
    """Hashes the verified trust registry lists per template (read only when a
    runtime does not match its built-in pin)."""
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


def _volume_usage(path: str, msg: dict[str, Any]) -> dict[str, object]:
    """Bytes and entries in a cell's volume after a run (T-DISK-1); a walk that
    fails is reported as such and the web process counts it as over quota."""
    from appliance.confine import ConfinementError, Volume
    from appliance.quota import usage_to_wire

    limit = msg.get("volume_limit") or {}
    bound = limit.get("entries") if isinstance(limit.get("entries"), int) else None
    try:
        with Volume(path) as vol:
            return usage_to_wire(vol.usage(max_entries=None if bound is None else bound + 1))
    except (ConfinementError, OSError):
        return usage_to_wire(None)


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
    from appliance.confine import ConfinementError, remove_tree

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


def worker_main(conn: Connection, config: dict[str, Any]) -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the supervisor decides when we stop
    harden_process()
    worker = Worker(conn, config)
    try:
        worker.serve()
    finally:
        for session in list(worker.sessions.values()):
            session.close()
        for queue in worker.warm.values():
            for session, path in queue:
                session.close()
                _discard(path)
        _discard(worker.pool_root)
        shutil.rmtree(worker.fifo_dir, ignore_errors=True)  # the worker's own FIFOs; no guest writes there
        worker.sessions.clear()
        if worker.mcp is not None:
            worker.mcp.close()
        if worker.weights is not None:
            worker.weights.close()
        worker.runtimes.close()
        os._exit(0)  # skip interpreter teardown: live Stores at exit make wasmtime panic
