"""Install, upgrade, roll back and uninstall Cell from a verified bundle.

Every step is idempotent: re-running after a failure redoes only what is not
done. The new version is built beside the old one (``versions/<v>/``) and
``current`` is switched with one rename at the very end, so a failure at any
step leaves the previous install working. Verification comes first and writes
nothing under ``--root`` (threat T-SUPPLY-2): a rejected bundle leaves no trace.
"""
from __future__ import annotations

import contextlib
import ensurepip
import fcntl
import json
import os
import pwd
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator, Mapping

from installer import systemd
from installer.errors import InstallError
from installer.extract import VerifiedBundle, verify_bundle
from installer.layout import COMPLETE_MARKER, Layout, linked_version, switch_link, version_key

Out = Callable[[str], None]
DATA_DIRS = ("sandbox_volumes", "db", "cache", "cache/modules", "keys", "mirror")
PRECOMPILE_NOTE = ("precompiling the templates: the numpy snapshot takes about 2 minutes and about "
                   "2.5 GB of memory the first time on this machine (cached afterwards)")


@dataclass(frozen=True)
class InstallOptions:
    bundle: Path
    layout: Layout
    trusted: Mapping[str, bytes]
    dry_run: bool = False
    skip_precompile: bool = False
    allow_downgrade: bool = False
    start: bool = False
    module_cache: str | None = None  # SYNAPSE_MODULE_CACHE for `cell warm` (tests reuse a shared cache)
    memory_max: str = systemd.DEFAULT_MEMORY_MAX
    workdir: Path | None = None


@dataclass
class InstallResult:
    version: str
    previous: str | None
    timings: dict[str, float] = field(default_factory=dict)


