"""`cell console` hook, and the layering rule: the core never imports the TUI."""
from __future__ import annotations

import argparse
import ast
import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from tui import cli

REPO = Path(__file__).resolve().parents[2]


def _appliance_modules() -> list[str]:
    out = []
    for path in sorted((REPO / "appliance").rglob("*.py")):
        parts = path.relative_to(REPO).with_suffix("").parts
        out.append(".".join(parts[:-1] if parts[-1] == "__init__" else parts))
    return out


def test_appliance_sources_have_no_tui_import_statement() -> None:
    offenders = []
    for path in (REPO / "appliance").rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            names = ([a.name for a in node.names] if isinstance(node, ast.Import)
                     else [node.module or ""] if isinstance(node, ast.ImportFrom) and node.level == 0 else [])
            offenders += [f"{path.relative_to(REPO)}: {n}" for n in names if n == "tui" or n.startswith("tui.")]
    assert offenders == []


def test_importing_every_appliance_module_loads_no_tui_and_no_textual() -> None:
    code = (
        "import importlib, json, sys\n"
        f"for m in {_appliance_modules()!r}:\n"
        "    importlib.import_module(m)\n"
        "print(json.dumps(sorted(k for k in sys.modules if k.split('.')[0] in ('tui', 'textual'))))\n"
    )
    done = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout.strip().splitlines()[-1]) == []


def test_register_adds_console_without_importing_textual() -> None:
    code = ("import argparse, sys\nfrom tui.cli import register\n"
            "p = argparse.ArgumentParser(); register(p.add_subparsers())\n"
            "print('textual' in sys.modules)\n")
    done = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "False"


def test_console_builds_light_services_from_settings(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SYNAPSE_ROOT", str(tmp_path / "root"))
    monkeypatch.setenv("SYNAPSE_CONFIG_DIR", str(tmp_path / "etc"))
    seen: dict[str, Any] = {}

    def fake_run(self: Any) -> None:
        seen["services"] = self.services
        seen["status"] = self.services.status()

    monkeypatch.setattr("tui.app.CellConsole.run", fake_run)
    parser = argparse.ArgumentParser()
    cli.register(parser.add_subparsers())
    args = parser.parse_args(["console", "--media-root", str(tmp_path / "usb")])
    assert args.func(args) == 0
    services = seen["services"]
    assert services._pool is None  # no worker pool in the console process
    assert services.settings.root == tmp_path / "root"
    assert seen["status"]["workers"] == {"configured": services.settings.workers}
    assert services.media_files("license") == []


def test_cell_console_fails_loudly_when_the_console_cannot_import(tmp_path: Path) -> None:
    # A console package that raises on import (a broken install) must not make
    # `cell console` vanish from the CLI: it answers with the reason and exit 1.
    (tmp_path / "tui").mkdir()
    (tmp_path / "tui" / "__init__.py").write_text("")
    (tmp_path / "tui" / "cli.py").write_text("raise ImportError('textual is missing')\n")
    code = "import sys; from appliance.cli import main; sys.exit(main(['console']))"
    env_path = f"{tmp_path}:{REPO}"
    done = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, timeout=60,
                          env={"PYTHONPATH": env_path, "PATH": "/usr/bin:/bin"})
    assert done.returncode == 1, done.stderr
    assert "console could not be loaded" in done.stderr and "textual is missing" in done.stderr
