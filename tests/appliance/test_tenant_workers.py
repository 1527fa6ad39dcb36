"""Tenant-bound workers (T-TENANT-1): a worker serves one tenant.

The second wall's Landlock rules of a bound worker admit only its tenant's
volume and /tmp directories (the escaped-guest rows in test_sandbox.py prove
it from inside the process); these tests prove the placement: runs and cells
of two tenants never reach the same worker, a spare is bound on a tenant's
first run and replaced, idle workers are reclaimed, and a spent budget is
answered 503 no_worker. Real workers, real guests, real SQLite.
"""
from __future__ import annotations

import errno
import json
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from appliance.cells import CellService
from appliance.config import load_settings
from appliance.errors import Busy, CellError
from appliance.policy.fairness import FairShare
from appliance.runtime import landlock, protocol, sandbox, seccomp
from appliance.runtime.pool import WorkerPool, sandbox_config
from appliance.storage import Tenant
from tests.in_process import cell_service, named_tenant
from tests.liveserver import ServerProcess, shared_cache

BAD_TENANT_IDS = ["", "../b", "a/b", ".tmp", ".pool", "x" * 65, "a\x00b", "a b", "ä", "..", "/"]


# -- pure: the bind frame, the rules, the filter ------------------------------------
@pytest.mark.parametrize("tenant_id", BAD_TENANT_IDS)
def test_t_tenant_1_bind_frame_refuses_a_malformed_tenant_id(tenant_id: str) -> None:
    frame = b'{"type":"tenant","req_id":1,"tenant_id":' + json.dumps(tenant_id).encode() + b"}"
    with pytest.raises(protocol.ProtocolError):
        protocol.decode(frame, protocol.TO_SPARE, 1 << 16)
    with pytest.raises(protocol.ProtocolError):
        protocol.TenantBindRequest(1, tenant_id)


@pytest.mark.parametrize("tenant_id", BAD_TENANT_IDS)
def test_t_tenant_1_tenant_dirs_refuse_a_malformed_tenant_id(tmp_path: Path, tenant_id: str) -> None:
    with pytest.raises(sandbox.SandboxError):
        sandbox.tenant_dirs(str(tmp_path), tenant_id)


def test_t_tenant_1_a_bound_worker_takes_no_second_bind_and_a_spare_nothing_else() -> None:
    bind = protocol.encode(protocol.TenantBindRequest(1, "tenant-b"))
    with pytest.raises(protocol.ProtocolError):
        protocol.decode(bind, protocol.TO_WORKER, 1 << 16)  # a bound worker is never bound again
    assert protocol.decode(bind, protocol.TO_SPARE, 1 << 16) == protocol.TenantBindRequest(1, "tenant-b")
    for msg in (protocol.PingRequest(1), protocol.DropRequest(1, "c1"),
                protocol.ExecRequest(1, "python3", b"1", True, 1000, 64, "tenant-b")):
        with pytest.raises(protocol.ProtocolError):
            protocol.decode(protocol.encode(msg), protocol.TO_SPARE, 1 << 16)


def test_t_tenant_1_narrowed_rules_write_only_the_tenants_dirs(tmp_path: Path) -> None:
    settings = load_settings({"SYNAPSE_ROOT": str(tmp_path), "SYNAPSE_CONFIG_DIR": str(tmp_path / "etc"),
                              "SYNAPSE_MODULE_CACHE": str(shared_cache())})
    dirs = sandbox.tenant_dirs(str(settings.volumes_dir), "tenant-a")
    for d in dirs:
        Path(d).mkdir(parents=True)
    (settings.volumes_dir / "tenant-b").mkdir()
    config = {"cache_dir": str(shared_cache()), "volumes_dir": str(settings.volumes_dir), "weights_dir": None,
              "sandbox": dict(sandbox_config(settings), volume_set=list(dirs))}
    rules = sandbox.worker_rules(config, ())
    landlock.check(rules)
    vols = str(settings.volumes_dir.resolve())
    assert rules.read_write == (f"{vols}/tenant-a", f"{vols}/.tmp/tenant-a")
    assert not any(p == vols or p.startswith(f"{vols}/tenant-b") for p in (*rules.read_only, *rules.read_write))


@pytest.mark.parametrize("arch", ["x86_64", "aarch64"])
@pytest.mark.parametrize("name", ["landlock_create_ruleset", "landlock_add_rule", "landlock_restrict_self", "seccomp"])
def test_t_tenant_1_only_a_spare_may_narrow_itself(arch: str, name: str) -> None:
    number = seccomp._nr(name, arch)
    assert number is not None
    spare = seccomp.build(seccomp.FilterPolicy(narrowing=True), arch)
    bound = seccomp.build(seccomp.FilterPolicy(), arch)
    assert seccomp.evaluate(spare, seccomp.ARCHES[arch], number) == seccomp.RET_ALLOW
    assert seccomp.evaluate(bound, seccomp.ARCHES[arch], number) == seccomp.errno_ret(errno.EPERM)
    # The spare's filter is the bound one plus exactly these calls.
    assert seccomp.evaluate(spare, seccomp.ARCHES[arch], seccomp._nr("execve", arch) or 0) == seccomp.RET_KILL_PROCESS


