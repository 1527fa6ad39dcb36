"""The operator's command line: ``cell serve|warm|tenant|receipts|license``."""
from __future__ import annotations

import argparse
import importlib
import logging
import os
import signal
import sys
import threading
import time
from pathlib import Path
from typing import Any

from appliance.config import Settings, settings_for_command
from appliance.datadir import prepare_root
from appliance.errors import ConfigError
from appliance.runtime import templates

DEV_KEY_FILE = "dev-api-key"


log = logging.getLogger("cell.cli")


def settings_from_args(args: argparse.Namespace) -> Settings:
    """The settings a `cell` subcommand runs with (its --dev, --host, --port)."""
    return settings_for_command(dev=bool(getattr(args, "dev", False)), host=getattr(args, "host", None),
                                port=getattr(args, "port", None))


def cmd_serve(args: argparse.Namespace) -> int:
    settings = settings_from_args(args)
    started = time.monotonic()
    print(f"cell: data under {settings.root}; starting {settings.workers} worker(s)", flush=True)
    prepare_root(settings)  # an unsafe data root is refused before any worker starts
    # start-up: only `cell serve` needs Flask, waitress and the worker pool (wasmtime)
    from appliance.runtime.pool import WorkerPool, cache_is_warm

    if not cache_is_warm(settings):
        print("cell: first start on this machine: compiling the guest runtimes "
              "(about 2 minutes and 2.5 GB of memory, once per machine)", flush=True)

    def progress(message: str) -> None:
        print(f"cell: {message}", flush=True)

    # The first workers load and confine themselves while this process loads
    # the rest of the service and opens the listener; /healthz says "starting"
    # and runs wait for them until the first is up. The sandbox check refuses
    # here, before anything is served (T-ESCAPE-1).
    pool = WorkerPool(settings, progress=progress)
    pool.start_in_background()
    try:
        # start-up: loaded while the workers start (see above)
        from appliance.services import build_services, ensure_default_tenant
        from appliance.web.app import create_app
        from appliance.web.server import hang_up_idle, make_server, open_connections, stop_listening, stop_serving
    except BaseException:
        pool.close()
        raise
    services = build_services(settings, progress=progress, pool=pool)
    key = ensure_default_tenant(services)
    key_file = settings.root / DEV_KEY_FILE
    if key is not None and args.dev:
        fd = os.open(key_file, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(key)
    if key is None and args.dev and key_file.is_file():
        key = key_file.read_text().strip()
    services.start_background()
    app = create_app(services)  # holds serve.lock from here on
    orphans = services.cells.sweep_orphan_volumes()  # before any request can create a cell
    if orphans:
        print(f"cell: removed {orphans} volume(s) left by an interrupted create or delete", flush=True)
    # T-DOS-2: bodies are refused by Content-Length and API key before waitress reads them.
    server = make_server(app, services, settings.host, settings.port, threads=settings.http_threads, ident="cell")
    port = server.effective_port
    url = f"http://{settings.host}:{port}"
    print(f"cell: serving on {url} (listening after {time.monotonic() - started:.2f}s)", flush=True)
    if key:
        print(f"cell: API key of tenant 'default': {key}", flush=True)
        print("cell: try it:", flush=True)
        print(f"  curl -s -H 'Authorization: Bearer {key}' -H 'Content-Type: application/json' "
              f"-d '{{\"template\":\"python3\",\"code\":\"print(1+1)\"}}' {url}/v1/execute", flush=True)
    elif not args.dev:
        print("cell: create a tenant and key with: cell tenant add NAME", flush=True)
    stop = threading.Event()

    def drain_then_close() -> None:
        # Stop taking runs, let the running ones finish (up to the longest
        # allowed run plus grace), then close: no answered run loses its receipt.
        services.draining.set()
        limit = time.monotonic() + settings.run_timeout_ceiling_ms / 1000 + settings.kill_grace_ms / 1000 + 1
        # Idle keep-alive connections are closed now, busy ones once answered:
        # an open client connection must not keep the service from stopping.
        hang_up_idle(server)
        next_hang_up = time.monotonic() + 0.25
        while services.inflight() > 0 and time.monotonic() < limit:
            time.sleep(0.05)
            if time.monotonic() >= next_hang_up:
                hang_up_idle(server)
                next_hang_up = time.monotonic() + 0.25
        try:
            # T-IMAGE-2: idle persistent Python cells continue after the restart.
            captured = services.cells.capture_cells()
            if captured:
                print(f"cell: captured {captured} cell(s) to snapshots", flush=True)
        except Exception:
            log.exception("capturing cells at shutdown failed")
        # No new connections; the ones still open get their answers sent (up
        # to a short bound), then everything closes on waitress's own thread
        # and server.run() returns.
        stop_listening(server)
        flush_limit = time.monotonic() + 2
        while open_connections(server) and time.monotonic() < flush_limit:
            hang_up_idle(server)
            time.sleep(0.05)
        stop_serving(server)

    def on_term(signum: int, _frame: Any) -> None:
        if not stop.is_set():
            stop.set()
            print("cell: draining (no new runs; waiting for running ones)", flush=True)
            threading.Thread(target=drain_then_close, name="drain", daemon=True).start()

    signal.signal(signal.SIGTERM, on_term)
    signal.signal(signal.SIGINT, on_term)
    services.settings_loader = lambda: settings_from_args(args)
    # SIGHUP re-reads config.toml/environment (applied by the maintenance loop)
    # and, through the license manager's chained handler, the license file.
    signal.signal(signal.SIGHUP, lambda _s, _f: services.reload_requested.set())
    if services.license is not None:
        services.license.install_sighup_handler()
    start_failed = threading.Event()

    def watch_start() -> None:
        # Fail closed: if a first worker cannot start (no sandbox, a module
        # that fails its integrity check, ...), the service stops, as it did
        # when it waited for them before listening.
        if pool.wait_started():
            print(f"cell: ready: {len(pool.stats()['pids'])} worker(s) up after {time.monotonic() - started:.2f}s",
                  flush=True)
            return
        print(f"cell: a worker did not start ({pool.start_error}); stopping", file=sys.stderr, flush=True)
        start_failed.set()
        on_term(signal.SIGTERM, None)

    threading.Thread(target=watch_start, name="cell-start-watch", daemon=True).start()
    try:
        server.run()
    except (OSError, ValueError):
        if not stop.is_set():
            raise
    finally:
        print("cell: shutting down", flush=True)
        server.task_dispatcher.shutdown(timeout=1)  # its threads are idle once drained
        services.close()
        ops = app.extensions.get("cell_ops")
        if ops is not None:
            ops.close()  # releases serve.lock and the log file
    return 1 if start_failed.is_set() else 0


def cmd_warm(args: argparse.Namespace) -> int:
    from appliance.runtime.loader import Runtimes  # start-up: only `cell warm` needs wasmtime here

    settings = settings_from_args(args)
    settings.cache_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
    rt = Runtimes(settings.cache_dir, progress=lambda m: print(f"cell warm: {m}", flush=True))
    try:
        for template in (t.name for t in templates.with_runtime()):
            t = time.monotonic()
            rt.get(template)
            print(f"cell warm: {template} ready in {time.monotonic() - t:.1f}s", flush=True)
        if not args.no_image:
            from appliance.runtime import images  # the pre-initialised Python image (images.py)

            try:
                images.build(rt, progress=lambda m: print(f"cell warm: {m}", flush=True))
            except (images.ImageError, ValueError, RuntimeError, OSError) as e:  # WasmFormatError is a ValueError
                print(f"cell warm: the python image could not be built ({e}); Python cells start the plain way",
                      file=sys.stderr, flush=True)
                return 1
    finally:
        rt.close()
    return 0


def cmd_tenant(args: argparse.Namespace) -> int:
    # start-up: cells and services load the worker pool (wasmtime), storage loads
    # sqlite_utils; the other `cell` commands must not pay for them
    from appliance.cells import now_ms
    from appliance.services import prepare_root
    from appliance.storage import Store

    settings = settings_from_args(args)
    prepare_root(settings)
    store = Store(settings.db_path)
    try:
        if settings.clustered and args.tenant_cmd in ("add", "revoke"):
            return _cluster_tenant(args, settings, store)
        if args.tenant_cmd == "add":
            tenant, key = store.add_tenant(args.name, now_ms())
            print(f"tenant {tenant.id} ({tenant.name}) created")
            print(f"API key (shown once, store it now): {key}")
        elif args.tenant_cmd == "list":
            for t in store.list_tenants():
                print(f"{t.id}\t{t.name}\t{'revoked' if t.revoked else 'active'}")
        elif args.tenant_cmd == "revoke":
            if not store.revoke_tenant(args.tenant_id):
                print(f"no tenant {args.tenant_id}", file=sys.stderr)
                return 1
            print(f"tenant {args.tenant_id} revoked")
    finally:
        store.close()
    return 0


def _cluster_tenant(args: argparse.Namespace, settings: Settings, store: Any) -> int:
    """`cell tenant add|revoke` on a cluster node: the change goes through etcd (docs/cluster.md)."""
    # start-up: as in cmd_tenant, only this command needs the cluster adapters
    from appliance.cells import now_ms
    from appliance.cluster.node import ClusterUnavailable, add_tenant, revoke_tenant

    try:
        if args.tenant_cmd == "add":
            tenant, key = add_tenant(settings, store, args.name, now_ms())
            print(f"tenant {tenant.id} ({tenant.name}) created for the whole cluster")
            print(f"API key (shown once, store it now): {key}")
            return 0
        if not revoke_tenant(settings, store, args.tenant_id):
            print(f"no tenant {args.tenant_id}", file=sys.stderr)
            return 1
        print(f"tenant {args.tenant_id} revoked on every node")
        return 0
    except ClusterUnavailable as exc:
        print(f"cell tenant {args.tenant_cmd}: {exc}", file=sys.stderr)
        return 1


def build_parser(*, core_only: bool = False) -> argparse.ArgumentParser:
    """The `cell` parser; ``core_only`` leaves out the subcommands that live
    beside the core (start-up: `cell serve` does not load them before its
    workers are spawned)."""
    parser = argparse.ArgumentParser(prog="cell", description="Cell appliance")
    sub = parser.add_subparsers(dest="command", required=True)
    serve = sub.add_parser("serve", help="run the service")
    serve.add_argument("--host")
    serve.add_argument("--port", type=int)
    serve.add_argument("--dev", action="store_true", help="data under ./.synapse, print a ready-to-use key")
    serve.set_defaults(func=cmd_serve)
    warm = sub.add_parser("warm", help="compile the guest runtimes ahead of time")
    warm.add_argument("--dev", action="store_true")
    warm.add_argument("--no-image", action="store_true",
                      help="skip building the pre-initialised Python image (numpy, pandas, matplotlib imported)")
    warm.set_defaults(func=cmd_warm)
    tenant = sub.add_parser("tenant", help="manage tenants and API keys")
    tenant.add_argument("--dev", action="store_true")
    tsub = tenant.add_subparsers(dest="tenant_cmd", required=True)
    add = tsub.add_parser("add")
    add.add_argument("name")
    tsub.add_parser("list")
    rev = tsub.add_parser("revoke")
    rev.add_argument("tenant_id")
    tenant.set_defaults(func=cmd_tenant)
    if core_only:
        return parser
    for module in SUBCOMMANDS:  # part of the appliance: a failure to import is a bug, and shows
        importlib.import_module(module).register(sub)
    try:
        importlib.import_module(CONSOLE).register(sub)
    except ImportError as e:  # the console is optional to the core, but never silently missing
        broken = sub.add_parser("console", help="the operator console (unavailable: see `cell console`)")
        broken.set_defaults(func=lambda _args, why=f"{type(e).__name__}: {e}": _console_unavailable(why))
    return parser


# Subcommands that live beside the core; the console (package ``tui``) plugs in
# here by name only, so nothing in the appliance imports it.
SUBCOMMANDS = ("appliance.status_cli", "appliance.receipts.cli", "appliance.license.cli", "appliance.ops.cli", "mirror.cli",
               "appliance.cluster.cli")
CONSOLE = "tui.cli"


def _console_unavailable(why: str) -> int:
    print(f"cell console: the operator console could not be loaded ({why}); "
          "reinstall the appliance or run `cell doctor`", file=sys.stderr)
    return 1


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    given = sys.argv[1:] if argv is None else argv
    args = build_parser(core_only=given[:1] == ["serve"]).parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except Exception as e:
        # start-up: appliance.datadir is not imported just to name its exception;
        # a command that can raise UnsafeDataDir has already imported it.
        datadir = sys.modules.get("appliance.datadir")
        if not (isinstance(e, ConfigError) or (datadir is not None and isinstance(e, datadir.UnsafeDataDir))):
            raise
        print(f"cell: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