@contextlib.contextmanager
def _locked(layout: Layout) -> Iterator[None]:
    # Two installers at once would race on `current`; the second one waits.
    layout.prefix_dir.mkdir(parents=True, exist_ok=True)
    fd = os.open(layout.prefix_dir / ".lock", os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


def _service_ids(layout: Layout) -> tuple[int, int] | None:
    if not layout.is_live or os.geteuid() != 0:
        return None
    try:
        entry = pwd.getpwnam(layout.user)
    except KeyError:
        return None
    return entry.pw_uid, entry.pw_gid


def _chown_tree(path: Path, ids: tuple[int, int] | None) -> None:
    if ids is None:
        return
    for dirpath, dirnames, filenames in os.walk(path):
        os.chown(dirpath, *ids, follow_symlinks=False)
        for name in dirnames + filenames:
            os.chown(os.path.join(dirpath, name), *ids, follow_symlinks=False)


def plan_lines(bundle: VerifiedBundle | None, opts: InstallOptions, installed: str | None) -> list[str]:
    lay = opts.layout
    version = bundle.manifest.version if bundle else "<from bundle>"
    return [
        f"verify {opts.bundle}: detached Ed25519 signature, tarball sha256, every file's sha256 (T-SUPPLY-2)",
        f"version {version}" + (f" (installed: {installed})" if installed else " (fresh install)"),
        f"system user '{lay.user}'" + ("" if lay.is_live else " — skipped under a test --root"),
        f"data root {lay.data_root}, config {lay.config_dir}, code {lay.prefix}/versions/{version}",
        f"venv + pip install --no-index --find-links <verified wheelhouse> into {lay.prefix}/versions/{version}/venv",
        f"default config {lay.config_dir}/config.toml (kept if present); node key {lay.data_root}/keys/node_ed25519",
        PRECOMPILE_NOTE if not opts.skip_precompile else "precompile: skipped (--skip-precompile)",
        f"systemd unit {lay.unit_dir}/{systemd.UNIT_NAME} (hardened)",
        f"switch {lay.prefix}/current -> versions/{version} atomically; previous version kept for rollback",
        "start the service" if (opts.start and lay.is_live) else "service not started"
        + ("" if lay.is_live else " (never under a test --root)"),
    ]


def install(opts: InstallOptions, out: Out = print) -> InstallResult:
    lay = opts.layout
    installed = linked_version(lay.current)
    out(f"installer: target root {lay.root}" + ("" if lay.is_live else " (test root: no user, no systemctl)"))
    if not opts.skip_precompile and not opts.dry_run:
        out(f"installer: note: {PRECOMPILE_NOTE}")
    timings: dict[str, float] = {}
    work = Path(tempfile.mkdtemp(prefix="cell-install-", dir=opts.workdir))
    try:
        t = time.monotonic()
        out("[verify] checking signature and every hash before anything from the bundle runs")
        bundle = verify_bundle(opts.bundle, opts.trusted, work, extract=not opts.dry_run)
        timings["verify"] = time.monotonic() - t
        m = bundle.manifest
        out(f"[verify] ok: {m.name} {m.version}, {len(m.files)} files, signed by key {bundle.statement.key_id}")
        out("plan:")
        for i, line in enumerate(plan_lines(bundle, opts, installed), 1):
            out(f"  {i:2}. {line}")
        _check_python(m.python)
        _check_version(m.version, installed, opts.allow_downgrade)
        if opts.dry_run:
            out("installer: dry run, nothing changed")
            return InstallResult(m.version, installed, timings)
        assert bundle.tree is not None
        with _locked(lay):
            installed = linked_version(lay.current)
            _check_version(m.version, installed, opts.allow_downgrade)
            _ensure_user(lay, out)
            ids = _service_ids(lay)
            _ensure_dirs(lay, ids, out)
            t = time.monotonic()
            _ensure_version(lay, bundle, out)
            timings["venv"] = time.monotonic() - t
            _ensure_config(lay, out)
            _ensure_node_key(lay, ids, out)
            if not opts.skip_precompile:
                t = time.monotonic()
                _precompile(lay, m.version, opts.module_cache, ids, out)
                timings["precompile"] = time.monotonic() - t
            changed = systemd.write_if_changed(lay.unit_file, systemd.render_unit(lay, opts.memory_max))
            out(f"[unit] {lay.unit_file} {'written' if changed else 'unchanged'}")
            if installed != m.version:
                if installed is not None:
                    switch_link(lay.previous, installed)
                switch_link(lay.current, m.version)
            out(f"[switch] current -> {m.version}" + (f" (previous: {installed})" if installed and installed != m.version else ""))
            _service_after_switch(lay, opts.start, out)
        return InstallResult(m.version, installed if installed != m.version else linked_version(lay.previous), timings)
    finally:
        shutil.rmtree(work, ignore_errors=True)


def _check_python(wanted: str) -> None:
    have = f"{sys.version_info.major}.{sys.version_info.minor}"
    if wanted != have:
        raise InstallError("wrong_python", f"bundle is built for Python {wanted}; this machine runs {have}")


def _check_version(version: str, installed: str | None, allow_downgrade: bool) -> None:
    if installed is None or installed == version:
        return
    if version_key(version) < version_key(installed) and not allow_downgrade:
        raise InstallError("downgrade", f"bundle {version} is older than installed {installed}; "
                           "pass --allow-downgrade to install it anyway (or use `rollback`)")


def _ensure_user(lay: Layout, out: Out) -> None:
    if not lay.is_live or os.geteuid() != 0:
        out(f"[user] skipped: {'test --root' if not lay.is_live else 'not running as root'}")
        return
    try:
        pwd.getpwnam(lay.user)
        out(f"[user] {lay.user} exists")
        return
    except KeyError:
        pass
    nologin = next((p for p in ("/usr/sbin/nologin", "/sbin/nologin") if os.path.exists(p)), "/bin/false")
    subprocess.run(["useradd", "--system", "--user-group", "--no-create-home", "--home-dir", lay.data_root,
                    "--shell", nologin, lay.user], check=True)
    out(f"[user] created system user {lay.user}")


def _ensure_dirs(lay: Layout, ids: tuple[int, int] | None, out: Out) -> None:
    data = lay.host(lay.data_root)
    for sub in ("", *DATA_DIRS):
        path = data / sub if sub else data
        path.mkdir(parents=True, exist_ok=True, mode=0o700)
        os.chmod(path, 0o700)  # README, "Where data lives": private data; mkdir's mode is masked by umask
        if ids:
            os.chown(path, *ids)
    conf = lay.host(lay.config_dir)
    conf.mkdir(parents=True, exist_ok=True, mode=0o750)
    os.chmod(conf, 0o750)
    if ids:
        os.chown(conf, 0, ids[1])  # root writes config; the service group may only read it
    lay.versions.mkdir(parents=True, exist_ok=True, mode=0o755)
    out(f"[dirs] {lay.data_root} (0700), {lay.config_dir} (0750), {lay.prefix}/versions")


def _pip_runner(wheels: Path) -> list[str]:
    """pip from the stdlib's ensurepip wheel (trusted before the bundle), else the verified bundle's own."""
    bundled = Path(ensurepip.__file__).parent / "_bundled"
    candidates = sorted(bundled.glob("pip-*.whl")) or sorted(wheels.glob("pip-*.whl"))
    if not candidates:
        raise InstallError("no_pip", "no pip wheel in ensurepip or in the bundle to install with")
    return [str(candidates[-1]) + "/pip"]


def _ensure_version(lay: Layout, bundle: VerifiedBundle, out: Out) -> None:
    m = bundle.manifest
    vdir = lay.version_dir(m.version)
    if (vdir / COMPLETE_MARKER).is_file():
        out(f"[venv] {m.version} already installed")
        return
    if vdir.exists():
        out(f"[venv] removing an unfinished {m.version} from an interrupted run")
        shutil.rmtree(vdir)
    assert bundle.tree is not None
    vdir.mkdir(parents=True, mode=0o755)
    venv = vdir / "venv"
    # --without-pip: packaging tools stay out of the runtime venv (only what the wheels require).
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True)
    wheels = bundle.tree / "wheels"
    cmd = [str(venv / "bin" / "python"), *_pip_runner(wheels), "install", "--isolated", "--no-index",
           "--find-links", str(wheels), "--only-binary=:all:", "--no-cache-dir", "--disable-pip-version-check",
           "--no-input", "--no-warn-script-location", str(bundle.tree / m.project_wheel)]
    out(f"[venv] pip install --no-index --find-links <verified wheelhouse> {Path(m.project_wheel).name}")
    proc = subprocess.run(cmd, text=True, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=_clean_env())
    if proc.returncode != 0:
        raise InstallError("pip_failed", f"pip install failed; previous install untouched:\n{proc.stdout[-4000:]}")
    for sub in ("docs", "registry"):
        if (bundle.tree / sub).is_dir():
            shutil.copytree(bundle.tree / sub, vdir / sub)
    shutil.copyfile(bundle.tree / "manifest.json", vdir / "manifest.json")
    marker = {"version": m.version, "tarball_sha256": bundle.statement.tarball_sha256,
              "key_id": bundle.statement.key_id, "installed_at": int(time.time())}
    (vdir / COMPLETE_MARKER).write_text(json.dumps(marker, sort_keys=True) + "\n")
    out(f"[venv] {m.version} installed in {lay.prefix}/versions/{m.version}/venv")


