"""Structured logs: one JSON object per line, secrets scrubbed, guest text escaped (T-LOG-1, T-LOG-2)."""
from __future__ import annotations

import json
import logging
import os
import stat
from pathlib import Path
from typing import Any

import pytest

from appliance.ops.logs import JsonFormatter, OpsLog, excerpt, scrub


@pytest.mark.parametrize("raw", [
    "line\nforged {\"level\":\"error\"}",
    "\x1b[31mred\x1b[0m",
    "\r\n\t\x00",
    "é" * 10,
])
def test_t_log_2_excerpt_escapes_control_characters_and_newlines(raw: str) -> None:
    out = excerpt(raw)
    assert "\n" not in out and "\r" not in out and "\x1b" not in out and "\x00" not in out
    assert out.isascii()


def test_excerpt_is_short() -> None:
    assert len(excerpt("a" * 10_000)) <= 70


@pytest.mark.parametrize("secret", [
    "Authorization: Bearer sk-abc123",
    "bearer abcdef",
    "sig " + "A" * 86 + "==",
])
def test_t_log_1_scrub_removes_credentials_and_signatures(secret: str) -> None:
    out = scrub(secret)
    assert "sk-abc123" not in out and "abcdef" not in out
    assert "[redacted]" in out
    assert "A" * 86 not in out


def test_formatter_writes_one_json_line_with_fields() -> None:
    record = logging.LogRecord("cell.ops", logging.INFO, __file__, 1, "run", None, None)
    record.fields = {"tenant_id": "t1", "note": "two\nlines"}  # type: ignore[attr-defined]
    line = JsonFormatter().format(record)
    assert "\n" not in line
    data = json.loads(line)
    assert data["event"] == "run" and data["level"] == "info" and data["tenant_id"] == "t1"
    assert data["time"].endswith("Z")


def test_log_file_is_private_and_rotates(tmp_path: Path) -> None:
    path = tmp_path / "logs" / "cell.log"
    events = OpsLog(log_file=path, stderr=False, max_bytes=2000, backups=2)
    try:
        for i in range(100):
            events.request(status=200, request_id=f"r{i}", route="/v1/cells")
    finally:
        events.close()
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
    assert (tmp_path / "logs" / "cell.log.1").exists()
    for line in path.read_text().splitlines():
        assert json.loads(line)["event"] == "request"


def test_levels_filter_and_denials_are_warnings(tmp_path: Path) -> None:
    path = tmp_path / "cell.log"
    events = OpsLog(level="warning", log_file=path, stderr=False)
    try:
        events.run({"execution_id": "e", "template": "wasm", "status": "ok",
                    "denials": [{"threat": "T-SSRF-1", "function": "host_fetch", "reason": "egress_off\nforged"}]}, "rid")
    finally:
        events.close()
    lines = [json.loads(x) for x in path.read_text().splitlines()]
    assert [x["event"] for x in lines] == ["policy_denial"]  # the info-level run line is filtered
    assert lines[0]["threat"] == "T-SSRF-1" and lines[0]["reason"] == "egress_off\\nforged"


def test_unknown_level_is_refused() -> None:
    with pytest.raises(ValueError):
        OpsLog(level="chatty", stderr=False)


def _scrub_every_pattern(text: str) -> str:
    from appliance.ops.logs import _SECRET_PATTERNS

    for pattern in _SECRET_PATTERNS:
        text = pattern.sub("[redacted]", text)
    return text


@pytest.mark.parametrize("text", [
    "", "plain", "c1-0123456789abcdef", "/v1/cells/<cell_id>/exec",
    "BEARER token", "x bEaReR\ttoken", "Bearer", "bearer\n", "AUTHORIZATION=secret", "authorization: x",
    "authorızation: secret",  # dotless i: re's IGNORECASE matches it, so non-ASCII text takes the full path
    "ſig bearer x", "A" * 85 + "==", "A" * 86 + "=", "x" * 85, "é" + "B" * 86 + "==", "Bearer\u00a0x",
])
def test_t_log_1_scrub_fast_path_gives_the_same_result(text: str) -> None:
    assert scrub(text) == _scrub_every_pattern(text)


def test_rotated_files_stay_within_their_size(tmp_path: Path) -> None:
    path = tmp_path / "cell.log"
    events = OpsLog(log_file=path, stderr=False, max_bytes=1500, backups=3)
    try:
        for i in range(60):
            events.request(status=200, request_id=f"r{i}", route="/v1/cells")
    finally:
        events.close()
    for f in (path, tmp_path / "cell.log.1", tmp_path / "cell.log.2"):
        assert 0 < f.stat().st_size <= 1500


