"""`cell doctor`: passes on a fresh data dir, names each problem on a broken one."""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import socket
from datetime import datetime, timedelta, timezone
from pathlib import Path

import pytest

from appliance.config import Settings, load_settings
from appliance.license.manager import HighWaterStore
from appliance.ops import cli as ops_cli
from appliance.ops.doctor import FAIL, OK, Context, exit_code, run_checks
from appliance.receipts.nodekey import NodeKey
from appliance.receipts.store import ReceiptStore
from appliance.services import prepare_root
from appliance.storage import Store
from tests.factories import NOW, make_keypair, make_license, make_registry
from tests.mirror import TOP

BIG_MEMORY = lambda: 64 * 2**30  # noqa: E731 - the host's real memory must not decide these tests


def fresh_node(root: Path) -> Settings:
    """What the first `make run` leaves: private dirs, node key, database, registry root."""
    cache = root / "cache" / "modules"
    settings = load_settings({"SYNAPSE_ROOT": str(root), "SYNAPSE_CONFIG_DIR": str(root / "etc"),
                              "SYNAPSE_MODULE_CACHE": str(cache), "SYNAPSE_WORKERS": "2"})
    prepare_root(settings)
    Store(settings.db_path).close()
    key = NodeKey.load_or_create(settings.keys_dir)
    ReceiptStore(settings.db_path, key).close()
    HighWaterStore(settings.db_path, key).raise_to(datetime.now(timezone.utc))  # the signed license clock mark
    from mirror.registry import Mirror

    Mirror(settings.mirror_dir)
    cache.mkdir(parents=True, mode=0o700)
    blob = b"\x00asm-compiled-stand-in" * 100
    stem = "ab" * 32 + "-49.0.0-epoch1-fuel0"
    (cache / f"{stem}.cwasm").write_bytes(blob)
    os.chmod(cache / f"{stem}.cwasm", 0o600)
    (cache / f"{stem}.json").write_text(json.dumps({"sha256": hashlib.sha256(blob).hexdigest(), "size": len(blob)}))
    return settings


def ctx(**kw: object) -> Context:
    return Context(now=kw.pop("now", datetime.now(timezone.utc)), meminfo=BIG_MEMORY, **kw)  # type: ignore[arg-type]


def by_name(settings: Settings, context: Context) -> dict[str, object]:
    return {c.name: c for c in run_checks(settings, context)}


def test_fresh_data_dir_passes(tmp_path: Path) -> None:
    settings = fresh_node(tmp_path / "node")
    checks = run_checks(settings, ctx())
    assert exit_code(checks) == 0, [c.line() for c in checks]
    names = [c.name for c in checks]
    assert names == ["data dir", "module cache", "openat2", "worker sandbox", "license", "registry", "resources", "clock",
                     "cluster"]
    assert all(c.level != FAIL for c in checks)


def test_broken_node_names_each_problem(tmp_path: Path) -> None:
    settings = fresh_node(tmp_path / "node")
    os.chmod(settings.root, 0o777)  # T-TENANT-1: everyone can read volumes
    cwasm = next(settings.cache_dir.glob("*.cwasm"))
    with open(cwasm, "r+b") as fh:  # T-CACHE-1: native code changed after it was recorded
        fh.write(b"\xcc")
    settings.config_dir.mkdir(parents=True, exist_ok=True)
    settings.license_path.write_text('{"payload": {}, "key_id": "x", "signature": "AAAA"}')
    checks = {c.name: c for c in run_checks(settings, ctx())}
    assert checks["data dir"].level == FAIL and str(settings.root) in checks["data dir"].message
    assert "chmod 700" in checks["data dir"].fix
    assert checks["module cache"].level == FAIL and cwasm.name in checks["module cache"].message
    assert checks["license"].level == FAIL and "refused" in checks["license"].message
    assert exit_code(list(checks.values())) == 1


def test_valid_license_reports_days_left(tmp_path: Path) -> None:
    settings = fresh_node(tmp_path / "node")
    shutil.rmtree(settings.mirror_dir)  # replaced by a registry signed with test keys, fresh at NOW
    registry = make_registry(tmp_path, mirror_dir=settings.mirror_dir, expires=dict.fromkeys(TOP, NOW + timedelta(days=30)))
    pair = make_keypair("doctor")
    settings.config_dir.mkdir(parents=True, exist_ok=True)
    settings.license_path.write_bytes(make_license(pair.signing_key, pair.key_id))
    check = by_name(settings, ctx(now=NOW, license_keys=pair.keys, machine_id="m", registry_root=registry.trusted_root))["license"]
    assert check.level == OK and "365 days left" in check.message  # type: ignore[attr-defined]


