"""The pure fair-share policy (T-FAIR-1): reserve lane, fair queue, caps."""
from __future__ import annotations

from pathlib import Path

import pytest

from appliance.policy.fairness import FairShare, Ticket, tenant_cell_cap
from appliance.storage import CellRecord, Store


def start(share: FairShare, tenant: str, worker: int) -> Ticket:
    ticket = share.request(tenant, worker)
    share.dispatch()
    return ticket


def test_t_fair_1_flooding_tenant_leaves_the_last_lane_of_each_worker_free() -> None:
    share = FairShare(workers=2, lanes=2)
    flood = [start(share, "A", w) for w in (0, 1, 0, 1, 0, 1)]
    assert [t.granted for t in flood] == [True, True, False, False, False, False]
    # B has nothing running: the reserve lane of the worker holding its cell is its own.
    for worker in (0, 1):
        b = start(share, "B", worker)
        assert b.granted
        share.release(b)
        share.dispatch()
        assert not any(t.granted for t in flood[2:])  # A still does not get the reserve lane


def test_t_fair_1_single_tenant_keeps_one_run_per_worker() -> None:
    share = FairShare(workers=2, lanes=2)
    first, second = start(share, "solo", 0), start(share, "solo", 1)
    third = start(share, "solo", 0)
    assert (first.granted, second.granted, third.granted) == (True, True, False)
    share.release(first)
    assert share.dispatch() == [third]


def test_t_fair_1_one_lane_per_worker_has_no_reserve_but_queues_fairly() -> None:
    share = FairShare(workers=1, lanes=1)
    running = start(share, "A", 0)
    a_waits = [share.request("A", 0) for _ in range(3)]
    b_waits = share.request("B", 0)
    assert running.granted and not b_waits.granted
    share.release(running)
    assert share.dispatch() == [b_waits]  # B has nothing running: it goes before A's backlog
    share.release(b_waits)
    assert share.dispatch() == [a_waits[0]]


def test_t_fair_1_round_robin_between_tenants_with_equal_load() -> None:
    share = FairShare(workers=1, lanes=1)
    running = start(share, "X", 0)
    for tenant in ("A", "A", "A", "B", "B", "B"):
        share.request(tenant, 0)
    order = []
    current = running
    for _ in range(6):
        share.release(current)
        (current,) = share.dispatch()
        order.append(current.tenant)
    assert order in (["A", "B"] * 3, ["B", "A"] * 3)


@pytest.mark.parametrize("cap", [1, 2, 3])
def test_t_fair_1_tenant_max_runs_caps_runs_in_flight(cap: int) -> None:
    share = FairShare(workers=4, lanes=3, tenant_max_runs=cap)
    tickets = [start(share, "A", w % 4) for w in range(8)]
    assert sum(t.granted for t in tickets) == cap
    assert start(share, "B", 0).granted


def test_t_fair_1_queue_share_refuses_past_the_cap_per_tenant() -> None:
    share = FairShare(workers=1, lanes=1, tenant_max_queued=2)
    assert share.admit("A") and share.admit("A")
    assert not share.admit("A")  # A's share is full ...
    assert share.admit("B")  # ... B still queues
    share.leave("A")
    assert share.admit("A")


def test_cancelled_waiter_never_starts_and_granted_cancel_frees_its_lane() -> None:
    share = FairShare(workers=1, lanes=1)
    running = start(share, "A", 0)
    gave_up = share.request("B", 0)
    share.cancel(gave_up)
    share.cancel(running)  # a granted ticket: its lane is released
    assert share.dispatch() == [] and share.busy(0) == 0 and share.running("A") == 0


@pytest.mark.parametrize("bad", [dict(workers=0, lanes=1), dict(workers=1, lanes=0), dict(workers=1, lanes=1, tenant_max_runs=-1)])
def test_bad_shapes_are_refused(bad: dict[str, int]) -> None:
    with pytest.raises(ValueError):
        FairShare(**bad)


@pytest.mark.parametrize("node_max,configured,tenants,cap", [
    pytest.param(400, 0, 1, 400, id="alone-uses-every-cell"),
    pytest.param(400, 0, 2, 300, id="shared-keeps-a-quarter"),
    pytest.param(2, 0, 3, 1, id="tiny-node-still-one"),
    pytest.param(1, 0, 3, 1, id="one-cell-node"),
    pytest.param(400, 10, 5, 10, id="configured"),
    pytest.param(100, 500, 1, 100, id="configured-never-above-node"),
])
def test_t_fair_1_tenant_cell_cap(node_max: int, configured: int, tenants: int, cap: int) -> None:
    assert tenant_cell_cap(node_max, configured, tenants) == cap


def test_t_fair_1_room_counts_are_the_cells_and_the_tenants_not_revoked(tmp_path: Path) -> None:
    """The counts a create checks its caps against, read in one statement (storage.Store.room_counts)."""
    store = Store(tmp_path / "cell.sqlite")
    a, _ = store.add_tenant("a", 0)
    b, _ = store.add_tenant("b", 0)
    gone, _ = store.add_tenant("gone", 0)
    assert store.room_counts(a.id) == (0, 0, 3)
    for i, owner in enumerate((a, a, b)):
        store.add_cell(CellRecord(f"c{i}", owner.id, "python3", 0, 1000, 1000, True, {}, {}, 64))
    store.revoke_tenant(gone.id)
    assert store.room_counts(a.id) == (3, 2, 2)
    assert store.room_counts(b.id) == (3, 1, 2)
    assert store.room_counts("t-none") == (3, 0, 2)
    store.delete_cell("c0")
    assert store.room_counts(a.id) == (2, 1, 2)
    store.close()
