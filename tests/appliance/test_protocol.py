"""T-PROTO-1: the supervisor never trusts a worker's bytes.

Frames between the web process and workers are typed JSON, never pickles;
every frame a worker sends is decoded and checked, and a malformed one costs
the worker its life while the run is answered with its receipt.
"""
from __future__ import annotations

import functools
import pickle
import threading
from pathlib import Path
from typing import Any

import pytest

from appliance.cells import CellService
from appliance.config import load_settings
from appliance.receipts import v1
from appliance.receipts.nodekey import NodeKey
from appliance.receipts.store import ReceiptStore
from appliance.runtime import protocol
from appliance.runtime.pool import WorkerPool
from appliance.storage import Store
from tests import hostile_workers

MAX = protocol.max_frame_bytes(1 << 20)

SAMPLES: list[Any] = [
    protocol.BindRequest(1, cell_id="c1", template="python3", volume="/v/t/c1", memory_mb=256, envs={"A": "b"}),
    protocol.ExecRequest(2, template="python3", code=b"\x00print(1)\xff", is_text=False, timeout_ms=500, memory_mb=64,
                         tenant_id="t", cell_id="c1", volume="/v", stream=True, envs={"K": "V"},
                         egress=protocol.EgressSpec(True, ["example.org"], ["10.0.0.0/8"], {"example.org": ["203.0.113.5"]}),
                         features=["load_weights"], quota_left=10, stdin=b"in", run_envs={"RUN": "only"}),
    protocol.DropRequest(3, cell_id="c1"),
    protocol.CancelRequest(13, cell_id="c1"),
    protocol.StatsRequest(4),
    protocol.PingRequest(5),
    protocol.Ready(pid=42),
    protocol.RunChunk(6, fd=2, data=b"\x00\x01err"),
    protocol.RunReply(7, outcome=protocol.RunOutcome(1, "error", "out\x00", "Traceback", True, False, True, "note",
                                                     [{"kind": "path", "detail": "x"}]), guest_ms=1.25, volume_usage=protocol.VolumeUsage(9, 2, True, True)),
    protocol.RunReply(12, outcome=protocol.RunOutcome(
        0, "ok", "", "", False, results=[protocol.ResultBundle({"text/plain": "2", "image/png": "iVBORw0K"}, True)],
        results_truncated=True, cancelled=True), guest_ms=2.0),
    protocol.RunResult(13, index=3, result=protocol.ResultBundle({"text/html": "<b>x</b>", "text/plain": "x"}, True)),
    protocol.ErrorReply(8, 403, "template_untrusted", "no", trace=None),
    protocol.OkReply(9, warm=True),
    protocol.StatsReply(10, sessions=1, warm={"python3": 2}, cache_hits=3, cache_misses=0),
    protocol.Pong(11),
]


@pytest.mark.parametrize("message", SAMPLES, ids=lambda m: type(m).__name__)
def test_t_proto_1_every_message_round_trips(message: Any) -> None:
    requests = tuple(protocol.TO_WORKER.values())
    table = protocol.TO_WORKER if isinstance(message, requests) else protocol.FROM_WORKER
    assert protocol.decode(protocol.encode(message), table, MAX) == message


def _outcome_frame(extra: bytes) -> bytes:
    return (b'{"type": "result", "req_id": 1, "guest_ms": 1, "outcome": {"exit_code": 0, "status": "ok", '
            b'"stdout": "", "stderr": "", "truncated": false, ' + extra + b"}}")