def test_t_lic_3_license_without_imported_registry_is_refused(tmp_path: Path) -> None:
    settings = fresh_node(tmp_path / "node")  # only the trust root: revocations unknown
    pair = make_keypair("doctor")
    settings.config_dir.mkdir(parents=True, exist_ok=True)
    settings.license_path.write_bytes(make_license(pair.signing_key, pair.key_id))
    checks = by_name(settings, ctx(now=NOW, license_keys=pair.keys, machine_id="m"))
    assert checks["license"].level == FAIL and "registry_missing" in checks["license"].message  # type: ignore[attr-defined]
    assert "registry_missing" in checks["registry"].message  # type: ignore[attr-defined]


def test_key_file_readable_by_others_fails(tmp_path: Path) -> None:
    settings = fresh_node(tmp_path / "node")
    os.chmod(settings.keys_dir / "node_ed25519", 0o644)
    check = by_name(settings, ctx())["data dir"]
    assert check.level == FAIL and "node_ed25519" in check.message and "chmod 600" in check.fix  # type: ignore[attr-defined]


def test_clock_behind_the_last_receipt_fails(tmp_path: Path) -> None:
    settings = fresh_node(tmp_path / "node")
    with ReceiptStore(settings.db_path, NodeKey.load(settings.keys_dir)) as store:
        store.append(execution_id="0b6e6a36-62c5-4c4e-9a0e-3f1b0a9f6f11", tenant_id="t", cell_id=None,
                     template="wasm", code_hash="0" * 64, result_hash="1" * 64,
                     timestamp_ms=int(datetime(2030, 1, 1, tzinfo=timezone.utc).timestamp() * 1000))
    check = by_name(settings, ctx(now=datetime(2029, 1, 1, tzinfo=timezone.utc)))["clock"]
    assert check.level == FAIL and "future" in check.message  # type: ignore[attr-defined]


def test_missing_data_dir_fails_with_a_fix(tmp_path: Path) -> None:
    settings = load_settings({"SYNAPSE_ROOT": str(tmp_path / "nothing"), "SYNAPSE_CONFIG_DIR": str(tmp_path / "etc")})
    check = by_name(settings, ctx())["data dir"]
    assert check.level == FAIL and "cell serve" in check.fix  # type: ignore[attr-defined]


def test_cli_prints_one_line_per_check_and_exits_1(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                    capsys: pytest.CaptureFixture[str]) -> None:
    settings = fresh_node(tmp_path / "node")
    os.chmod(settings.root, 0o777)
    monkeypatch.setenv("SYNAPSE_ROOT", str(settings.root))
    monkeypatch.setenv("SYNAPSE_CONFIG_DIR", str(settings.config_dir))
    monkeypatch.setenv("SYNAPSE_MODULE_CACHE", str(settings.cache_dir))
    import argparse

    parser = argparse.ArgumentParser()
    ops_cli.register(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["doctor"])
    code = args.func(args)
    out = capsys.readouterr().out.splitlines()
    assert code == 1
    assert len(out) == 9 and out[0].startswith("[FAIL] data dir:") and "-- fix: chmod 700" in out[0]


@pytest.mark.parametrize("abi,mode,level", [(7, "required", "ok"), (0, "required", "fail"), (0, "off-unsafe", "warn"),
                                            (7, "off-unsafe", "warn")])
def test_t_escape_1_doctor_reports_the_worker_sandbox(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, abi: int,
                                                      mode: str, level: str) -> None:
    from appliance.ops.doctor import check_worker_sandbox
    from appliance.runtime import sandbox

    monkeypatch.setattr(sandbox, "landlock_abi", lambda: abi)
    settings = fresh_node(tmp_path / "node").with_overrides(worker_sandbox=mode)
    check = check_worker_sandbox(settings, ctx())
    assert check.level == level, check.line()
    assert f"Landlock ABI {abi}" in check.message and "worker network denied" in check.message


def test_cluster_check_names_an_unreachable_etcd(tmp_path: Path) -> None:
    # T-CLUSTER-1: a node without etcd says it serves known tenants and refuses changes.
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # nothing listens once the block ends
    settings = fresh_node(tmp_path / "node").with_overrides(
        cluster_etcd=(f"http://127.0.0.1:{port}",), node_addr="127.0.0.1:8001", node_id="n1")
    check = by_name(settings, ctx())["cluster"]
    assert check.level == FAIL and "refuses changes" in check.message  # type: ignore[attr-defined]
    assert f"127.0.0.1:{port}" in check.fix  # type: ignore[attr-defined]


@pytest.mark.parametrize("abi,enforced", [(0, "placement only"), (7, "its volume and /tmp only, by Landlock")])
def test_t_tenant_1_doctor_reports_tenant_binding(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, abi: int,
                                                  enforced: str) -> None:
    from appliance.ops.doctor import check_worker_sandbox
    from appliance.runtime import sandbox

    monkeypatch.setattr(sandbox, "landlock_abi", lambda: abi)
    settings = fresh_node(tmp_path / "node").with_overrides(workers=2, workers_max=5, worker_idle_s=30)
    message = check_worker_sandbox(settings, ctx()).message
    assert "tenant binding: one tenant per worker" in message and enforced in message
    assert "budget 2, max 5, spares 1, idle reclaim 30s" in message
