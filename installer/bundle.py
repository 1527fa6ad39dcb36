"""Build the signed offline bundle (vendor side, connected machine).

The bundle holds a wheelhouse (the project's wheel and every dependency, as
wheels only: the air-gapped side never builds anything), the docs, an
optional TUF registry snapshot, and ``manifest.json``. It is reproducible:
sorted entries, fixed mtime/uid/gid/mode in the tar, SOURCE_DATE_EPOCH for the
wheel build, and no clock reading in the manifest.

pip runs as a subprocess of the *build* Python; nothing here is imported into
the appliance's runtime venv.
"""
from __future__ import annotations

import hashlib
import io
import os
import re
import shutil
import subprocess
import sys
import sysconfig
import tarfile
import tempfile
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from installer.errors import InstallError
from installer.keys import load_signing_key
from installer.manifest import (
    MANIFEST_NAME,
    FileEntry,
    build_manifest,
    check_path,
    sha256_bytes,
    sign_statement,
)

DEFAULT_EPOCH = 315532800  # 1980-01-01: the earliest time a zip (wheel) can hold
DOC_FILES = ("README.md", "SECURITY.md")
SDK_DIR = "sdk"  # the client SDK's own distribution, built into wheels/ beside the project wheel
SDK_WHEEL_PREFIX = "cell_sdk-"
Progress = Callable[[str], None]


@dataclass(frozen=True)
class BundleOptions:
    project: Path
    out: Path
    signing_key: Path
    registry: Path | None = None
    python_version: str = f"{sys.version_info.major}.{sys.version_info.minor}"
    platforms: tuple[str, ...] = ()
    find_links: tuple[Path, ...] = ()
    no_index: bool = False
    constraints: Path | None = None
    source_date_epoch: int = DEFAULT_EPOCH
    build_python: str = sys.executable
    extra_wheels: tuple[Path, ...] = field(default=())


@dataclass(frozen=True)
class BuiltBundle:
    tarball: Path
    signature: Path
    manifest: Path
    size: int
    sha256: str


