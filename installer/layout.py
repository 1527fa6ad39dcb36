"""Where an install lives, versions on disk, and the atomic ``current`` switch.

All paths written *into* files (the unit, config.toml) are target-system paths
(``/opt/synapse``, ``/var/lib/synapse``); ``--root`` only relocates where the
files land, like DESTDIR, so a test can install into a temporary tree.
"""
from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path

from installer.errors import InstallError

COMPLETE_MARKER = ".complete"
UNIT_NAME = "cell.service"


@dataclass(frozen=True)
class Layout:
    root: Path = Path("/")
    prefix: str = "/opt/synapse"
    data_root: str = "/var/lib/synapse"
    config_dir: str = "/etc/synapse"
    unit_dir: str = "/etc/systemd/system"
    user: str = "synapse"

    def host(self, target: str) -> Path:
        """The path on this machine of a target-system path."""
        return self.root / target.lstrip("/")

    @property
    def is_live(self) -> bool:
        """True only when installing onto this machine itself (root is /)."""
        return self.root.resolve() == Path("/")

    @property
    def prefix_dir(self) -> Path:
        return self.host(self.prefix)

    @property
    def versions(self) -> Path:
        return self.prefix_dir / "versions"

    @property
    def current(self) -> Path:
        return self.prefix_dir / "current"

    @property
    def previous(self) -> Path:
        return self.prefix_dir / "previous"

    @property
    def unit_file(self) -> Path:
        return self.host(self.unit_dir) / UNIT_NAME

    def version_dir(self, version: str) -> Path:
        return self.versions / version

    def venv_bin(self, version: str) -> Path:
        return self.version_dir(version) / "venv" / "bin"


def linked_version(link: Path) -> str | None:
    """The version a ``current``/``previous`` symlink points at, if it is a complete one."""
    if not link.is_symlink():
        return None
    target = os.readlink(link)
    name = Path(target).name
    if not (link.parent / "versions" / name / COMPLETE_MARKER).is_file():
        return None
    return name


def switch_link(link: Path, version: str) -> None:
    """Point ``link`` at versions/<version> atomically: symlink beside it, then rename over it."""
    tmp = link.with_name(f".{link.name}.{os.getpid()}.tmp")
    tmp.unlink(missing_ok=True)
    os.symlink(f"versions/{version}", tmp)
    os.replace(tmp, link)  # rename(2) is atomic: a reader sees the old or the new link, never none


_VERSION = re.compile(r"(\d+(?:\.\d+)*)(?:(a|b|rc)(\d+))?(?:\.post(\d+))?(?:\.dev(\d+))?")
_PRE_RANK = {"a": 0, "b": 1, "rc": 2, None: 3}


def version_key(version: str) -> tuple[tuple[int, ...], int, int, int, int]:
    """A sort key for the PEP 440 subset the project uses (X.Y.Z[aN|bN|rcN][.postN][.devN])."""
    m = _VERSION.fullmatch(version)
    if not m:
        raise InstallError("bad_version", f"cannot compare version {version!r}")
    release = tuple(int(x) for x in m.group(1).split("."))
    while len(release) > 1 and release[-1] == 0:
        release = release[:-1]
    dev = int(m.group(5)) if m.group(5) is not None else -1
    return (release, _PRE_RANK[m.group(2)], int(m.group(3) or 0), int(m.group(4) or -1),
            dev if m.group(5) is not None else 1 << 30)
