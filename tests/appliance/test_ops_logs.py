"""Structured logs: one JSON object per line, secrets scrubbed, guest text escaped (T-LOG-1, T-LOG-2)."""
from __future__ import annotations

import json
import logging
import os
import stat
from pathlib import Path

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
