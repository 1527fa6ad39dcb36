"""Request-body validation for the v1 API. Every field is checked; anything
unexpected is a 400 with a machine code, never a traceback."""
from __future__ import annotations

import base64
import binascii
import re
from typing import Any

from appliance.config import Settings
from appliance.errors import BadRequest
from appliance.runtime import templates

ENV_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]{0,127}$")
META_KEY = re.compile(r"^[A-Za-z0-9_.:-]{1,64}$")
MAX_ENVS = 64
MAX_META = 32
MAX_VALUE = 4096


def obj(body: Any) -> dict[str, Any]:
    if not isinstance(body, dict):
        raise BadRequest("the request body must be a JSON object", code="invalid_json")
    return body


def unknown_fields(body: dict[str, Any], allowed: set[str]) -> None:
    extra = sorted(set(body) - allowed)
    if extra:
        raise BadRequest(f"unknown field(s): {', '.join(extra)}", code="unknown_field")


def template(value: Any) -> str:
    if not isinstance(value, str) or value not in templates.aliases():
        raise BadRequest(f"template must be one of {templates.described()}", code="unknown_template")
    return templates.aliases()[value]


def template_or_language(body: dict[str, Any]) -> str:
    """/v1/execute names its template, or only the language of its code."""
    if "template" in body or "language" not in body:
        return template(body.get("template", templates.DEFAULT))
    language = body["language"]
    try:
        return templates.for_language(language.lower()).name if isinstance(language, str) else template(language)
    except templates.UnknownTemplate:
        raise BadRequest(f"language {language[:40]!r} is not offered; templates are {templates.described()}",
                         code="unknown_template") from None


def int_field(body: dict[str, Any], name: str, default: int, lo: int, hi: int) -> int:
    value = body.get(name, default)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, int):
        raise BadRequest(f"{name} must be an integer", code="invalid_field")
    if not lo <= value <= hi:
        raise BadRequest(f"{name} must be between {lo} and {hi}", code="out_of_range")
    return value


def bool_field(body: dict[str, Any], name: str, default: bool) -> bool:
    value = body.get(name, default)
    if not isinstance(value, bool):
        raise BadRequest(f"{name} must be true or false", code="invalid_field")
    return value


def string_map(body: dict[str, Any], name: str, key_re: re.Pattern[str], limit: int) -> dict[str, str]:
    value = body.get(name)
    if value is None:
        value = {}  # absent or null: none given ([] or false is not "none": refused below)
    if not isinstance(value, dict) or len(value) > limit:
        raise BadRequest(f"{name} must be an object of at most {limit} string values", code="invalid_field")
    out: dict[str, str] = {}
    for k, v in value.items():
        if not isinstance(k, str) or not key_re.match(k):
            raise BadRequest(f"{name}: invalid key {k!r}", code="invalid_field")
        if not isinstance(v, str) or len(v) > MAX_VALUE or "\x00" in v:
            raise BadRequest(f"{name}.{k} must be a string without NUL, at most {MAX_VALUE} characters", code="invalid_field")
        out[k] = v
    return out


# Fields the original Synapse client (and E2B-shaped code) sends on create; each
# is given its honest meaning on Cell or refused by name (docs/migrating-from-e2b.md).
COMPAT_CREATE_FIELDS = {"secure", "allow_internet_access", "network", "volume_mounts", "lifecycle", "volume_id"}
_ALL_ADDRESSES = {"0.0.0.0/0", "::/0"}


def not_offered(field: str, why: str) -> BadRequest:
    return BadRequest(f"{field}: {why}", code="not_offered")


def secure(body: dict[str, Any]) -> None:
    value = body.get("secure", True)
    if not isinstance(value, bool):
        raise BadRequest("secure must be true or false", code="invalid_field")
    if not value:
        raise BadRequest("secure: Cell always runs code in its WebAssembly sandbox; secure=false is not offered",
                         code="secure_required")


