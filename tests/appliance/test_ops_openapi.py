"""The OpenAPI description stays true: every Flask route and method is in it,
every documented path is a route, every error answer has the one shape and a
documented status, and a bounded property-based run on a live server finds no 500."""
from __future__ import annotations

import json
import re
import time
import urllib.parse
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings, strategies as st

from appliance.config import Settings
from appliance.ops.openapi import build_spec, flask_rule_to_path
from appliance.ops.web import register_ops
from appliance.web.app import create_app
from tests.liveserver import ServerProcess

SPEC = build_spec()
METHODS = {"get", "post", "put", "delete", "patch"}
# Flask adds a static-file route to every app; the appliance ships no static files.
# /mcp speaks JSON-RPC (the MCP specification describes it, docs/mcp.md shows
# it), not the JSON-in, {error, code}-out shape this document describes.
IGNORED_ENDPOINTS = {"static", "mcp.mcp_get", "mcp.mcp_post", "mcp.mcp_delete"}


def _resolve(node: dict[str, Any]) -> dict[str, Any]:
    while "$ref" in node:
        parts = node["$ref"].removeprefix("#/").split("/")
        target: Any = SPEC
        for p in parts:
            target = target[p]
        node = target
    return node


def validate(instance: Any, schema: dict[str, Any], where: str = "$") -> None:
    """Enough JSON Schema for this spec: type, const, enum, required, properties,
    additionalProperties, items, pattern, $ref, oneOf."""
    schema = _resolve(schema)
    if "oneOf" in schema:
        errors = []
        for option in schema["oneOf"]:
            try:
                validate(instance, option, where)
                return
            except AssertionError as e:
                errors.append(str(e))
        raise AssertionError(f"{where}: matches no oneOf option: {errors}")
    kinds = {"object": dict, "array": list, "string": str, "boolean": bool, "null": type(None)}
    if "type" in schema:
        types = schema["type"] if isinstance(schema["type"], list) else [schema["type"]]
        ok = any((t == "integer" and isinstance(instance, int) and not isinstance(instance, bool))
                 or (t == "number" and isinstance(instance, (int, float)) and not isinstance(instance, bool))
                 or (t in kinds and isinstance(instance, kinds[t])) for t in types)
        assert ok, f"{where}: {instance!r} is not {types}"
    if "const" in schema:
        assert instance == schema["const"], f"{where}: {instance!r} != {schema['const']!r}"
    if "enum" in schema:
        assert instance in schema["enum"], f"{where}: {instance!r} not in {schema['enum']}"
    if "pattern" in schema and isinstance(instance, str):
        assert re.search(schema["pattern"], instance), f"{where}: {instance!r} !~ {schema['pattern']}"
    if isinstance(instance, dict):
        for key in schema.get("required", []):
            assert key in instance, f"{where}: missing {key}"
        props = schema.get("properties", {})
        for key, value in instance.items():
            if key in props:
                validate(value, props[key], f"{where}.{key}")
            elif schema.get("additionalProperties") is False:
                raise AssertionError(f"{where}: unexpected {key}")
    if isinstance(instance, list) and "items" in schema:
        for i, item in enumerate(instance):
            validate(item, schema["items"], f"{where}[{i}]")


def _light_app(tmp_path: Path) -> Any:
    """The real factory with stand-in services: enough to list routes."""
    from mirror.registry import Mirror

    fake = SimpleNamespace(settings=Settings(root=tmp_path), cells=SimpleNamespace(observers=[]),
                           mirror=Mirror(tmp_path / "mirror"))
    app = create_app(fake)
    state = register_ops(app, fake, log_stderr=False)
    return app, state


def test_every_route_and_method_is_described(tmp_path: Path) -> None:
    app, state = _light_app(tmp_path)
    try:
        routes: set[tuple[str, str]] = set()
        for rule in app.url_map.iter_rules():
            if rule.endpoint in IGNORED_ENDPOINTS:
                continue
            for method in rule.methods or ():
                if method.lower() in METHODS:
                    routes.add((flask_rule_to_path(rule.rule), method.lower()))
        described = {(path, m) for path, item in SPEC["paths"].items() for m in item if m in METHODS}
        assert routes - described == set(), "routes missing from the OpenAPI description"
        assert described - routes == set(), "described operations that are not routes"
    finally:
        state.close()


def test_every_error_response_is_the_one_error_shape() -> None:
    for path, item in SPEC["paths"].items():
        for method, op in item.items():
            if method not in METHODS:
                continue
            assert op["operationId"]
            for status, response in op["responses"].items():
                if int(status) >= 400:
                    body = _resolve(response)["content"]["application/json"]["schema"]
                    assert body == {"$ref": "#/components/schemas/Error"}, (path, method, status)
                if status in ("429", "503"):
                    assert "Retry-After" in _resolve(response)["headers"]
            for param in item.get("parameters", []):
                if param["in"] == "path":
                    assert "{" + param["name"] + "}" in path


def test_spec_is_json_and_3_1() -> None:
    assert json.loads(json.dumps(SPEC))["openapi"] == "3.1.0"


# -- against a live server ---------------------------------------------------

