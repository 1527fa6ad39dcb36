"""Before a template runs, its runtime must match its built-in pin or a
verified registry target; otherwise runs are refused with
template_untrusted (T-SUPPLY-1)."""
from __future__ import annotations

import dataclasses
import hashlib
import multiprocessing
from pathlib import Path

import pytest
import wasmtime

from appliance.runtime import templates
from appliance.runtime.loader import Runtimes
from appliance.runtime.modules import ModuleRefused
from tests import guests
from tests.in_process import worker_config


def _swap_js_runtime(monkeypatch: pytest.MonkeyPatch, replacement: Path) -> None:
    real = templates.find_runtime

    def fake(template: str) -> templates.Runtime:
        rt = real(template)
        return dataclasses.replace(rt, wasm=replacement) if template == "javascript" else rt

    monkeypatch.setattr(templates, "find_runtime", fake)


def test_t_supply_1_tampered_runtime_is_untrusted(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    tampered = tmp_path / "qjs.wasm"
    data = bytearray(templates.find_runtime("javascript").wasm.read_bytes())
    data[len(data) // 2] ^= 0x01
    tampered.write_bytes(bytes(data))
    _swap_js_runtime(monkeypatch, tampered)
    rt = Runtimes(tmp_path / "cache" / "modules")
    try:
        with pytest.raises(templates.TemplateUntrusted) as info:
            rt.get("javascript")
        assert info.value.sha256 == hashlib.sha256(bytes(data)).hexdigest()
    finally:
        rt.close()


def test_t_supply_1_runtime_listed_by_the_verified_registry_is_accepted(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    other = tmp_path / "other.wasm"
    other.write_bytes(wasmtime.wat2wasm(guests.wat("hello_wasi.wat")))
    digest = hashlib.sha256(other.read_bytes()).hexdigest()
    _swap_js_runtime(monkeypatch, other)
    rt = Runtimes(tmp_path / "cache" / "modules", registry_hashes=lambda t: {digest} if t == "javascript" else set())
    try:
        assert rt.get("javascript").module is not None
    finally:
        rt.close()


def test_t_supply_1_worker_refuses_runs_of_an_untrusted_template(module_cache: None, tmp_path: Path,
                                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    from appliance.runtime.protocol import ExecRequest
    from appliance.runtime.worker import Worker

    tampered = tmp_path / "qjs.wasm"
    tampered.write_bytes(b"\0asm\1\0\0\0" + b"not the runtime")
    _swap_js_runtime(monkeypatch, tampered)
    parent, child = multiprocessing.Pipe()
    config = worker_config(tmp_path, warm_python=0, warm_javascript=1)
    worker = Worker(child, config)
    try:
        assert "javascript" in worker.untrusted and "python3" not in worker.untrusted
        with pytest.raises(ModuleRefused) as info:
            worker.handle(ExecRequest(1, template="javascript", code=b"1", is_text=True, timeout_ms=1000, memory_mb=256,
                                      tenant_id="t"))
        assert (info.value.status, info.value.code) == (403, "template_untrusted")
        ok = worker.handle(ExecRequest(2, template="python3", code=b"print(1)", is_text=True, timeout_ms=5000,
                                       memory_mb=256, tenant_id="t"))
        assert ok.outcome.stdout == "1\n"
    finally:
        worker.runtimes.close()
        parent.close()
        child.close()