def _clean_env() -> dict[str, str]:
    # No PIP_* or PYTHON* settings from the operator's shell reach pip or the app.
    return {k: v for k, v in os.environ.items() if not k.startswith(("PIP_", "PYTHON"))}


DEFAULT_CONFIG = """\
# Cell configuration (README, "Configuration"). Environment variables override these keys.
# Written once by the installer; upgrades never overwrite it.
root = "{data_root}"
host = "127.0.0.1"
port = 8080
egress = "off"
telemetry = "off"
"""


def _ensure_config(lay: Layout, out: Out) -> None:
    path = lay.host(lay.config_dir) / "config.toml"
    if path.exists():
        out(f"[config] {lay.config_dir}/config.toml kept")
        return
    systemd.write_if_changed(path, DEFAULT_CONFIG.format(data_root=lay.data_root), mode=0o640)
    if _service_ids(lay):
        os.chown(path, 0, _service_ids(lay)[1])  # type: ignore[index]
    out(f"[config] wrote default {lay.config_dir}/config.toml")


def _ensure_node_key(lay: Layout, ids: tuple[int, int] | None, out: Out) -> None:
    # Same format as appliance/receipts/nodekey.py: 32-byte seed as 64 hex, mode 0600.
    path = lay.host(lay.data_root) / "keys" / "node_ed25519"
    if path.exists() or path.is_symlink():
        out("[key] node key kept")
        return
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(os.urandom(32).hex())
    if ids:
        os.chown(path, *ids)
    out("[key] created node receipt-signing key (0600)")