def test_t_fair_1_a_dedicated_worker_keeps_no_reserve_lane_from_itsnamed_tenant() -> None:
    fair = FairShare(workers=2, lanes=2)
    for worker in (0, 1):
        first = fair.request("a", worker)
        fair.dispatch()
        assert first.granted
    fair.dedicate(1, "a")
    shared, dedicated = fair.request("a", 0), fair.request("a", 1)
    fair.dispatch()
    assert not shared.granted  # worker 0 keeps its last lane for another tenant (T-FAIR-1)
    assert dedicated.granted  # nobody else can ever use worker 1's
    fair.dedicate(1, None)
    assert not fair.may_start("a", 0)


# -- a real pool ----------------------------------------------------------------------
class RecordingPool(WorkerPool):
    """The real pool; every request it sends is noted as (worker pid, tenant)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.sent: list[tuple[int, str]] = []

    def call(self, handle: Any, msg: protocol.Request, **kwargs: Any) -> protocol.Reply:
        reply = super().call(handle, msg, **kwargs)
        tenant = msg.tenant_id if isinstance(msg, protocol.ExecRequest) else kwargs.get("tenant", "")
        self.sent.append((handle.process.pid, tenant))
        return reply


@pytest.fixture(scope="module")
def service(module_cache: None, tmp_path_factory: pytest.TempPathFactory) -> Iterator[CellService]:
    with cell_service(tmp_path_factory.mktemp("tenants"), RecordingPool, SYNAPSE_WARM_PYTHON="0",
                      SYNAPSE_WORKERS="2", SYNAPSE_WORKERS_MAX="4") as cells:
        yield cells


def _pool(cells: CellService) -> RecordingPool:
    assert isinstance(cells.pool, RecordingPool)
    return cells.pool


def _wait_for(cond: Any, timeout: float = 120.0) -> None:
    end = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < end, "condition not reached"
        time.sleep(0.05)


def _run(cells: CellService, tenant: Tenant, code: bytes = b"print(6 * 7)") -> dict[str, Any]:
    answer = cells.execute_once(tenant, "python3", code, True, None, 10_000, None)
    assert answer["status"] == "ok", answer
    return answer


def test_t_tenant_1_two_tenants_never_share_a_worker(service: CellService) -> None:
    pool = _pool(service)
    a, b = named_tenant(service, "alpha"), named_tenant(service, "beta")
    start = len(pool.sent)
    cell_a = service.create(a, "python3", 60_000, True, {}, {}, 64)
    cell_b = service.create(b, "python3", 60_000, True, {}, {}, 64)
    for _ in range(3):
        _run(service, a)
        _run(service, b)
        assert service.exec_in_cell(a, cell_a.id, b"x = 1", True, None)["status"] == "ok"
        assert service.exec_in_cell(b, cell_b.id, b"x = 2", True, None)["status"] == "ok"
    by_pid: dict[int, set[str]] = {}
    for pid, tenant in pool.sent[start:]:
        by_pid.setdefault(pid, set()).add(tenant)
    assert all(len(tenants) == 1 for tenants in by_pid.values()), by_pid
    assert {t for ts in by_pid.values() for t in ts} == {"alpha", "beta"}
    # Each bound worker's own report: the tenant it was bound to, and nothing else reaches it.
    handle_a = pool.pick_for_run("alpha")
    assert handle_a.tenant == "alpha" and handle_a.state == "bound"
    with pytest.raises(CellError) as refused:
        pool.call(handle_a, protocol.ExecRequest(0, "python3", b"1", True, 1000, 64, "beta"), deadline_s=1, tenant="beta")
    assert refused.value.code == "wrong_worker"
    service.delete(a, cell_a.id)
    service.delete(b, cell_b.id)


def test_t_tenant_1_a_spare_is_bound_on_a_first_run_and_replaced(service: CellService) -> None:
    pool = _pool(service)
    # With the budget held by idle bound workers no spare is kept: reclaiming them makes room.
    pool.reclaim_idle(now=time.monotonic() + service.settings.worker_idle_s + 1)
    _wait_for(lambda: pool.stats()["spares"] >= 1)
    spare_pid = next(w["pid"] for w in pool.sandbox_status()["workers"] if w["state"] == "spare")
    gamma = named_tenant(service, "gamma")
    start = len(pool.sent)
    _run(service, gamma)
    assert [pid for pid, t in pool.sent[start:] if t == "gamma"] == [spare_pid]  # the spare, now gamma's
    # A new spare is started in the background when the budget allows it;
    # reclaiming idle workers makes room for it.
    pool.reclaim_idle(now=time.monotonic() + service.settings.worker_idle_s + 1)
    _wait_for(lambda: pool.stats()["spares"] >= 1)
    status = pool.sandbox_status()
    assert spare_pid not in [w["pid"] for w in status["workers"] if w["state"] == "spare"]
    assert all(w["seccomp"] == 2 and w["no_new_privs"] == 1 for w in status["workers"])  # spares are confined too
    assert status["tenant_binding"]["budget"] == 2 and status["tenant_binding"]["max"] == 4


def test_t_tenant_1_idle_workers_are_reclaimed_but_never_one_holding_a_cell(service: CellService) -> None:
    pool = _pool(service)
    delta, eps = named_tenant(service, "delta"), named_tenant(service, "epsilon")
    _run(service, delta)
    cell = service.create(eps, "python3", 60_000, True, {}, {}, 64)
    idle_d, holding_e = pool.pick_for_run("delta"), pool.pick_for_cell("epsilon")
    assert idle_d is not holding_e
    assert pool.reclaim_idle(now=time.monotonic() + 1) == 0  # not idle long enough
    pool.reclaim_idle(now=time.monotonic() + service.settings.worker_idle_s + 1)
    _wait_for(lambda: not idle_d.process.is_alive())
    assert idle_d.state == "retired" and holding_e.state == "bound" and holding_e.process.is_alive()
    assert service.exec_in_cell(eps, cell.id, b"print('kept')", True, None)["stdout"] == "kept\n"
    service.delete(eps, cell.id)
    # A reclaimed tenant's next run simply binds a worker again.
    assert _run(service, delta)["stdout"] == "42\n"


def test_t_tenant_1_spent_budget_answers_no_worker_then_reclaims_for_the_nextnamed_tenant(
        module_cache: None, tmp_path: Path) -> None:
    with cell_service(tmp_path, RecordingPool, SYNAPSE_WARM_PYTHON="0", SYNAPSE_WORKERS="1",
                      SYNAPSE_WORKERS_MAX="2", SYNAPSE_WORKER_SPARES="1") as cells:
        pool = _pool(cells)
        a, b, c = named_tenant(cells, "ta"), named_tenant(cells, "tb"), named_tenant(cells, "tc")
        cell_a = cells.create(a, "python3", 60_000, True, {}, {}, 64)
        cell_b = cells.create(b, "python3", 60_000, True, {}, {}, 64)  # past the budget: the pool grows to the max
        assert pool.binding_status()["bound"] == 2
        with pytest.raises(Busy) as busy:
            cells.execute_once(c, "python3", b"print(1)", True, None, 5000, None)
        assert busy.value.code == "no_worker" and busy.value.status == 503 and busy.value.retry_after
        # Once a's cell is gone its worker is idle: c's run reclaims it instead of waiting.
        cells.delete(a, cell_a.id)
        pool.reclaim_grace_s = 0.0
        assert _run(cells, c)["stdout"] == "42\n"
        tenants_by_pid: dict[int, set[str]] = {}
        for pid, tenant in pool.sent:
            tenants_by_pid.setdefault(pid, set()).add(tenant)
        assert all(len(ts) == 1 for ts in tenants_by_pid.values()), tenants_by_pid
        assert len(pool.stats()["pids"]) <= 2
        cells.delete(b, cell_b.id)


def test_t_tenant_1_status_reports_binding_without_tenant_ids(live: ServerProcess) -> None:
    assert live.request("POST", "/v1/execute", {"code": "print(1)"})[0] == 200
    _, status, _ = live.request("GET", "/v1/status")
    box = status["worker_sandbox"]
    binding = box["tenant_binding"]
    assert binding["mode"] == "one tenant per worker" and binding["bound"] >= 1
    assert binding["budget"] >= 1 and binding["max"] >= binding["budget"] and binding["idle_reclaim_s"] >= 1
    assert {w["state"] for w in box["workers"]} <= {"spare", "binding", "bound"}
    assert all(w["seccomp"] == 2 and w["no_new_privs"] == 1 for w in box["workers"])
    assert "default" not in json.dumps(box)  # the live server's tenant: any tenant's key reads this


def test_a_new_cells_first_run_does_not_write_its_row_again(service: CellService, monkeypatch: pytest.MonkeyPatch) -> None:
    """The create wrote the row with its expiry: the first run moves the expiry
    in memory (authoritative, throttled to the DB) and costs no second write."""
    tenant = named_tenant(service, "alpha")
    touched: list[str] = []
    real_touch = service.store.touch_cell

    def touch(cell_id: str, *args: Any, **kwargs: Any) -> None:
        touched.append(cell_id)
        real_touch(cell_id, *args, **kwargs)

    monkeypatch.setattr(service.store, "touch_cell", touch)
    cell = service.create(tenant, "python3", 60_000, True, {}, {}, 64)
    written = cell.expires_at
    try:
        assert service.exec_in_cell(tenant, cell.id, b"print(1)", True, None)["stdout"] == "1\n"
        assert touched == []
        assert service.cell(tenant, cell.id).expires_at >= written  # the run's expiry, from memory
        stored = service.store.get_cell(cell.id, tenant.id)
        assert stored is not None and stored.expires_at == written
    finally:
        service.delete(tenant, cell.id)