# The line writer builds lines without a LogRecord: it must give the
# formatter's bytes, field for field, for every kind of value and any time.
@pytest.mark.parametrize("level, name, fields", [
    (logging.INFO, "run", {}),
    (logging.INFO, "run", {"request_id": "r1", "execution_id": "e1", "receipt_seq": 7, "tenant_id": "t1",
                           "cell_id": "c1", "template": "python3", "status": "ok", "exit_code": 0,
                           "latency_ms": 1.25, "guest_ms": None, "truncated": False, "denials": 0}),
    (logging.ERROR, "request", {"status": 500, "route": "/v1/cells/<cell_id>", "remote_addr": "127.0.0.1"}),
    (logging.WARNING, "policy_denial", {"reason": "two\nlines \x1b[31m é \u2028", "threat": "T-SSRF-1"}),
    (logging.INFO, "request", {"level": "error", "event": "forged", "time": "x", "logger": "y", "tenant_id": "t"}),
    (logging.INFO, "request", {"note": "Authorization: Bearer sk-abc123", "sig": "A" * 86 + "=="}),
    (logging.DEBUG, "weird \"name\"\n", {"nested": {"a": [1, "b\n"]}, "big": 10 ** 30, "obj": Path("/x")}),
    (logging.INFO, "run", {"a": "x" * 85, "b": "bear", "c": "er", "d": "authoriz", "e": "ation: y"}),
    (logging.INFO, "run", {"a": "x" * 86, "b": "y"}),
    (logging.INFO, "run", {"a": "A" * 86 + "==", "b": "plain"}),
    (logging.INFO, "run", {"a": "plain", "b": "BeArEr token"}),
    (logging.INFO, "run", {"a": "plain", "b": "authorızation: x"}),
    (logging.INFO, "run", {"a": "plain", "n": 5, "f": None, "event": "forged"}),
])
@pytest.mark.parametrize("created", [1_700_000_000.0, 1_700_000_000.9999, 1_700_000_001.5004, 86_399.001])
def test_t_log_2_line_writer_gives_the_formatters_bytes(level: int, name: str, fields: dict[str, object],
                                                        created: float) -> None:
    from appliance.ops.logs import _LineFormat

    record = logging.LogRecord("cell.ops", level, "(ops)", 0, name, None, None)
    record.created = created
    record.msecs = int((created - int(created)) * 1000) + 0.0  # as LogRecord computes it
    record.fields = fields
    expected = JsonFormatter().format(record)
    fmt = _LineFormat("cell.ops")
    assert fmt.line(level, name, fields, created) == expected
    assert fmt.line(level, name, fields, created) == expected  # again, from the cached head and second
    assert "\n" not in expected and expected.isascii()


def test_run_and_request_lines_carry_every_field(tmp_path: Path) -> None:
    """The fields docs/operations.md lists for `run` and `request`, present and in order."""
    path = tmp_path / "cell.log"
    events = OpsLog(log_file=path, stderr=False)
    try:
        events.run({"execution_id": "e", "receipt_seq": 3, "tenant_id": "t", "cell_id": "c", "template": "python3",
                    "status": "ok", "exit_code": 0, "latency_ms": 1.5, "guest_ms": 0.4, "code_bytes": 10,
                    "stdout_bytes": 2, "stderr_bytes": 0, "truncated": False, "denials": []}, "rid")
        events.request(status=200, request_id="rid", method="POST", route="/v1/cells/<cell_id>/exec", tenant_id="t",
                       cell_id="c", latency_ms=2.0, bytes_in=22, bytes_out=300, remote_addr="127.0.0.1",
                       execution_id="e", receipt_seq=3, error_code=None)
    finally:
        events.close()
    run, req = [json.loads(x) for x in path.read_text().splitlines()]
    head = ["time", "level", "logger", "event"]
    assert list(run) == head + ["request_id", "execution_id", "receipt_seq", "tenant_id", "cell_id", "template",
                                "status", "exit_code", "latency_ms", "guest_ms", "code_bytes", "stdout_bytes",
                                "stderr_bytes", "truncated", "denials"]
    assert list(req) == head + ["status", "request_id", "method", "route", "tenant_id", "cell_id", "latency_ms",
                                "bytes_in", "bytes_out", "remote_addr", "execution_id", "receipt_seq", "error_code"]
    assert (run["level"], run["logger"], run["event"], run["denials"]) == ("info", "cell.ops", "run", 0)
    assert (req["level"], req["event"], req["status"]) == ("info", "request", 200)


def test_lines_go_to_stderr_as_it_is_at_the_write(capsys: pytest.CaptureFixture[str]) -> None:
    events = OpsLog()
    try:
        events.request(status=503, request_id="r1", route="/v1/execute")
    finally:
        events.close()
    line = json.loads(capsys.readouterr().err)
    assert (line["event"], line["level"], line["status"]) == ("request", "error", 503)


class _FullDisk:
    """A log file stream on a full disk."""

    def __init__(self, real: Any) -> None:
        self.real = real

    def fileno(self) -> int:
        return int(self.real.fileno())

    def write(self, _text: str) -> int:
        raise OSError(28, "No space left on device")

    def flush(self) -> None:
        pass

    def close(self) -> None:
        self.real.close()


def test_a_failed_log_file_write_does_not_raise(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    events = OpsLog(log_file=tmp_path / "cell.log", stderr=False)
    try:
        events.request(status=200, request_id="r1")
        sink = events._sinks[0]
        sink.stream = _FullDisk(sink.stream)  # type: ignore[union-attr]
        events.request(status=200, request_id="r2")  # reported on stderr, never raised into a request
    finally:
        events.close()
    assert "could not write the log file: OSError" in capsys.readouterr().err
    assert [json.loads(x)["request_id"] for x in (tmp_path / "cell.log").read_text().splitlines()] == ["r1"]


def test_a_line_that_cannot_be_encoded_is_reported_not_raised(tmp_path: Path,
                                                             capsys: pytest.CaptureFixture[str]) -> None:
    loop: dict[str, object] = {}
    loop["self"] = loop
    path = tmp_path / "cell.log"
    events = OpsLog(log_file=path, stderr=False)
    try:
        events.event(logging.INFO, "odd", value=loop)  # never raised into the request that logs it
        events.event(logging.INFO, "next", value=1)
    finally:
        events.close()
    assert "could not format the odd log line" in capsys.readouterr().err
    assert [json.loads(x)["event"] for x in path.read_text().splitlines()] == ["next"]
