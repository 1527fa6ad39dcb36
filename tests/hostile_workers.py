"""Stand-ins for a compromised worker (test-only): each says it is ready, then
answers requests with the hostile frame its config names. The pool starts
them exactly as it starts real workers (spawned process, one pipe).

Every frame here is what an engine escape could write on the worker's end of
the pipe; the web side must refuse it and replace the worker (T-PROTO-1).
"""
from __future__ import annotations

import json
import os
import pickle
import struct
from multiprocessing.connection import Connection
from typing import Any

from appliance.runtime import protocol


class _Planted:
    """Unpickling this creates a file: proof that a pickle was executed."""

    def __init__(self, path: str) -> None:
        self.path = path

    def __reduce__(self) -> tuple[Any, tuple[str, str]]:
        return (open, (self.path, "w"))


def _outcome(**over: Any) -> dict[str, Any]:
    base = {"exit_code": 0, "status": "ok", "stdout": "forged\n", "stderr": "", "truncated": False,
            "session_alive": True, "restarted": False, "note": None, "denials": []}
    base.update(over)
    return base


def _result(req_id: int, **over: Any) -> bytes:
    body = {"type": "result", "req_id": req_id, "outcome": _outcome(), "guest_ms": 1.0, "volume_usage": None}
    body.update(over)
    return json.dumps(body).encode()


def _fetch(req_id: int, *, url: str = "http://8.8.8.8/", call_id: int = 1, max_len: int = 4096) -> bytes:
    return json.dumps({"type": "fetch_call", "req_id": req_id, "call_id": call_id, "url": url, "max_len": max_len}).encode()


def _rich(req_id: int, index: int, text: str = "x") -> bytes:
    return json.dumps({"type": "rich", "req_id": req_id, "index": index,
                       "result": {"data": {"text/plain": text}, "is_main_result": False}}).encode()


def frames(attack: str, req_id: int, config: dict[str, Any]) -> list[bytes]:
    """The frames one attack sends in answer to request ``req_id``."""
    if attack == "pickle":
        return [pickle.dumps(_Planted(config["sentinel"]))]
    if attack == "pickled_dict":
        return [pickle.dumps({"type": "result", "req_id": req_id, "outcome": _outcome()})]
    if attack == "not_utf8":
        return [b"\xff\xfe{}"]
    if attack == "not_an_object":
        return [b"[1, 2, 3]"]
    if attack == "unknown_type":
        return [json.dumps({"type": "exec_shell", "req_id": req_id, "cmd": "id"}).encode()]
    if attack == "missing_field":
        return [json.dumps({"type": "result", "req_id": req_id, "guest_ms": 1.0}).encode()]
    if attack == "extra_field":
        return [_result(req_id, callback="os.system")]
    if attack == "wrong_type_stdout":
        return [_result(req_id, outcome=_outcome(stdout=5))]
    if attack == "bool_as_int":
        return [_result(req_id, outcome=_outcome(exit_code=True))]
    if attack == "unknown_status":
        return [_result(req_id, outcome=_outcome(status="ok; trusted"))]
    if attack == "error_claims_success":
        return [json.dumps({"type": "error", "req_id": req_id, "status": 200, "code": "ok", "message": "fine"}).encode()]
    if attack == "nan":
        return [b'{"type":"result","req_id":%d,"outcome":{},"guest_ms":NaN}' % req_id]
    if attack == "deep_nesting":
        return [b'{"type":"result","req_id":%d,"outcome":' % req_id + b"[" * 100_000 + b"]" * 100_000 + b"}"]
    if attack == "bad_chunk_fd":
        return [json.dumps({"type": "chunk", "req_id": req_id, "fd": 0, "data": "aGk="}).encode(), _result(req_id)]
    if attack == "bad_base64":
        return [json.dumps({"type": "chunk", "req_id": req_id, "fd": 1, "data": "!!!"}).encode(), _result(req_id)]
    if attack == "chunk_flood":
        chunk = json.dumps({"type": "chunk", "req_id": req_id, "fd": 1,
                            "data": "QUFB" * (1 << 18)}).encode()  # 768 KiB each, beyond two capped streams
        return [chunk] * 8 + [_result(req_id)]
    if attack == "results_out_of_order":  # T-PROTO-1: streamed results come 0, 1, 2, ...
        return [_rich(req_id, 0), _rich(req_id, 2), _result(req_id)]
    if attack == "results_flood":  # T-DOS-1: streamed results past the run's total cap
        return [_rich(req_id, i, "a" * (6 << 20)) for i in range(3)] + [_result(req_id)]
    if attack == "stale_flood":
        return [_result(req_id + 1000 + i) for i in range(64)] + [_result(req_id)]
    # T-ESCAPE-3: host calls the broker must refuse (and replace the worker) before any connection
    if attack == "call_not_in_flight":
        return [_fetch(req_id + 1000), _result(req_id)]
    if attack == "call_oversized_url":
        return [_fetch(req_id, url="http://8.8.8.8/" + "a" * 100_000), _result(req_id)]
    if attack == "call_bad_url":
        return [_fetch(req_id, url="http://8.8.8.8/\r\nHost: 169.254.169.254"), _result(req_id)]
    if attack == "call_negative_max_len":
        return [_fetch(req_id, max_len=-1), _result(req_id)]
    if attack == "call_flood":
        # a URL the policy denies without connecting: only the flood itself is on trial
        return [_fetch(req_id, url="http://169.254.169.254/", call_id=i + 1) for i in range(64)] + [_result(req_id)]
    if attack == "call_answer_to_supervisor":
        return [json.dumps({"type": "call_answer", "req_id": req_id, "call_id": 1, "code": 0, "body": ""}).encode()]
    if attack == "call_honest":
        return [_fetch(req_id)]  # the control row: the result follows the supervisor's answer
    raise ValueError(attack)


def hostile_worker(conn: Connection, config: dict[str, Any], *, attack: str, sentinel: str) -> None:
    """Entry point: bind ``attack`` and ``sentinel`` with functools.partial."""
    config = dict(config, sentinel=sentinel)
    conn.send_bytes(protocol.encode(protocol.Ready(pid=os.getpid())))
    while True:
        try:
            request = json.loads(conn.recv_bytes())
        except (EOFError, OSError):
            return
        req_id = int(request.get("req_id", 0))
        if request.get("type") == "call_answer":  # the supervisor answered a host call
            if attack == "call_honest":
                answer = _outcome(stdout=f"host call answered {request['code']}\n")
                conn.send_bytes(_result(req_id, outcome=answer))
            continue
        if request.get("type") != "exec":  # bind/drop: play along, the attack is on runs
            conn.send_bytes(protocol.encode(protocol.OkReply(req_id)))
            continue
        if attack == "huge_length":
            # A length header claiming 2 GiB, and nothing behind it.
            os.write(conn.fileno(), struct.pack("!i", 0x7FFFFFFF))
            continue
        try:
            for frame in frames(attack, req_id, config):
                conn.send_bytes(frame)
        except (BrokenPipeError, OSError):
            return
