"""`cell console`: the operator's Textual console.

``register(subparsers)`` adds the command. Textual is imported only when the
console actually runs, so every other ``cell`` command starts as fast as
before and works on a build without Textual. The console opens storage,
the license file and the mirror directly (no worker pool), so it can run
next to ``cell serve``.
"""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from typing import Any

from appliance.config import load_settings
from appliance.errors import ConfigError
from tui.media import DEFAULT_ROOTS


def register(subparsers: Any) -> None:
    parser = subparsers.add_parser("console", help="the operator console (keyboard, 80x24)")
    parser.add_argument("--dev", action="store_true", help="data under ./.synapse, like `cell serve --dev`")
    parser.add_argument("--media-root", action="append", type=Path, default=None, metavar="DIR",
                        help="where removable media are mounted (repeatable; default /media, /mnt, /run/media)")
    parser.set_defaults(func=run_console)


def run_console(args: argparse.Namespace) -> int:
    # layering: `register` runs for every `cell` command and must not load Textual
    # (tui.app); start-up: the adapters open storage and the license subsystem
    from tui.adapters import open_console_services
    from tui.app import CellConsole

    env = dict(os.environ)
    if getattr(args, "dev", False):
        env.setdefault("SYNAPSE_ROOT", ".synapse")
        env.setdefault("SYNAPSE_CONFIG_DIR", str(Path(env["SYNAPSE_ROOT"]) / "etc"))
    settings = load_settings(env)
    settings = settings.with_overrides(root=settings.root.absolute())
    roots = tuple(args.media_root) if args.media_root else DEFAULT_ROOTS
    services = open_console_services(settings, media_roots=roots)
    try:
        CellConsole(services).run()
    finally:
        services.close()
    return 0


def main(argv: list[str] | None = None) -> int:
    """Standalone entry point (``python -m tui.cli``) until `cell` registers the hook."""
    parser = argparse.ArgumentParser(prog="cell")
    register(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(["console", *(sys.argv[1:] if argv is None else argv)])
    try:
        return int(args.func(args))
    except ConfigError as exc:
        print(f"cell: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
