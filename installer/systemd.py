"""The service unit and the few systemctl calls the installer makes.

systemctl runs only when installing onto the live machine (``--root /``);
under a test root it is never called, so a test cannot start or stop a real
service.
"""
from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

from installer.layout import UNIT_NAME as UNIT_NAME, Layout

DEFAULT_MEMORY_MAX = "6G"


def render_unit(layout: Layout, memory_max: str = DEFAULT_MEMORY_MAX) -> str:
    # ExecStart goes through the `current` symlink, so switching versions (upgrade,
    # rollback) never rewrites the unit and a half-done upgrade never breaks it.
    return f"""\
# Written by the Cell installer; re-running the installer rewrites it.
[Unit]
Description=Cell appliance (untrusted code in WebAssembly sandboxes)
After=network.target
Documentation=file://{layout.prefix}/current/docs/README.md

[Service]
Type=simple
User={layout.user}
Group={layout.user}
Environment=SYNAPSE_ROOT={layout.data_root}
Environment=SYNAPSE_CONFIG_DIR={layout.config_dir}
Environment=PYTHONDONTWRITEBYTECODE=1
ExecStart={layout.prefix}/current/venv/bin/cell serve
ExecReload=/bin/kill -HUP $MAINPID
KillSignal=SIGTERM
# A stop drains (runs in flight finish: up to the 60 s run ceiling plus grace),
# then captures every idle Python cell so it keeps its variables across the
# restart (hundreds of cells: tens of seconds on a busy 2-core node). Killed
# before that ends, the cells not yet captured lose their variables.
TimeoutStopSec=180
Restart=on-failure
RestartSec=5
UMask=0077

# Hardening. The guest is hostile; if it ever escaped the sandbox it should
# land in a process that can write only its data root and reach only IP and
# unix sockets.
NoNewPrivileges=yes
ProtectSystem=strict
ReadWritePaths={layout.data_root}
PrivateTmp=yes
ProtectHome=yes
PrivateDevices=yes
ProtectKernelTunables=yes
ProtectKernelModules=yes
ProtectKernelLogs=yes
ProtectControlGroups=yes
ProtectClock=yes
ProtectHostname=yes
RestrictAddressFamilies=AF_UNIX AF_INET AF_INET6
RestrictNamespaces=yes
RestrictRealtime=yes
RestrictSUIDSGID=yes
LockPersonality=yes
SystemCallArchitectures=native
CapabilityBoundingSet=
AmbientCapabilities=
# The first start may compile the runtimes (~2.5 GB); workers need room on top.
MemoryMax={memory_max}
# MemoryDenyWriteExecute is deliberately absent: wasmtime maps JIT code executable.

[Install]
WantedBy=multi-user.target
"""


def write_if_changed(path: Path, text: str, mode: int = 0o644) -> bool:
    """Atomic write (temp file + rename); False when the file already had this content."""
    if path.is_file() and not path.is_symlink() and path.read_text(encoding="utf-8") == text:
        return False
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW, mode)
    with os.fdopen(fd, "w", encoding="utf-8") as f:
        f.write(text)
    os.replace(tmp, path)
    return True


def systemctl_available() -> bool:
    return shutil.which("systemctl") is not None and Path("/run/systemd/system").is_dir()


def systemctl(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["systemctl", *args], text=True, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)


def is_active() -> bool:
    return systemctl_available() and systemctl("is-active", "--quiet", UNIT_NAME).returncode == 0