HOSTILE_FRAMES: list[tuple[str, bytes]] = [
    ("pickle", pickle.dumps({"type": "ready", "pid": 1})),
    ("not_utf8", b"\xff\xfe{}"),
    ("empty", b""),
    ("not_an_object", b"[1]"),
    ("string", b'"ready"'),
    ("no_type", b'{"pid": 1}'),
    ("type_not_string", b'{"type": 1, "pid": 1}'),
    ("unknown_type", b'{"type": "exec", "req_id": 1}'),  # a request type is not a reply
    ("missing_field", b'{"type": "ready"}'),
    ("extra_field", b'{"type": "ready", "pid": 1, "__class__": "os.system"}'),
    ("bool_as_int", b'{"type": "ready", "pid": true}'),
    ("float_as_int", b'{"type": "ready", "pid": 1.5}'),
    ("huge_int", b'{"type": "ready", "pid": 1' + b"0" * 30 + b"}"),
    ("nan", b'{"type": "result", "req_id": 1, "guest_ms": NaN, "outcome": {}}'),
    ("infinity", b'{"type": "pong", "req_id": Infinity}'),
    ("minus_infinity", b'{"type": "pong", "req_id": -Infinity}'),
    ("utf8_bom", b'\xef\xbb\xbf{"type": "pong", "req_id": 1}'),
    ("deep_nesting", b'{"type": "pong", "req_id": ' + b"[" * 50_000 + b"]" * 50_000 + b"}"),
    ("bytes_not_base64", b'{"type": "chunk", "req_id": 1, "fd": 1, "data": "!!"}'),
    ("bytes_as_list", b'{"type": "chunk", "req_id": 1, "fd": 1, "data": [104, 105]}'),
    ("chunk_fd_0", b'{"type": "chunk", "req_id": 1, "fd": 0, "data": ""}'),
    ("chunk_fd_3", b'{"type": "chunk", "req_id": 1, "fd": 3, "data": ""}'),
    ("error_status_200", b'{"type": "error", "req_id": 1, "status": 200, "code": "ok", "message": ""}'),
    ("error_code_markup", b'{"type": "error", "req_id": 1, "status": 500, "code": "<script>", "message": ""}'),
    ("error_huge_message", b'{"type": "error", "req_id": 1, "status": 500, "code": "x", "message": "'
     + b"a" * (protocol.MAX_TEXT + 1) + b'"}'),
    ("unknown_status", b'{"type": "result", "req_id": 1, "guest_ms": 1, "outcome": {"exit_code": 0, "status": "fine", '
     b'"stdout": "", "stderr": "", "truncated": false}}'),
    ("outcome_not_object", b'{"type": "result", "req_id": 1, "guest_ms": 1, "outcome": "ok"}'),
    ("negative_volume", b'{"type": "result", "req_id": 1, "guest_ms": 1, "volume_usage": {"bytes": -1}, "outcome": {"exit_code": 0, '
     b'"status": "ok", "stdout": "", "stderr": "", "truncated": false}}'),
    ("denials_wrong_shape", b'{"type": "result", "req_id": 1, "guest_ms": 1, "outcome": {"exit_code": 0, "status": "ok", '
     b'"stdout": "", "stderr": "", "truncated": false, "denials": [{"a": 1}]}}'),
    # rich results (T-DOS-1): a bundle is known MIME types -> text, at most MAX_RESULTS of them
    ("result_unknown_mime", _outcome_frame(b'"results": [{"data": {"application/x-sh": "rm"}, "is_main_result": false}]')),
    ("result_value_not_text", _outcome_frame(b'"results": [{"data": {"text/plain": 1}, "is_main_result": false}]')),
    ("result_main_not_bool", _outcome_frame(b'"results": [{"data": {"text/plain": "x"}, "is_main_result": 1}]')),
    ("result_extra_field", _outcome_frame(b'"results": [{"data": {}, "is_main_result": false, "path": "/etc"}]')),
    ("results_not_list", _outcome_frame(b'"results": {"data": {}}')),
    ("too_many_results", _outcome_frame(b'"results": [' + b",".join(
        [b'{"data": {"text/plain": "x"}}'] * (protocol.MAX_RESULTS + 1)) + b"]")),
    ("results_truncated_not_bool", _outcome_frame(b'"results_truncated": "yes"')),
    # a streamed result (T-PROTO-1): its index within MAX_RESULTS, its bundle checked like any other
    ("rich_index_negative", b'{"type": "rich", "req_id": 1, "index": -1, "result": {"data": {"text/plain": "x"}}}'),
    ("rich_index_past_max", b'{"type": "rich", "req_id": 1, "index": 64, "result": {"data": {"text/plain": "x"}}}'),
    ("rich_unknown_mime", b'{"type": "rich", "req_id": 1, "index": 0, "result": {"data": {"text/x-sh": "x"}}}'),
    ("rich_no_result", b'{"type": "rich", "req_id": 1, "index": 0}'),
    ("map_with_int_values", b'{"type": "stats", "req_id": 1, "sessions": 1, "warm": {"python3": "2"}, "cache_hits": 0, '
     b'"cache_misses": 0}'),
]


@pytest.mark.parametrize(("name", "frame"), HOSTILE_FRAMES, ids=[n for n, _ in HOSTILE_FRAMES])
def test_t_proto_1_hostile_frames_are_refused(name: str, frame: bytes) -> None:
    with pytest.raises(protocol.ProtocolError):
        protocol.decode(frame, protocol.FROM_WORKER, MAX)


