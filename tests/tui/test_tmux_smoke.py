"""A real terminal: tmux runs the console at 80x24 next to a real service;
the operator navigates to the license screen, imports a license from the
"USB stick", and the dashboard shows the new tier."""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from datetime import datetime, timedelta, timezone
from pathlib import Path

import pytest

from tests.factories import make_keypair, make_license, make_registry, stamp
from tests.liveserver import REPO, start_server

pytestmark = pytest.mark.slow


def _screen(session: str) -> str:
    return subprocess.run(["tmux", "capture-pane", "-p", "-t", session], capture_output=True, text=True).stdout


def _wait_for(session: str, text: str, timeout: float = 20) -> str:
    deadline = time.monotonic() + timeout
    screen = ""
    while time.monotonic() < deadline:
        screen = _screen(session)
        if text in screen:
            return screen
        time.sleep(0.2)
    raise AssertionError(f"{text!r} never appeared on screen:\n{screen}")


def _keys(session: str, *keys: str) -> None:
    for k in keys:
        subprocess.run(["tmux", "send-keys", "-t", session, k], check=True)
        time.sleep(0.3)


def test_console_in_tmux_imports_a_license_and_the_dashboard_shows_pro(module_cache: None, tmp_path: Path) -> None:
    if shutil.which("tmux") is None:
        pytest.skip("tmux is not installed on this machine")
    root = tmp_path / "root"
    service = start_server(root)  # the real service on the same data root
    media = tmp_path / "media" / "usb"
    media.mkdir(parents=True)
    kp = make_keypair("tmux-smoke")
    now = datetime.now(timezone.utc)
    (media / "license.json").write_bytes(make_license(kp.signing_key, kp.key_id, licensee="Tmux Smoke GmbH",
                                                      issued_at=stamp(now - timedelta(hours=1)),
                                                      not_before=stamp(now - timedelta(hours=1)),
                                                      expires_at=stamp(now + timedelta(days=200))))
    registry = make_registry(tmp_path, mirror_dir=tmp_path / "registry")  # fresh, signed with test keys
    (tmp_path / "registry-root.json").write_bytes(registry.trusted_root)
    session = f"cell-smoke-{os.getpid()}"
    env = (f"SYNAPSE_ROOT={root} SYNAPSE_CONFIG_DIR={root / 'etc'} PYTHONPATH={REPO} TERM=xterm-256color "
           f"{sys.executable} -m tests.tui.tmux_console_app {kp.key_id} {kp.public_key.hex()} {tmp_path / 'media'} "
           f"{tmp_path / 'registry'} {tmp_path / 'registry-root.json'}")
    subprocess.run(["tmux", "new-session", "-d", "-s", session, "-x", "80", "-y", "24", f"cd {REPO} && {env}"], check=True)
    try:
        _wait_for(session, "free tier")
        _keys(session, "3")
        _wait_for(session, "bytes)")
        _keys(session, "Down", "Enter")
        _wait_for(session, "Press i to install")
        _keys(session, "i")
        _wait_for(session, "Install")
        _keys(session, "y")
        _wait_for(session, "Installed")
        _keys(session, "1")
        screen = _wait_for(session, "pro tier")
        assert "Tmux Smoke GmbH" in screen or "pro" in screen
        assert (root / "etc" / "license.json").read_bytes() == (media / "license.json").read_bytes()
    finally:
        subprocess.run(["tmux", "kill-session", "-t", session], capture_output=True)
        service.stop()