def _precompile(lay: Layout, version: str, module_cache: str | None, ids: tuple[int, int] | None, out: Out) -> None:
    env = _clean_env()
    env.update(SYNAPSE_ROOT=str(lay.host(lay.data_root)), SYNAPSE_CONFIG_DIR=str(lay.host(lay.config_dir)),
               PYTHONUNBUFFERED="1")
    env.pop("SYNAPSE_MODULE_CACHE", None)
    if module_cache:
        env["SYNAPSE_MODULE_CACHE"] = module_cache
    out(f"[precompile] {PRECOMPILE_NOTE}")
    proc = subprocess.Popen([str(lay.venv_bin(version) / "cell"), "warm"], env=env, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    assert proc.stdout is not None
    for line in proc.stdout:
        out(f"[precompile] {line.rstrip()}")
    if proc.wait() != 0:
        raise InstallError("precompile_failed", "`cell warm` failed; previous install untouched")
    if ids and not module_cache:
        _chown_tree(lay.host(lay.data_root) / "cache", ids)


def _service_after_switch(lay: Layout, start: bool, out: Out) -> None:
    if not lay.is_live:
        out("[service] not started: never under a test --root")
        return
    if not systemd.systemctl_available():
        out("[service] systemd not running here; start it with your init system")
        return
    systemd.systemctl("daemon-reload")
    if start:
        systemd.systemctl("enable", systemd.UNIT_NAME)
        res = systemd.systemctl("restart", systemd.UNIT_NAME)
        out(f"[service] {'restarted' if res.returncode == 0 else 'FAILED to start: ' + res.stdout.strip()}")
    elif systemd.is_active():
        systemd.systemctl("restart", systemd.UNIT_NAME)
        out("[service] running service restarted on the new version")
    else:
        out(f"[service] installed; start with: systemctl enable --now {systemd.UNIT_NAME}")


def rollback(lay: Layout, out: Out = print) -> tuple[str, str]:
    with _locked(lay):
        current, previous = linked_version(lay.current), linked_version(lay.previous)
        if previous is None or current is None:
            raise InstallError("no_previous", "nothing to roll back to: no complete previous version on disk")
        switch_link(lay.current, previous)
        switch_link(lay.previous, current)
        out(f"[rollback] current -> {previous} (was {current}; kept as previous)")
        if lay.is_live and systemd.is_active():
            systemd.systemctl("restart", systemd.UNIT_NAME)
            out("[rollback] service restarted")
        return previous, current


def uninstall(lay: Layout, purge: bool, out: Out = print) -> None:
    if lay.is_live and systemd.systemctl_available():
        systemd.systemctl("disable", "--now", systemd.UNIT_NAME)
        out("[uninstall] service stopped and disabled")
    lay.unit_file.unlink(missing_ok=True)
    if lay.is_live and systemd.systemctl_available():
        systemd.systemctl("daemon-reload")
    shutil.rmtree(lay.prefix_dir, ignore_errors=True)
    out(f"[uninstall] removed {lay.prefix} and the unit")
    data, conf = lay.host(lay.data_root), lay.host(lay.config_dir)
    if purge:
        shutil.rmtree(data, ignore_errors=True)
        shutil.rmtree(conf, ignore_errors=True)
        out(f"[uninstall] --purge: removed {lay.data_root} and {lay.config_dir}")
    else:
        out(f"[uninstall] kept data {lay.data_root} and config {lay.config_dir} (use --purge to remove)")


def status(lay: Layout) -> dict[str, object]:
    versions = sorted(p.name for p in lay.versions.glob("*") if (p / COMPLETE_MARKER).is_file()) \
        if lay.versions.is_dir() else []
    return {"current": linked_version(lay.current), "previous": linked_version(lay.previous),
            "versions_on_disk": versions, "unit": str(lay.unit_file) if lay.unit_file.exists() else None}