def _operations() -> list[tuple[str, str, dict[str, Any], list[dict[str, Any]]]]:
    out = []
    for path, item in SPEC["paths"].items():
        for method, op in item.items():
            if method in METHODS:
                out.append((path, method, op, item.get("parameters", []) + op.get("parameters", [])))
    return out


OPERATIONS = _operations()
# Found by this test, owned by the runtime: creating a python3/javascript cell
# (or a one-shot run) with memory_mb below what the interpreter needs answers
# 500 WasmtimeError instead of a 400. Set False once that is fixed.
KNOWN_500_SMALL_MEMORY = False
_JSON_LEAF = st.one_of(st.none(), st.booleans(), st.integers(-2**40, 2**40), st.text(max_size=20))
JUNK = st.recursive(_JSON_LEAF, lambda inner: st.one_of(st.lists(inner, max_size=3),
                                                        st.dictionaries(st.text(max_size=8), inner, max_size=3)),
                    max_leaves=6)


def _from_schema(schema: dict[str, Any]) -> st.SearchStrategy[Any]:
    schema = _resolve(schema)
    if "const" in schema:
        return st.just(schema["const"])
    if "enum" in schema:
        return st.sampled_from(schema["enum"])
    if "oneOf" in schema:
        return st.one_of([_from_schema(s) for s in schema["oneOf"]])
    kind = schema.get("type")
    if kind == "object":
        props = schema.get("properties", {})
        required = set(schema.get("required", []))
        return st.fixed_dictionaries({k: _from_schema(v) for k, v in props.items() if k in required},
                                     optional={k: _from_schema(v) for k, v in props.items() if k not in required})
    if kind == "integer":
        return st.integers(schema.get("minimum", -10), schema.get("maximum", 10**6))
    if kind == "boolean":
        return st.booleans()
    if kind == "string":
        # Paths and code: plain text, traversal attempts and tiny programs.
        return st.one_of(st.text(max_size=24), st.sampled_from(["../../etc/passwd", "/data/a.txt", "a/b", "print(1)",
                                                                "console.log(1)", "(module)", "\u0000", "%2e%2e/x"]))
    return JUNK


def _param_value(param: dict[str, Any], live_cell: str) -> st.SearchStrategy[str]:
    if param["in"] == "path" and param["name"] == "cell_id":
        return st.one_of(st.just(live_cell), st.text(min_size=1, max_size=70))
    return st.text(min_size=1, max_size=40)


@pytest.fixture(scope="module")
def live_cell(live: ServerProcess) -> str:
    status, body, _ = live.request("POST", "/v1/cells", {"template": "python3"})
    assert status == 201, body
    return str(body["cell_id"])


def test_property_based_run_finds_no_500_and_answers_match_the_spec(live: ServerProcess, live_cell: str) -> None:
    deadline = time.monotonic() + 60  # bounded: ~60 s on any machine
    seen: list[tuple[str, str, int]] = []
    # Until `cell serve` calls register_ops, the live server has no ops routes;
    # describe-and-check them here only once they are wired in.
    wired = live.request("GET", "/v1/openapi.json")[0] == 200
    operations = [o for o in OPERATIONS if wired or "ops" not in o[2].get("tags", []) or o[0] == "/healthz"]

    @st.composite
    def requests(draw: st.DrawFn) -> tuple[str, str, dict[str, Any], Any, dict[str, str]]:
        path, method, op, params = draw(st.sampled_from(operations))
        url = path
        query: dict[str, str] = {}
        for p in params:
            if p["in"] == "path":
                url = url.replace("{" + p["name"] + "}", urllib.parse.quote(draw(_param_value(p, live_cell)), safe=""))
            elif p["in"] == "query" and (p.get("required") or draw(st.booleans())):
                query[p["name"]] = draw(st.one_of(st.text(max_size=20), st.sampled_from(["1", "0", "-1", "x", "/data"])))
        body = None
        if "requestBody" in op:
            schema = op["requestBody"]["content"]["application/json"]["schema"]
            body = draw(st.one_of(_from_schema(schema), JUNK))
        return method.upper(), url + ("?" + urllib.parse.urlencode(query) if query else ""), op, body, query

    @settings(max_examples=250, deadline=None, database=None,
              suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much])
    @given(requests())
    def run(req: tuple[str, str, dict[str, Any], Any, dict[str, str]]) -> None:
        if time.monotonic() > deadline:
            return
        method, url, op, body, _ = req
        if KNOWN_500_SMALL_MEMORY and isinstance(body, dict) and isinstance(body.get("memory_mb"), int) \
                and body["memory_mb"] < 64 and body.get("template", "python3") != "wasm":
            body["memory_mb"] = 64
        if "stream" in url or url.startswith("/metrics") or url.startswith("/v1/openapi"):
            body = body if isinstance(body, dict) else {}
        raw = json.dumps(body).encode() if body is not None else None
        status, answer, headers = live.request(method, url, raw=raw, timeout=60)
        seen.append((method, url, status))
        assert status < 500, (method, url, body, status, answer)
        documented = op["responses"]
        if status >= 400 and isinstance(answer, dict):
            validate(answer, {"$ref": "#/components/schemas/Error"})
            assert str(status) in documented or status == 405, (method, url, status, answer)

    run()
    assert len(seen) >= 20
    assert any(s < 300 for _, _, s in seen)
