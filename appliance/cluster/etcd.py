"""A small client for etcd's v3 JSON gateway (etcd 3.4: ``/v3/...``), standard library only.

Keys and values travel base64-encoded; 64-bit integers come back as JSON
strings. Each call tries the configured endpoints in order and raises
:class:`EtcdUnavailable` when none answers, so callers can fail closed.
"""
from __future__ import annotations

import base64
import json
import urllib.error
import urllib.request
from dataclasses import dataclass
from typing import Any, Sequence

DEFAULT_TIMEOUT_S = 2.0
MAX_ANSWER_BYTES = 16 * 1024 * 1024  # a tenant table far larger than any site's still fits


class EtcdUnavailable(Exception):
    """No endpoint answered, or answered something that is not etcd's JSON."""


@dataclass(frozen=True)
class KeyValue:
    key: str
    value: bytes
    mod_revision: int
    lease: int


def _b64(text: str | bytes) -> str:
    raw = text.encode("utf-8") if isinstance(text, str) else text
    return base64.b64encode(raw).decode("ascii")


def _unb64(text: object) -> bytes:
    if not isinstance(text, str):
        return b""
    return base64.b64decode(text.encode("ascii"), validate=True)


def prefix_end(prefix: str) -> str:
    """The range end that selects every key starting with ``prefix`` (ASCII prefixes only)."""
    raw = prefix.encode("utf-8")
    return (raw[:-1] + bytes([raw[-1] + 1])).decode("utf-8")


class Etcd:
    def __init__(self, endpoints: Sequence[str], timeout_s: float = DEFAULT_TIMEOUT_S) -> None:
        if not endpoints:
            raise ValueError("no etcd endpoints")
        self.endpoints = tuple(e.rstrip("/") for e in endpoints)
        self.timeout_s = timeout_s

    def _call(self, path: str, body: dict[str, Any]) -> dict[str, Any]:
        data = json.dumps(body).encode("utf-8")
        last = "no endpoint"
        for endpoint in self.endpoints:
            req = urllib.request.Request(endpoint + path, data=data, method="POST",
                                         headers={"Content-Type": "application/json"})
            try:
                with urllib.request.urlopen(req, timeout=self.timeout_s) as resp:
                    raw = resp.read(MAX_ANSWER_BYTES + 1)
            except urllib.error.HTTPError as exc:
                detail = exc.read(2048).decode("utf-8", "replace")
                exc.close()
                # etcd answered: a refusal (no such lease, bad request) is not "unavailable".
                raise EtcdError(f"{path}: HTTP {exc.code}: {detail[:300]}") from None
            except (OSError, ValueError) as exc:
                last = f"{endpoint}: {exc}"
                continue
            if len(raw) > MAX_ANSWER_BYTES:
                raise EtcdUnavailable(f"{endpoint}{path}: answer over {MAX_ANSWER_BYTES} bytes")
            try:
                answer = json.loads(raw)
            except ValueError:
                last = f"{endpoint}: not JSON"
                continue
            if not isinstance(answer, dict):
                last = f"{endpoint}: not a JSON object"
                continue
            if "error" in answer and "header" not in answer:
                raise EtcdError(f"{path}: {str(answer.get('error'))[:300]}")
            return answer
        raise EtcdUnavailable(f"etcd unreachable ({last})")

    # -- keys -------------------------------------------------------------
    def get_prefix(self, prefix: str) -> tuple[int, list[KeyValue]]:
        """(store revision, every key under ``prefix``)."""
        answer = self._call("/v3/kv/range", {"key": _b64(prefix), "range_end": _b64(prefix_end(prefix))})
        revision = int(answer.get("header", {}).get("revision", 0))
        out = []
        for kv in answer.get("kvs", []) or []:
            out.append(KeyValue(_unb64(kv.get("key")).decode("utf-8", "replace"), _unb64(kv.get("value")),
                                int(kv.get("mod_revision", 0)), int(kv.get("lease", 0))))
        return revision, out

    def get(self, key: str) -> KeyValue | None:
        answer = self._call("/v3/kv/range", {"key": _b64(key)})
        kvs = answer.get("kvs", []) or []
        if not kvs:
            return None
        kv = kvs[0]
        return KeyValue(key, _unb64(kv.get("value")), int(kv.get("mod_revision", 0)), int(kv.get("lease", 0)))

    def put(self, key: str, value: bytes, lease: int = 0) -> None:
        body: dict[str, Any] = {"key": _b64(key), "value": _b64(value)}
        if lease:
            body["lease"] = str(lease)
        self._call("/v3/kv/put", body)

    def create(self, key: str, value: bytes, lease: int = 0) -> bool:
        """Put ``key`` only if it does not exist; False when it already did."""
        put: dict[str, Any] = {"key": _b64(key), "value": _b64(value)}
        if lease:
            put["lease"] = str(lease)
        answer = self._call("/v3/kv/txn", {
            "compare": [{"key": _b64(key), "target": "CREATE", "result": "EQUAL", "create_revision": "0"}],
            "success": [{"request_put": put}],
        })
        return bool(answer.get("succeeded", False))

    def replace(self, key: str, value: bytes, mod_revision: int) -> bool:
        """Put ``key`` only if nobody changed it since ``mod_revision`` (compare-and-swap)."""
        answer = self._call("/v3/kv/txn", {
            "compare": [{"key": _b64(key), "target": "MOD", "result": "EQUAL", "mod_revision": str(mod_revision)}],
            "success": [{"request_put": {"key": _b64(key), "value": _b64(value)}}],
        })
        return bool(answer.get("succeeded", False))

    def delete(self, key: str) -> int:
        answer = self._call("/v3/kv/deleterange", {"key": _b64(key)})
        return int(answer.get("deleted", 0))

    # -- leases -----------------------------------------------------------
    def grant(self, ttl_s: int) -> int:
        answer = self._call("/v3/lease/grant", {"TTL": str(ttl_s)})
        lease = int(answer.get("ID", 0))
        if lease <= 0:
            raise EtcdError("lease grant returned no id")
        return lease

    def keepalive(self, lease: int) -> int:
        """Renew ``lease``; returns its new TTL (0 or less: etcd no longer has it)."""
        answer = self._call("/v3/lease/keepalive", {"ID": str(lease)})
        result = answer.get("result", answer)
        return int(result.get("TTL", 0)) if isinstance(result, dict) else 0

    def revoke(self, lease: int) -> None:
        self._call("/v3/lease/revoke", {"ID": str(lease)})


class EtcdError(EtcdUnavailable):
    """etcd answered but refused the request."""
