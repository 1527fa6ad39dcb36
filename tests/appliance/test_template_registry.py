"""The template registry is the one place that knows the templates: a
template added there alone is offered by the API, OpenAPI, validation and the
workers, end to end on a live server."""
from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from appliance.runtime import templates
from cell_sdk.sandbox import LANGUAGE_TEMPLATES
from tests.liveserver import REPO, ServerProcess, start_server

SITE = Path(__file__).resolve().parents[1] / "fake_template"


def test_sdk_aliases_match_the_registry() -> None:
    # The SDK ships without the appliance, so it carries its own table: it must agree.
    expected = {name: t.name for t in templates.all_templates() for name in (*t.names(), *t.languages)}
    assert LANGUAGE_TEMPLATES == expected


def test_every_alias_and_language_names_one_template() -> None:
    seen: dict[str, str] = {}
    for t in templates.all_templates():
        for name in {*t.names(), *t.languages}:
            assert seen.setdefault(name, t.name) == t.name, f"{name} names two templates"
    assert templates.get(templates.DEFAULT).interpreter


@pytest.fixture(scope="module")
def shout_server(module_cache: None, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    path = os.pathsep.join([str(SITE), str(REPO), os.environ.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    server = start_server(tmp_path_factory.mktemp("shout"), env={"PYTHONPATH": path})
    yield server
    server.stop()


def test_a_template_added_to_the_registry_alone_runs_end_to_end(shout_server: ServerProcess) -> None:
    live = shout_server
    status, listed, _ = live.request("GET", "/v1/templates")
    assert status == 200 and "shout" in {t["name"] for t in listed["templates"]}
    status, spec, _ = live.request("GET", "/v1/openapi.json")
    assert status == 200 and "loud" in str(spec)

    status, cell, _ = live.request("POST", "/v1/cells", {"template": "loud"})
    assert status == 201, cell
    assert cell["template"] == "shout"
    cid = cell["cell_id"]
    status, out, _ = live.request("POST", f"/v1/cells/{cid}/exec", {"code": "x = 'kept'\nprint('hello')"})
    assert status == 200 and out["status"] == "ok" and out["stdout"] == "HELLO\n", out
    status, out, _ = live.request("POST", f"/v1/cells/{cid}/exec", {"code": "print(x)", "language": "shout"})
    assert status == 200 and out["stdout"] == "KEPT\n", out
    status, out, _ = live.request("POST", f"/v1/cells/{cid}/exec", {"code": "1", "language": "javascript"})
    assert status == 400 and out["code"] == "language_mismatch"

    status, once, _ = live.request("POST", "/v1/execute", {"language": "shout", "code": "print('once')"})
    assert status == 200 and once["stdout"] == "ONCE\n", once
    # python3 next to it is untouched.
    status, py, _ = live.request("POST", "/v1/execute", {"template": "python3", "code": "print('quiet')"})
    assert status == 200 and py["stdout"] == "quiet\n"
