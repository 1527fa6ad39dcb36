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
from typing import Any

import wasmtime

from appliance.runtime import context
from appliance.runtime.loader import Runtimes
from appliance.runtime.modules import ModuleRefused, ModuleRunner
from appliance.runtime.templates import RuntimeMissing
from appliance.runtime.sessions import JsSession, PythonSession

PR_SET_NO_NEW_PRIVS = 38


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
        self._lock = threading.Lock()  # the warm pool and the count of requests in flight
        self._in_flight = 0
        self.runtimes = Runtimes(Path(config["cache_dir"]), registry_hashes=_registry_hashes(config.get("mirror_dir")))
        self.untrusted: dict[str, str] = {}
        self.modules = ModuleRunner(self.runtimes.engine, self.runtimes.base_linker)
        self.sessions: dict[str, PythonSession | JsSession] = {}
        self.pool_root = Path(config["volumes_dir"]) / ".pool" / f"w{config['index']}-{os.getpid()}"
        self.pool_root.mkdir(parents=True, exist_ok=True, mode=0o700)
        self.fifo_dir = tempfile.mkdtemp(prefix="cell-worker-")
        self.warm: dict[str, collections.deque[tuple[Any, str]]] = {"python3": collections.deque(), "javascript": collections.deque()}
        self.targets = {"python3": int(config.get("warm_python", 0)), "javascript": int(config.get("warm_javascript", 0))}
        self.default_memory = int(config["memory_mb"]) << 20
        self.weights = _open_weights(config.get("weights_dir"))
        self.mcp = _open_mcp(config.get("mcp_servers"))
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
            if self.conn.poll(0):
                try:
                    msg = self.conn.recv()
                except (EOFError, OSError):
                    return
                with self._lock:
                    self._in_flight += 1
                threading.Thread(target=self._serve_one, args=(msg,), name="cell-request", daemon=True).start()
                continue
            with self._lock:
                idle = self._in_flight == 0
            if idle and self._refill_one():
                continue
            # Idle and full: sleep until a message (or EOF). Runs in flight:
            # look again soon, so the warm pool refills once they end.
            self.conn.poll(None if idle else 0.05)

    def _serve_one(self, msg: dict[str, Any]) -> None:
        try:
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
            try:
                self.send(reply)
            except (OSError, ValueError):
                pass  # the supervisor closed the pipe: the main loop ends on EOF
        finally:
            with self._lock:
                self._in_flight -= 1

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
                    shutil.rmtree(path, ignore_errors=True)
                    self.targets[template] = len(self.warm[template])  # stop retrying a broken runtime
                    return False
                preload = self.cfg.get("warm_python_preload") or []
                if template == "python3" and preload:
                    # Pay numpy/pandas import time (~2 s CPU, ~45 MiB) before a client asks.
                    session.run(("import " + ", ".join(preload)).encode(), 60.0, 1 << 16, None, None)
                with self._lock:
                    self.warm[template].append((session, path))
                return True
        return False

    def _take_warm(self, template: str, memory: int, envs: dict[str, str] | None) -> tuple[Any, str] | None:
        if memory != self.default_memory or envs:
            return None
        with self._lock:
            queue = self.warm.get(template)
            return queue.popleft() if queue else None

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
                                 quota_left=msg.get("quota_left"))
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
                    outcome = self.modules.run(module, volume, ctx, timeout_s, memory, cap, sink, msg.get("stdin"))
                    usage = vol.usage_bytes() if not tmp else None
            finally:
                if tmp:
                    shutil.rmtree(tmp, ignore_errors=True)
            return self._result(outcome, started, usage)
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
                outcome = session.run(code, timeout_s, cap, sink, ctx)
            finally:
                session.close()
                shutil.rmtree(path, ignore_errors=True)
            outcome.session_alive = False
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
        outcome = session.run(code, timeout_s, cap, sink, ctx)
        if not outcome.session_alive:
            session.close()
            self.sessions.pop(cell_id, None)
            outcome.note = "the interpreter was stopped; the next run in this cell starts a fresh one (files are kept)"
        outcome.restarted = restarted
        if not msg.get("persistent", True) and cell_id in self.sessions:
            self.sessions.pop(cell_id).close()
        return self._result(outcome, started, _volume_usage(msg["volume"]))

    def _result(self, outcome: Any, started: float, volume_bytes: int | None = None) -> dict[str, Any]:
        guest_ms = (time.perf_counter() - started) * 1000
        return {"type": "result", "outcome": outcome.to_wire(), "guest_ms": guest_ms, "volume_bytes": volume_bytes}


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


def _volume_usage(path: str) -> int | None:
    """Bytes in a cell's volume after a run: WASI writes cannot be metered as
    they happen, so quotas are enforced by measuring afterwards (T-DOS-1)."""
    from appliance.confine import ConfinementError, Volume

    try:
        with Volume(path) as vol:
            return vol.usage_bytes()
    except (ConfinementError, OSError):
        return None


def worker_main(conn: Connection, config: dict[str, Any]) -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the supervisor decides when we stop
    harden_process()
    worker = Worker(conn, config)
    try:
        worker.serve()
    finally:
        with worker._lock:
            busy = worker._in_flight > 0
        if busy:  # the pipe closed under running requests: never close a Store another thread is driving
            shutil.rmtree(worker.pool_root, ignore_errors=True)
            shutil.rmtree(worker.fifo_dir, ignore_errors=True)
            os._exit(0)
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
