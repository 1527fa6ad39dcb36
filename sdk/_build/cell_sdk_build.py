"""The SDK's build backend (PEP 517): writes the pure-Python wheel with the
standard library alone.

It needs no setuptools or wheel package, so building the SDK (for the offline
bundle, or by hand with ``pip wheel ./sdk``) fetches nothing from an index, and
it is reproducible: entries are sorted and stamped with SOURCE_DATE_EPOCH.
"""
from __future__ import annotations

import base64
import hashlib
import os
import time
import tomllib
import zipfile
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = "cell_sdk"
TAG = "py3-none-any"
EARLIEST_ZIP_TIME = 315532800  # 1980-01-01


def _project() -> dict[str, Any]:
    with open(ROOT / "pyproject.toml", "rb") as f:
        return dict(tomllib.load(f)["project"])


def _dist_name(name: str) -> str:
    return name.replace("-", "_")


def _metadata(project: dict[str, Any]) -> str:
    lines = ["Metadata-Version: 2.1", f"Name: {project['name']}", f"Version: {project['version']}",
             f"Summary: {project['description']}", f"Requires-Python: {project['requires-python']}"]
    readme = ROOT / str(project.get("readme", "README.md"))
    if readme.is_file():
        lines.append("Description-Content-Type: text/markdown")
        return "\n".join(lines) + "\n\n" + readme.read_text(encoding="utf-8")
    return "\n".join(lines) + "\n"


def _files(project: dict[str, Any]) -> list[tuple[str, bytes]]:
    dist_info = f"{_dist_name(project['name'])}-{project['version']}.dist-info"
    out = []
    for path in sorted((ROOT / PACKAGE).rglob("*")):
        if path.is_file() and "__pycache__" not in path.parts and path.suffix in (".py", ".typed"):
            out.append((path.relative_to(ROOT).as_posix(), path.read_bytes()))
    out.append((f"{dist_info}/METADATA", _metadata(project).encode("utf-8")))
    wheel = f"Wheel-Version: 1.0\nGenerator: cell_sdk_build\nRoot-Is-Purelib: true\nTag: {TAG}\n"
    out.append((f"{dist_info}/WHEEL", wheel.encode("ascii")))
    out.append((f"{dist_info}/top_level.txt", f"{PACKAGE}\n".encode("ascii")))
    return out


def _record_line(name: str, data: bytes) -> str:
    digest = base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode("ascii")
    return f"{name},sha256={digest},{len(data)}"


def get_requires_for_build_wheel(config_settings: dict[str, Any] | None = None) -> list[str]:
    return []


def build_wheel(wheel_directory: str, config_settings: dict[str, Any] | None = None,
                metadata_directory: str | None = None) -> str:
    project = _project()
    name = f"{_dist_name(project['name'])}-{project['version']}-{TAG}.whl"
    files = _files(project)
    record = f"{_dist_name(project['name'])}-{project['version']}.dist-info/RECORD"
    lines = [_record_line(n, d) for n, d in files] + [f"{record},,"]
    files.append((record, ("\n".join(lines) + "\n").encode("utf-8")))
    epoch = max(EARLIEST_ZIP_TIME, int(os.environ.get("SOURCE_DATE_EPOCH", EARLIEST_ZIP_TIME)))
    stamp = time.gmtime(epoch)[:6]
    with zipfile.ZipFile(Path(wheel_directory) / name, "w", compression=zipfile.ZIP_DEFLATED) as zf:
        for entry, data in files:
            info = zipfile.ZipInfo(entry, date_time=stamp)
            info.external_attr = 0o644 << 16
            info.compress_type = zipfile.ZIP_DEFLATED
            zf.writestr(info, data)
    return name