def test_t_proto_1_oversized_frame_is_refused_before_parsing() -> None:
    frame = b'{"type": "pong", "req_id": 1, "pad": "' + b"a" * 2048 + b'"}'
    with pytest.raises(protocol.ProtocolError, match="exceeds"):
        protocol.decode(frame, protocol.FROM_WORKER, 1024)


def test_t_proto_1_encode_refuses_what_is_not_a_message() -> None:
    with pytest.raises(TypeError):
        protocol.encode({"type": "ready", "pid": 1})


@pytest.mark.parametrize("value", [float("nan"), float("inf"), float("-inf")], ids=["nan", "inf", "minus_inf"])
def test_t_proto_1_encode_refuses_a_float_json_has_not(value: float) -> None:
    outcome = protocol.RunOutcome(0, "ok", "", "", False)
    with pytest.raises(ValueError):
        protocol.encode(protocol.RunReply(1, outcome=outcome, guest_ms=value))


def test_t_proto_1_frames_are_compact_utf8() -> None:
    frame = protocol.encode(protocol.RunChunk(1, fd=1, data=b"x"))
    assert b" " not in frame
    reply = protocol.ErrorReply(2, 500, "internal", "caf\u00e9 \u2603")
    assert "caf\u00e9 \u2603".encode() in protocol.encode(reply)  # as UTF-8, not \u escapes


