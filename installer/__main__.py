"""``python3 -m installer bundle|verify|install|rollback|uninstall|status``.

This is the only module of the installer that reads the environment
(``CELL_INSTALLER_TRUSTED_KEYS``, ``SYNAPSE_MODULE_CACHE``, ``SOURCE_DATE_EPOCH``).
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

from installer.bundle import DEFAULT_EPOCH, BundleOptions, build_bundle
from installer.errors import InstallerError
from installer.extract import verify_bundle
from installer.install import InstallOptions, install, rollback, status, uninstall
from installer.keys import ENV_OVERRIDE, resolve_trusted_keys
from installer.layout import Layout


def _layout(args: argparse.Namespace) -> Layout:
    return Layout(root=Path(args.root), prefix=args.prefix, data_root=args.data_root,
                  config_dir=args.config_dir, unit_dir=args.unit_dir, user=args.user)


def _trusted(args: argparse.Namespace) -> dict[str, bytes]:
    # The flag wins over the env var; with neither, the embedded production key.
    keys, desc = resolve_trusted_keys(args.trusted_keys or os.environ.get(ENV_OVERRIDE))
    if args.trusted_keys or os.environ.get(ENV_OVERRIDE):
        print(f"installer: WARNING: using {desc}", file=sys.stderr)
    return keys


def cmd_bundle(args: argparse.Namespace) -> int:
    epoch = args.source_date_epoch
    if epoch is None:
        epoch = int(os.environ.get("SOURCE_DATE_EPOCH", DEFAULT_EPOCH))
    opts = BundleOptions(
        project=Path(args.project).resolve(), out=Path(args.out), signing_key=Path(args.signing_key),
        registry=Path(args.registry) if args.registry else None,
        python_version=args.python_version or f"{sys.version_info.major}.{sys.version_info.minor}",
        platforms=tuple(args.platform or ()), find_links=tuple(Path(p).resolve() for p in args.find_links or ()),
        no_index=args.no_index, constraints=Path(args.constraints).resolve() if args.constraints else None,
        source_date_epoch=epoch, build_python=args.build_python or sys.executable)
    t = time.monotonic()
    build_bundle(opts)
    print(f"bundle: done in {time.monotonic() - t:.1f}s")
    return 0


def cmd_verify(args: argparse.Namespace) -> int:
    trusted = _trusted(args)
    with tempfile.TemporaryDirectory(prefix="cell-verify-") as work:
        verified = verify_bundle(Path(args.bundle), trusted, Path(work), extract=False)
    m = verified.manifest
    print(f"verify: OK {m.name} {m.version}: signature by key {verified.statement.key_id}, "
          f"tarball sha256 {verified.statement.tarball_sha256}, {len(m.files)} files hashed")
    return 0


def cmd_install(args: argparse.Namespace) -> int:
    opts = InstallOptions(
        bundle=Path(args.bundle), layout=_layout(args), trusted=_trusted(args), dry_run=args.dry_run,
        skip_precompile=args.skip_precompile, allow_downgrade=args.allow_downgrade, start=args.start,
        module_cache=os.environ.get("SYNAPSE_MODULE_CACHE") or None, memory_max=args.memory_max,
        workdir=Path(args.workdir) if args.workdir else None)
    t = time.monotonic()
    result = install(opts)
    timings = ", ".join(f"{k} {v:.1f}s" for k, v in result.timings.items())
    print(f"installer: {'planned' if args.dry_run else 'installed'} {result.version} "
          f"in {time.monotonic() - t:.1f}s ({timings})")
    return 0


def cmd_rollback(args: argparse.Namespace) -> int:
    rollback(_layout(args))
    return 0


def cmd_uninstall(args: argparse.Namespace) -> int:
    uninstall(_layout(args), args.purge)
    return 0


def cmd_status(args: argparse.Namespace) -> int:
    print(json.dumps(status(_layout(args)), indent=1))
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python3 -m installer", description="Cell offline installer")
    sub = parser.add_subparsers(dest="command", required=True)

    b = sub.add_parser("bundle", help="build a signed offline bundle (connected side)")
    b.add_argument("--out", required=True)
    b.add_argument("--signing-key", required=True, help="file with the release key's Ed25519 seed")
    b.add_argument("--project", default=".", help="project source dir (pyproject.toml)")
    b.add_argument("--registry", help="TUF registry snapshot dir to ship for the mirror")
    b.add_argument("--python-version", help="target Python X.Y (default: this one)")
    b.add_argument("--platform", action="append", help="target wheel platform tag (repeatable)")
    b.add_argument("--find-links", action="append", help="extra wheel dir for pip (repeatable)")
    b.add_argument("--no-index", action="store_true", help="resolve only from --find-links")
    b.add_argument("--constraints", help="pip constraints file pinning transitive deps")
    b.add_argument("--source-date-epoch", type=int, help="fixed timestamp (default $SOURCE_DATE_EPOCH or 1980)")
    b.add_argument("--build-python", help="interpreter whose pip builds and downloads (default: this one)")
    b.set_defaults(func=cmd_bundle)

    def common(p: argparse.ArgumentParser, trust: bool) -> None:
        p.add_argument("--root", default="/", help="install into this tree instead of / (tests)")
        p.add_argument("--prefix", default="/opt/synapse")
        p.add_argument("--data-root", default="/var/lib/synapse")
        p.add_argument("--config-dir", default="/etc/synapse")
        p.add_argument("--unit-dir", default="/etc/systemd/system")
        p.add_argument("--user", default="synapse")
        if trust:
            p.add_argument("--trusted-keys", help=f"TEST/VENDOR ONLY: release keys JSON replacing the embedded "
                           f"production key (also ${ENV_OVERRIDE}); verification is never skipped")

    v = sub.add_parser("verify", help="check a bundle's signature and every hash")
    v.add_argument("bundle")
    v.add_argument("--trusted-keys", help=f"TEST/VENDOR ONLY (also ${ENV_OVERRIDE})")
    v.set_defaults(func=cmd_verify)

    i = sub.add_parser("install", help="verify, then install or upgrade")
    i.add_argument("bundle")
    common(i, True)
    i.add_argument("--dry-run", action="store_true", help="verify and print the plan; change nothing")
    i.add_argument("--skip-precompile", action="store_true", help="leave compiling the runtimes to first start")
    i.add_argument("--allow-downgrade", action="store_true")
    i.add_argument("--start", action="store_true", help="enable and start the service (only with --root /)")
    i.add_argument("--memory-max", default="6G", help="MemoryMax= of the unit")
    i.add_argument("--workdir", help="where to stage the verified bundle (default: $TMPDIR)")
    i.set_defaults(func=cmd_install)

    r = sub.add_parser("rollback", help="return to the previous version")
    common(r, False)
    r.set_defaults(func=cmd_rollback)
    u = sub.add_parser("uninstall", help="remove the service and code; keep data unless --purge")
    common(u, False)
    u.add_argument("--purge", action="store_true", help="also delete data and config")
    u.set_defaults(func=cmd_uninstall)
    s = sub.add_parser("status", help="installed versions")
    common(s, False)
    s.set_defaults(func=cmd_status)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except InstallerError as exc:
        print(f"installer: {exc}", file=sys.stderr)
        return exc.exit_status


if __name__ == "__main__":
    sys.exit(main())
