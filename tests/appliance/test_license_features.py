"""T-LIC-2: a license grants exactly the features it lists, nothing more.

Each Pro host function is unlocked by the feature of the same name, only on a
valid pro/hub license that lists it; ``multi_tenant`` only on a hub license
that lists it. The tables below sign real licenses, read them through the real
``LicenseManager`` and compile real WAT guests with the resulting feature set;
the live-server row is in ``test_pro_e2e.py``.
"""
from __future__ import annotations

import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from appliance.config import Settings
from appliance.confine import Volume
from appliance.license.manager import LicenseManager
from appliance.license.verify import HOST_FUNCTION_FEATURES
from appliance.runtime import context, modules, profuncs
from appliance.runtime.loader import Runtimes
from appliance.runtime.modules import ModuleRefused, ModuleRunner
from appliance.runtime.worker import grant_pro_resources
from appliance.services import Services
from tests.appliance.test_profuncs import mcp_probe, weights_probe
from tests.factories import NOW, make_keypair, make_license

KP = make_keypair("license-features")
BOTH = frozenset(HOST_FUNCTION_FEATURES)

# (tier, features listed in the signed license, host functions granted, multi_tenant granted)
LICENSES = [
    pytest.param("pro", [], frozenset(), False, id="pro-lists-nothing"),
    pytest.param("pro", ["load_weights"], frozenset({"load_weights"}), False, id="pro-load_weights-only"),
    pytest.param("pro", ["host_mcp_call"], frozenset({"host_mcp_call"}), False, id="pro-host_mcp_call-only"),
    pytest.param("pro", ["load_weights", "host_mcp_call"], BOTH, False, id="pro-both"),
    pytest.param("pro", ["multi_tenant", "load_weights"], frozenset({"load_weights"}), False, id="pro-lists-hub-only-multi_tenant"),
    pytest.param("pro", ["gpu", "load_weights.v2", "host_mcp", "load-weights"], frozenset(), False, id="pro-near-miss-names"),
    pytest.param("hub", ["load_weights", "host_mcp_call"], BOTH, False, id="hub-without-multi_tenant"),
    pytest.param("hub", ["multi_tenant"], frozenset(), True, id="hub-multi_tenant-only"),
    pytest.param("hub", ["multi_tenant", "host_mcp_call"], frozenset({"host_mcp_call"}), True, id="hub-multi_tenant-and-mcp"),
    pytest.param("free", ["load_weights", "host_mcp_call", "multi_tenant"], frozenset(), False, id="free-lists-everything"),
]

ONLY_WEIGHTS = b"""(module
  (import "cell" "load_weights" (func (param i32 i32 i64 i32 i32) (result i32)))
  (memory (export "memory") 1)
  (func (export "run") (result i32) i32.const 0))"""
ONLY_MCP = b"""(module
  (import "cell" "host_mcp_call" (func (param i32 i32 i32 i32) (result i32)))
  (memory (export "memory") 1)
  (func (export "run") (result i32) i32.const 0))"""
# Which functions each guest imports: one, the other, or both (the Pro probe of test_profuncs).
GUESTS = [
    pytest.param(ONLY_WEIGHTS, frozenset({"load_weights"}), id="imports-load_weights"),
    pytest.param(ONLY_MCP, frozenset({"host_mcp_call"}), id="imports-host_mcp_call"),
    pytest.param(weights_probe("model.bin"), BOTH, id="imports-both"),
]


@pytest.fixture
def settings(tmp_path: Path) -> Settings:
    return Settings(root=tmp_path / "root", config_dir=tmp_path / "etc", license_path=tmp_path / "etc" / "license.json")


def licensed(settings: Settings, tier: str, features: list[str]) -> LicenseManager:
    settings.license_path.parent.mkdir(parents=True, exist_ok=True)
    settings.license_path.write_bytes(make_license(KP.signing_key, KP.key_id, tier=tier, features=features))
    m = LicenseManager(settings, keys=KP.keys, clock=lambda: NOW, machine_id=None,
                       revocations=lambda _l: False, revoked_keys=lambda _k: False)
    assert m.current().tier == tier, m.current().reason
    return m


@pytest.fixture(scope="module")
def runner() -> Iterator[ModuleRunner]:
    rt = Runtimes(Path(tempfile.mkdtemp(prefix="cell-features-cache-")))
    yield ModuleRunner(rt.engine, rt.base_linker)
    rt.close()


def test_t_lic_2_feature_names_are_the_pro_host_functions() -> None:
    assert HOST_FUNCTION_FEATURES == profuncs.FUNCTIONS == modules.PRO_FUNCTIONS