def normalize(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def read_project(project: Path) -> dict[str, object]:
    try:
        doc = tomllib.loads((project / "pyproject.toml").read_text(encoding="utf-8"))
        meta = doc["project"]
        return {"name": str(meta["name"]), "version": str(meta["version"]),
                "dependencies": [str(d) for d in meta.get("dependencies", [])],
                "requires_python": str(meta.get("requires-python", "")),
                "packages": [p.rstrip("*") for p in doc["tool"]["setuptools"]["packages"]["find"]["include"]],
                # Package roots besides the project's own directory (sdk/: the client SDK).
                "roots": [str(w) for w in doc["tool"]["setuptools"]["packages"]["find"].get("where", ["."]) if w != "."]}
    except (OSError, KeyError, TypeError, tomllib.TOMLDecodeError) as exc:
        raise InstallError("bad_project", f"cannot read {project}/pyproject.toml: {exc}") from None


def _pip(opts: BundleOptions, args: list[str], progress: Progress) -> None:
    cmd = [opts.build_python, "-m", "pip", "--disable-pip-version-check", "--no-input", *args]
    for link in opts.find_links:
        cmd += ["--find-links", str(link)]
    if opts.no_index:
        cmd.append("--no-index")
    env = dict(os.environ, SOURCE_DATE_EPOCH=str(opts.source_date_epoch), PYTHONHASHSEED="0")
    progress("$ " + " ".join(cmd[2:]))
    proc = subprocess.run(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    if proc.returncode != 0:
        raise InstallError("pip_failed", f"pip {args[0]} failed:\n{proc.stdout[-4000:]}")


def _copy_project(project: Path, packages: list[str], dest: Path) -> None:
    # A clean copy keeps build/ and *.egg-info out of the checkout and out of the wheel.
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc", "*.egg-info", "build")
    for name in ["pyproject.toml", "setup.cfg", "MANIFEST.in", *DOC_FILES, "LICENSE"]:
        if (project / name).is_file():
            shutil.copy2(project / name, dest / name)
    for pkg in packages:
        if (project / pkg).is_dir():
            shutil.copytree(project / pkg, dest / pkg, ignore=ignore)


def build_sdk_wheel(opts: BundleOptions, wheels: Path, progress: Progress) -> str | None:
    """The client SDK's own wheel (``sdk/``: cell-sdk, no dependencies), for agent
    machines to install from the stick; None when the project has no ``sdk/``."""
    sdk = opts.project / SDK_DIR
    if not (sdk / "pyproject.toml").is_file():
        return None
    before = {p.name for p in wheels.glob("*.whl")}
    with tempfile.TemporaryDirectory(prefix="cell-bundle-sdk-") as src:
        shutil.copytree(sdk, Path(src) / SDK_DIR, ignore=shutil.ignore_patterns("__pycache__", "*.pyc", "*.egg-info", "build"))
        _pip(opts, ["wheel", "--no-deps", "--wheel-dir", str(wheels), str(Path(src) / SDK_DIR)], progress)
    built = sorted({p.name for p in wheels.glob("*.whl")} - before)
    if len(built) != 1 or not built[0].startswith(SDK_WHEEL_PREFIX):
        raise InstallError("pip_failed", f"expected one SDK wheel {SDK_WHEEL_PREFIX}*.whl, got {built}")
    return built[0]


def collect_wheels(opts: BundleOptions, meta: dict[str, object], wheels: Path, progress: Progress) -> str:
    """Fill ``wheels`` with the project wheel and every dependency; return the project wheel's name."""
    with tempfile.TemporaryDirectory(prefix="cell-bundle-src-") as src:
        _copy_project(opts.project, list(meta["packages"]) + list(meta["roots"]), Path(src))  # type: ignore[call-overload]
        _pip(opts, ["wheel", "--no-deps", "--wheel-dir", str(wheels), src], progress)
    prefix = normalize(str(meta["name"])).replace("-", "_") + "-" + str(meta["version"]) + "-"
    project_wheels = [p.name for p in wheels.glob("*.whl") if p.name.lower().startswith(prefix.lower())]
    if len(project_wheels) != 1:
        raise InstallError("pip_failed", f"expected one project wheel {prefix}*.whl, got {project_wheels}")
    deps = list(meta["dependencies"])  # type: ignore[call-overload]
    args = ["download", "--only-binary=:all:", "--dest", str(wheels), "--python-version", opts.python_version]
    for plat in opts.platforms:
        args += ["--platform", plat]
    if opts.platforms:
        args += ["--implementation", "cp", "--abi", "cp" + opts.python_version.replace(".", "")]
    if opts.constraints:
        args += ["--constraint", str(opts.constraints)]
    if deps:
        _pip(opts, args + deps, progress)
    for extra in opts.extra_wheels:
        shutil.copy2(extra, wheels / extra.name)
    sdk_wheel = build_sdk_wheel(opts, wheels, progress)
    if sdk_wheel:
        progress(f"bundle: client SDK wheel {sdk_wheel} (agent machines install it on its own)")
    strays = [p.name for p in wheels.iterdir() if not p.name.endswith(".whl")]
    if strays:
        # An sdist would have to be built on the air-gapped side: refuse it here.
        raise InstallError("not_a_wheel", f"wheelhouse holds non-wheel files: {strays}")
    return project_wheels[0]


def _file_entries(root: Path) -> list[FileEntry]:
    entries = []
    for path in sorted(root.rglob("*")):
        if path.is_symlink():
            raise InstallError("bad_input", f"{path} is a symlink; bundles hold regular files only")
        if not path.is_file():
            continue
        rel = check_path(path.relative_to(root).as_posix())
        digest = hashlib.sha256()
        with open(path, "rb") as f:
            while chunk := f.read(1 << 20):
                digest.update(chunk)
        entries.append(FileEntry(rel, path.stat().st_size, digest.hexdigest()))
    return entries


def _tarinfo(name: str, size: int, epoch: int) -> tarfile.TarInfo:
    # Fixed metadata so the same inputs give the same bytes (reproducibility).
    info = tarfile.TarInfo(name)
    info.size, info.mtime, info.mode = size, epoch, 0o644
    info.uid = info.gid = 0
    info.uname = info.gname = ""
    info.type = tarfile.REGTYPE
    return info


def write_tarball(tree: Path, manifest_bytes: bytes, entries: list[FileEntry], out: Path, epoch: int) -> None:
    with tarfile.open(out, "w", format=tarfile.PAX_FORMAT) as tf:
        # manifest.json first: the verifier binds it to the signature before anything else.
        tf.addfile(_tarinfo(MANIFEST_NAME, len(manifest_bytes), epoch), io.BytesIO(manifest_bytes))
        for entry in sorted(entries, key=lambda e: e.path):
            with open(tree / entry.path, "rb") as f:
                tf.addfile(_tarinfo(entry.path, entry.size, epoch), f)


def pack(tree: Path, out: Path, *, name: str, version: str, python: str, requires_python: str,
         platforms: list[str], epoch: int, project_wheel: str, seed: bytes, key_id: str) -> BuiltBundle:
    """Manifest, tarball and signature for a prepared tree of wheels/, docs/, registry/."""
    entries = _file_entries(tree)
    manifest_bytes = build_manifest(name=name, version=version, python=python, requires_python=requires_python,
                                    platforms=platforms, source_date_epoch=epoch, project_wheel=project_wheel,
                                    files=entries)
    out.mkdir(parents=True, exist_ok=True)
    base = f"{name}-{version}"
    tarball, sig, manifest = out / f"{base}.tar", out / f"{base}.tar.sig", out / f"{base}.manifest.json"
    write_tarball(tree, manifest_bytes, entries, tarball, epoch)
    digest = hashlib.sha256()
    with open(tarball, "rb") as f:
        while chunk := f.read(1 << 20):
            digest.update(chunk)
    size = tarball.stat().st_size
    statement = {"name": name, "version": version, "tarball": tarball.name, "tarball_size": size,
                 "tarball_sha256": digest.hexdigest(), "manifest_sha256": sha256_bytes(manifest_bytes)}
    sig.write_bytes(sign_statement(statement, seed, key_id))
    manifest.write_bytes(manifest_bytes)
    return BuiltBundle(tarball, sig, manifest, size, digest.hexdigest())


def build_bundle(opts: BundleOptions, progress: Progress = print) -> BuiltBundle:
    seed, key_id = load_signing_key(opts.signing_key)
    meta = read_project(opts.project)
    with tempfile.TemporaryDirectory(prefix="cell-bundle-") as tmp:
        tree = Path(tmp)
        (tree / "wheels").mkdir()
        progress(f"bundle: collecting wheels for {meta['name']} {meta['version']} (Python {opts.python_version})")
        project_wheel = collect_wheels(opts, meta, tree / "wheels", progress)
        (tree / "docs").mkdir()
        for doc in DOC_FILES:
            if (opts.project / doc).is_file():
                shutil.copyfile(opts.project / doc, tree / "docs" / doc)
            else:
                progress(f"bundle: warning: {doc} not found in {opts.project}; not included")
        if opts.registry is not None:
            if not opts.registry.is_dir():
                raise InstallError("bad_input", f"registry snapshot {opts.registry} is not a directory")
            shutil.copytree(opts.registry, tree / "registry", symlinks=True)
        platforms = list(opts.platforms) or [f"native:{sysconfig.get_platform()}"]
        built = pack(tree, opts.out, name=str(meta["name"]), version=str(meta["version"]),
                     python=opts.python_version, requires_python=str(meta["requires_python"]),
                     platforms=platforms, epoch=opts.source_date_epoch, project_wheel=f"wheels/{project_wheel}",
                     seed=seed, key_id=key_id)
    progress(f"bundle: wrote {built.tarball} ({built.size / 1e6:.1f} MB, sha256 {built.sha256})")
    progress(f"bundle: signature {built.signature} (key {key_id})")
    return built