def network_denies_all(value: Any) -> bool:
    """E2B network options: True when they deny all egress. Cell has no inbound
    traffic and no per-cell allow lists (egress is the node's policy, T-SSRF-1),
    so only what narrows to nothing or states the default is accepted."""
    if value is None:
        return False
    if not isinstance(value, dict):
        raise BadRequest("network must be an object", code="invalid_field")
    for key in sorted(value):
        if key not in ("deny_out", "allow_out", "allow_public_traffic", "mask_request_host"):
            raise BadRequest(f"network: unknown field {str(key)[:40]!r}", code="unknown_field")
    if value.get("allow_out"):
        raise not_offered("network.allow_out", "per-cell allow lists are not offered; the node's egress policy "
                          "(egress_allow) applies to every cell, and allow_internet_access=false turns it off for one")
    if value.get("allow_public_traffic", False) is not False:
        raise not_offered("network.allow_public_traffic", "a cell takes no inbound traffic; only false is accepted")
    if value.get("mask_request_host") is not None:
        raise not_offered("network.mask_request_host", "a cell takes no inbound traffic")
    deny = value.get("deny_out")
    if deny is None or deny == []:
        return False
    if not isinstance(deny, list) or not all(isinstance(d, str) for d in deny):
        raise BadRequest("network.deny_out must be a list of CIDR strings", code="invalid_field")
    if not set(deny) <= _ALL_ADDRESSES or "0.0.0.0/0" not in deny:
        raise not_offered("network.deny_out", "per-cell deny lists are not offered; deny_out [\"0.0.0.0/0\"] "
                          "(no egress for this cell) is, and so is allow_internet_access=false")
    return True


def lifecycle(value: Any) -> None:
    if value is None:
        return
    if not isinstance(value, dict):
        raise BadRequest("lifecycle must be an object", code="invalid_field")
    for key in sorted(value):
        if key not in ("on_timeout", "auto_resume"):
            raise BadRequest(f"lifecycle: unknown field {str(key)[:40]!r}", code="unknown_field")
    if value.get("on_timeout", "kill") != "kill":
        raise not_offered("lifecycle.on_timeout", "Cell has no pause; an idle cell is deleted when its timeout "
                          "passes (on_timeout \"kill\")")
    if value.get("auto_resume", False) is not False:
        raise not_offered("lifecycle.auto_resume", "Cell has no pause, so there is nothing to resume")


def internet(body: dict[str, Any]) -> bool | None:
    """The cell's own egress switch: None (not given: the node's policy), False
    (none for this cell) or True (asks for the node's policy; refused later
    with 403 egress_disabled when the node has egress off)."""
    value = body.get("allow_internet_access")
    if value is not None and not isinstance(value, bool):
        raise BadRequest("allow_internet_access must be true or false", code="invalid_field")
    if network_denies_all(body.get("network")):
        if value is True:
            raise BadRequest("allow_internet_access=true contradicts network.deny_out 0.0.0.0/0", code="invalid_field")
        return False
    return value


def cell_create(body: dict[str, Any], s: Settings) -> dict[str, Any]:
    unknown_fields(body, {"template", "timeout_ms", "persistent", "metadata", "envs", "memory_mb"} | COMPAT_CREATE_FIELDS)
    secure(body)
    if body.get("volume_id") is not None:
        raise not_offered("volume_id", "Cell has no named volumes; each cell has its own volume at /data, removed with "
                          "the cell (write and read it with the /files routes)")
    mounts = body.get("volume_mounts")
    if mounts is not None and not isinstance(mounts, (list, dict)):
        raise BadRequest("volume_mounts must be a list", code="invalid_field")
    if mounts:
        raise not_offered("volume_mounts", "Cell mounts only the cell's own volume, at /data; named volumes are not offered")
    lifecycle(body.get("lifecycle"))
    return {
        "template": template(body.get("template", templates.DEFAULT)),
        "timeout_ms": int_field(body, "timeout_ms", s.cell_timeout_ms, 1000, s.cell_timeout_ceiling_ms),
        "persistent": bool_field(body, "persistent", True),
        "metadata": string_map(body, "metadata", META_KEY, MAX_META),
        "envs": string_map(body, "envs", ENV_NAME, MAX_ENVS),
        "memory_mb": int_field(body, "memory_mb", s.memory_mb, 16, s.memory_ceiling_mb),
        "allow_internet_access": internet(body),
    }