@pytest.mark.parametrize("tier,features,granted,multi_tenant", LICENSES)
def test_t_lic_2_license_grants_exactly_the_listed_features(settings: Settings, tier: str, features: list[str],
                                                           granted: frozenset[str], multi_tenant: bool) -> None:
    m = licensed(settings, tier, features)
    assert m.granted(HOST_FUNCTION_FEATURES) == granted
    for name in HOST_FUNCTION_FEATURES:
        assert m.allows(name) is (name in granted)
    assert m.allows("multi_tenant") is multi_tenant
    # What the web process asks before its hub-only multi-tenant mode (per-tenant buckets).
    services = Services(settings, None, None, None, None, None, license=m)  # type: ignore[arg-type]
    assert services.allows("multi_tenant") is multi_tenant


@pytest.mark.parametrize("guest,imports", GUESTS)
@pytest.mark.parametrize("tier,features,granted,multi_tenant", LICENSES)
def test_t_lic_2_guest_importing_an_unlisted_function_is_refused(runner: ModuleRunner, settings: Settings, tier: str,
                                                                 features: list[str], granted: frozenset[str],
                                                                 multi_tenant: bool, guest: bytes,
                                                                 imports: frozenset[str]) -> None:
    m = licensed(settings, tier, features)
    if imports <= granted:
        assert runner.compile(guest, True, 8 << 20, m.granted(HOST_FUNCTION_FEATURES)) is not None
        return
    with pytest.raises(ModuleRefused) as info:
        runner.compile(guest, True, 8 << 20, m.granted(HOST_FUNCTION_FEATURES))
    missing = sorted(imports - granted)
    assert (info.value.status, info.value.code) == (403, "license_required")
    assert any(f"cell.{name}" in info.value.message and f"{name} feature" in info.value.message for name in missing)


def test_t_lic_2_cached_module_is_rechecked_against_the_current_features(runner: ModuleRunner) -> None:
    # A module compiled while both features were granted is refused once the license drops one.
    runner.compile(ONLY_MCP, True, 8 << 20, BOTH)
    with pytest.raises(ModuleRefused) as info:
        runner.compile(ONLY_MCP, True, 8 << 20, frozenset({"load_weights"}))
    assert info.value.code == "license_required"


@pytest.mark.parametrize("features,weights_code,mcp_denied", [
    pytest.param(frozenset({"load_weights"}), 6, True, id="load_weights-only"),
    pytest.param(frozenset({"host_mcp_call"}), -1, False, id="host_mcp_call-only"),
    pytest.param(frozenset(), -1, True, id="none"),
])
def test_t_lic_2_worker_hands_each_resource_only_with_its_feature(runner: ModuleRunner, tmp_path: Path,
                                                                  features: frozenset[str], weights_code: int,
                                                                  mcp_denied: bool) -> None:
    """Defence in depth: even a module that got past the import check finds no resource it was not granted."""
    (tmp_path / "weights").mkdir()
    (tmp_path / "weights" / "model.bin").write_bytes(b"WEIGHT")
    cell = tmp_path / "cell"
    cell.mkdir(mode=0o700)
    sentinel: Any = object()  # stands for the worker's MCP client; never called when withheld
    with Volume(str(tmp_path / "weights")) as weights:
        ctx = context.RunContext(governor=None, tenant_id="t", cell_id="c")  # type: ignore[arg-type]
        grant_pro_resources(ctx, features, weights, sentinel)
        assert (ctx.mcp is None) is mcp_denied
        module = runner.compile(weights_probe("model.bin"), True, 8 << 20, True)  # import check bypassed on purpose
        with Volume(str(cell)) as vol:
            ctx.volume = vol
            out = runner.run(module, str(cell), ctx, 5.0, 64 << 20, 1 << 20, None)
    assert out.exit_code == weights_code
    if weights_code == -1:
        assert [(d["threat"], d["reason"]) for d in out.denials] == [("T-PRO-1", "weights_off")]
    if mcp_denied:
        ctx2 = context.RunContext(governor=None, tenant_id="t", cell_id="c")  # type: ignore[arg-type]
        grant_pro_resources(ctx2, features, None, sentinel)
        module = runner.compile(mcp_probe({"server": "x", "tool": "y", "arguments": {}}), True, 8 << 20, True)
        with Volume(str(cell)) as vol:
            ctx2.volume = vol
            out = runner.run(module, str(cell), ctx2, 5.0, 64 << 20, 1 << 20, None)
        assert out.exit_code == -1 and [(d["threat"], d["reason"]) for d in out.denials] == [("T-PRO-2", "mcp_off")]