def test_t_proto_1_one_codec_serves_many_threads() -> None:
    """The module's one encoder and decoder are used by every thread of a
    process at once (a worker's request threads, the pool's readers)."""
    requests = tuple(protocol.TO_WORKER.values())
    frames = [(m, protocol.encode(m), protocol.TO_WORKER if isinstance(m, requests) else protocol.FROM_WORKER)
              for m in SAMPLES]
    wrong: list[str] = []

    def work() -> None:
        for _ in range(200):
            for message, frame, table in frames:
                if protocol.encode(message) != frame or protocol.decode(frame, table, MAX) != message:
                    wrong.append(type(message).__name__)
            try:
                protocol.decode(b'{"type": "pong", "req_id": NaN}', protocol.FROM_WORKER, MAX)
                wrong.append("NaN decoded")
            except protocol.ProtocolError:
                pass

    threads = [threading.Thread(target=work) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert wrong == []


# -- the pool and the cell service against a compromised worker ----------------

ATTACKS = ["pickle", "pickled_dict", "not_utf8", "not_an_object", "unknown_type", "missing_field", "extra_field",
           "wrong_type_stdout", "bool_as_int", "unknown_status", "error_claims_success", "nan", "deep_nesting",
           "bad_chunk_fd", "bad_base64", "chunk_flood", "stale_flood", "huge_length", "results_out_of_order",
           "results_flood"]
# T-ESCAPE-3: host calls a compromised worker may send the supervisor's broker
# (call_negative_max_len and the rest of the frame table: test_broker.py, without a pool)
CALL_ATTACKS = ["call_not_in_flight", "call_oversized_url", "call_bad_url", "call_flood"]


class _RecordingConnector:
    """Records every connect the broker asks for; never connects anywhere (test-only)."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, int]] = []

    def __call__(self, ip: str, port: int, timeout: float) -> Any:
        self.calls.append((ip, port))
        raise ConnectionRefusedError(f"test: no connection to {ip}")


@pytest.fixture
def hostile_service(tmp_path: Path, request: pytest.FixtureRequest) -> Any:
    attack: str = request.param
    sentinel = tmp_path / "unpickled"
    settings = load_settings({"SYNAPSE_ROOT": str(tmp_path / "root"), "SYNAPSE_CONFIG_DIR": str(tmp_path / "etc"),
                              "SYNAPSE_WORKERS": "1"})
    for path in (settings.root, settings.volumes_dir, settings.db_path.parent, settings.keys_dir):
        path.mkdir(parents=True, exist_ok=True, mode=0o700)
    store = Store(settings.db_path)
    receipts = ReceiptStore(settings.db_path, NodeKey.generate())
    pool = WorkerPool(settings, target=functools.partial(hostile_workers.hostile_worker, attack=attack,
                                                         sentinel=str(sentinel)))
    pool.broker.fetch_hooks = {"connector": _RecordingConnector()}  # test-only: proves no connection is made
    pool.start()
    # egress on (T-ESCAPE-3 rows): a refused call is refused for what it is, not because the run had no egress
    cells = CellService(settings, store, pool, receipts,
                        egress={"enabled": True, "allow_hosts": [], "deny": [], "hosts": None})
    tenant, _ = store.add_tenant("t", 0, tenant_id="t")
    try:
        yield cells, tenant, sentinel
    finally:
        pool.close()
        receipts.close()
        store.close()


@pytest.mark.parametrize("hostile_service", ATTACKS, indirect=True)
def test_t_proto_1_malformed_worker_frame_replaces_worker_and_run_keeps_receipt(hostile_service: Any) -> None:
    cells, tenant, sentinel = hostile_service
    pid_before = cells.pool.pick_for_run(tenant.id).process.pid  # the worker bound to this tenant (T-TENANT-1)
    answer = cells.execute_once(tenant, "python3", b"print(1)", True, None, 2000, None, on_chunk=lambda fd, data: None)
    # The run is answered as killed (never the worker's forged "ok"), with its receipt on disk.
    assert answer["status"] == "killed"
    assert answer["stdout"] == ""
    stored = cells.receipts.get(answer["execution_id"], tenant.id)
    assert stored is not None
    assert stored["result_hash"] == v1.result_hash(exit_code=-1, status="killed", stderr="", stdout="")
    # The worker was replaced, and nothing it sent was executed.
    assert cells.pool.kills == 1
    assert pid_before not in cells.pool.stats()["pids"]
    assert not sentinel.exists()
    assert cells.pool.broker.fetch_hooks["connector"].calls == []  # T-ESCAPE-3: no host call reached the network


@pytest.mark.parametrize("hostile_service", CALL_ATTACKS, indirect=True)
def test_t_escape_3_hostile_host_calls_refused_before_any_connection(hostile_service: Any) -> None:
    cells, tenant, _ = hostile_service
    pid_before = cells.pool.pick_for_run(tenant.id).process.pid  # the worker bound to this tenant (T-TENANT-1)
    answer = cells.execute_once(tenant, "python3", b"print(1)", True, None, 2000, None, on_chunk=lambda fd, data: None)
    assert answer["status"] == "killed" and answer["stdout"] == ""  # never the worker's forged output
    assert cells.receipts.get(answer["execution_id"], tenant.id) is not None
    assert cells.pool.kills == 1 and pid_before not in cells.pool.stats()["pids"]  # replaced
    assert cells.pool.broker.fetch_hooks["connector"].calls == []


@pytest.mark.parametrize("hostile_service", ["call_honest"], indirect=True)
def test_t_escape_3_a_call_for_the_run_in_flight_is_made_by_the_supervisor(hostile_service: Any) -> None:
    # The control row of the table above: the same recorder sees the one permitted connection.
    cells, tenant, _ = hostile_service
    answer = cells.execute_once(tenant, "python3", b"print(1)", True, None, 2000, None, on_chunk=lambda fd, data: None)
    assert answer["status"] == "ok" and cells.pool.kills == 0
    assert answer["stdout"] == "host call answered -4\n"  # the recorder refused the connection: I/O error
    assert cells.pool.broker.fetch_hooks["connector"].calls == [("8.8.8.8", 80)]


def test_t_proto_1_the_hostile_workers_baseline_frame_is_well_formed() -> None:
    # Each attack above changes one thing in this frame, so it must itself decode:
    # otherwise every row would be refused for the wrong reason.
    reply = protocol.decode(hostile_workers._result(5), protocol.FROM_WORKER, MAX)
    assert isinstance(reply, protocol.RunReply) and reply.outcome.stdout == "forged\n"


def test_t_proto_1_t_dos_1_frame_cap_holds_the_worst_results_within_their_cap() -> None:
    # Results at their total cap, every character escaped as \u00XX, with capped streams: still under the cap.
    cap, results_cap = 1 << 12, 1 << 14
    bundles = [protocol.ResultBundle({"text/html": "\x01" * (results_cap // protocol.MAX_RESULTS)})] * protocol.MAX_RESULTS
    outcome = protocol.RunOutcome(0, "ok", "\x01" * cap, "\x01" * cap, False, results=bundles)
    frame = protocol.encode(protocol.RunReply(1, outcome=outcome, guest_ms=1.0))
    assert len(frame) <= protocol.max_frame_bytes(cap, results_cap)
    assert protocol.decode(frame, protocol.FROM_WORKER, protocol.max_frame_bytes(cap, results_cap)) is not None