def code_of(body: dict[str, Any], tmpl: str) -> tuple[bytes, bool]:
    """(code bytes as hashed in the receipt, whether it is WAT text)."""
    code, b64 = body.get("code"), body.get("code_b64")
    if isinstance(code, dict):  # {"code": {"code_b64": ...}} form of README, "The API at a glance"
        b64, code = code.get("code_b64"), None
    if (code is None) == (b64 is None):
        raise BadRequest("give exactly one of code or code_b64", code="invalid_field")
    if b64 is not None:
        if templates.get(tmpl).interpreter:
            raise BadRequest("code_b64 is only for wasm modules", code="invalid_field")
        if not isinstance(b64, str):
            raise BadRequest("code_b64 must be a base64 string", code="invalid_field")
        try:
            return base64.b64decode(b64, validate=True), False
        except (binascii.Error, ValueError):
            raise BadRequest("code_b64 is not valid base64", code="invalid_base64") from None
    if not isinstance(code, str):
        raise BadRequest("code must be a string", code="invalid_field")
    try:
        data = code.encode("utf-8")
    except UnicodeEncodeError:
        raise BadRequest("code must be valid UTF-8 text", code="invalid_field") from None
    return data, not templates.get(tmpl).interpreter


def run_envs(body: dict[str, Any]) -> dict[str, str]:
    """A run's own ``envs`` (E2B's ``run_code(envs=)``; an exec, a one-shot
    run, the MCP ``run_code`` tool): the same rules as a cell's, and each value
    must be valid UTF-8 text (no lone surrogate). T-ENV-1: an error names the
    variable, never its value (values may be secrets)."""
    envs = string_map(body, "envs", ENV_NAME, MAX_ENVS)
    for k, v in envs.items():
        try:
            v.encode("utf-8")
        except UnicodeEncodeError:
            raise BadRequest(f"envs.{k} is not valid UTF-8 text", code="invalid_field") from None
    return envs


def exec_body(body: dict[str, Any], tmpl: str, s: Settings) -> dict[str, Any]:
    unknown_fields(body, {"code", "code_b64", "language", "timeout_ms", "envs"})
    language = body.get("language")
    if language is not None and not isinstance(language, str):
        raise BadRequest("language must be a string", code="invalid_field")
    code, is_text = code_of(body, tmpl)
    return {"code": code, "is_text": is_text, "language": language.lower() if language else None,
            "timeout_ms": int_field(body, "timeout_ms", s.run_timeout_ms, 10, s.run_timeout_ceiling_ms),
            "envs": run_envs(body)}


def execute_body(body: dict[str, Any], s: Settings) -> dict[str, Any]:
    unknown_fields(body, {"template", "code", "code_b64", "stdin", "timeout_ms", "memory_mb", "language", "envs"})
    tmpl = template_or_language(body)
    code, is_text = code_of(body, tmpl)
    stdin = body.get("stdin")
    if stdin is not None and (not isinstance(stdin, str) or len(stdin) > 1_000_000):
        raise BadRequest("stdin must be a string of at most 1,000,000 characters", code="invalid_field")
    return {
        "template": tmpl, "code": code, "is_text": is_text,
        "stdin": stdin.encode("utf-8") if stdin else None,
        "timeout_ms": int_field(body, "timeout_ms", s.run_timeout_ms, 10, s.run_timeout_ceiling_ms),
        "memory_mb": int_field(body, "memory_mb", s.memory_mb, 16, s.memory_ceiling_mb),
        "envs": run_envs(body),
    }


def file_content(body: dict[str, Any]) -> tuple[str, bytes]:
    unknown_fields(body, {"path", "content", "encoding"})
    path, content, encoding = body.get("path"), body.get("content"), body.get("encoding", "utf-8")
    if not isinstance(path, str):
        raise BadRequest("path must be a string", code="bad_path")
    if not isinstance(content, str):
        raise BadRequest("content must be a string", code="invalid_field")
    if encoding == "base64":
        try:
            return path, base64.b64decode(content, validate=True)
        except (binascii.Error, ValueError):
            raise BadRequest("content is not valid base64", code="invalid_base64") from None
    if encoding not in ("utf-8", "utf8", "text"):
        raise BadRequest("encoding must be utf-8 or base64", code="invalid_field")
    try:
        return path, content.encode("utf-8")
    except UnicodeEncodeError:  # a lone surrogate sent as \ud800 in JSON
        raise BadRequest("content is not valid UTF-8 text; send it with encoding base64", code="invalid_field") from None
