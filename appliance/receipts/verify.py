"""Offline verifier for Cell receipts — standalone: Python stdlib + PyNaCl only.

An auditor can copy this single file and run

    python verify.py export.jsonl [--public-key HEX] [--checkpoint OLD.json]
    python verify.py --db cell.sqlite --public-key HEX
    python verify.py --answer answer.json --public-key HEX

It exits 0 when every check passes and 1 naming the first problem: a receipt
whose v1 hash does not match its fields (an edited field), a deleted row, a
reordering, a truncated tail, a bad signature, an unknown schema, a checkpoint
that does not match the log (threat T-RCPT-1, tampering or deletion), or a
receipt moved to another tenant or cell (T-RCPT-2: the signed envelope).

It deliberately imports nothing from ``appliance``: the v1 hash rules below are
a few-line copy of ``appliance/receipts/v1.py``, ``envelope.py`` and
``merkle.py``, and a test pins that they agree. The export format is described
in docs/receipts.md.
"""
from __future__ import annotations

import argparse
import base64
import binascii
import hashlib
import json
import re
import sqlite3
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Mapping, Sequence

import nacl.exceptions
import nacl.signing

KNOWN_SCHEMAS = ("v1",)
EXPORT_FORMAT = "cell-receipts-export/2"
# Pre-envelope exports: rows signed over chain_hash only, unsigned trailer.
LEGACY_EXPORT_FORMAT = "cell-receipts-export/1"
ENVELOPE = "cell-receipt-envelope/1"
SEAL = "cell-export-seal/1"
RESULTS_EXTENSION = "results/1"
KNOWN_EXTENSIONS: frozenset[str] = frozenset({RESULTS_EXTENSION})  # copy of envelope.KNOWN_EXTENSIONS
GENESIS = "0" * 64
RECEIPT_FIELDS = (
    "schema", "execution_id", "code_hash", "result_hash", "template", "timestamp",
    "receipt_hash", "seq", "prev_chain_hash", "chain_hash", "signature", "key_id", "cell_id",
)
# Carried by every enveloped receipt (envelope is null on a pre-envelope one).
BINDING_FIELDS = ("tenant_id", "envelope", "extensions")
SEAL_FIELDS = ("seal", "count", "last_chain_hash", "root_hash", "timestamp", "key_id")

# --- copy of the v1 rules (appliance/receipts/v1.py is the source; tests pin agreement) ---
_UUID4 = re.compile(r"[0-9a-f]{8}-[0-9a-f]{4}-4[0-9a-f]{3}-[89ab][0-9a-f]{3}-[0-9a-f]{12}")
_HEX64 = re.compile(r"[0-9a-f]{64}")
_HEX16 = re.compile(r"[0-9a-f]{16}")
_TEMPLATE = re.compile(r"[a-z0-9_-]{1,64}")
_ID = re.compile(r"[A-Za-z0-9_-]{1,64}")


def _sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _v1_field_error(r: Mapping[str, Any]) -> str | None:
    """Name the first v1 field that breaks its format, so no field can hide a '|'."""
    ts = r.get("timestamp")
    checks = (
        ("execution_id", isinstance(r.get("execution_id"), str) and _UUID4.fullmatch(r["execution_id"])),
        ("code_hash", isinstance(r.get("code_hash"), str) and _HEX64.fullmatch(r["code_hash"])),
        ("result_hash", isinstance(r.get("result_hash"), str) and _HEX64.fullmatch(r["result_hash"])),
        ("template", isinstance(r.get("template"), str) and _TEMPLATE.fullmatch(r["template"])),
        ("timestamp", type(ts) is int and 0 <= ts < 2**63),
    )
    return next((name for name, ok in checks if not ok), None)


def v1_receipt_hash(r: Mapping[str, Any]) -> str:
    pre = f"{r['execution_id']}|{r['code_hash']}|{r['result_hash']}|{r['template']}|{r['timestamp']}"
    return _sha(pre.encode("utf-8"))


def chain_hash(prev: str, receipt_hash: str) -> str:
    return _sha(f"{prev}|{receipt_hash}".encode("ascii"))


def checkpoint_message(cp: Mapping[str, Any]) -> bytes:
    return f"cell-checkpoint/v1|{cp['count']}|{cp['root_hash']}|{cp['timestamp']}|{cp['key_id']}".encode("ascii")


def canonical_json(obj: Mapping[str, Any]) -> bytes:
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=False).encode("utf-8")


def envelope_message(r: Mapping[str, Any]) -> bytes:
    """What the node signs for an enveloped receipt (copy of envelope.envelope_message)."""
    return canonical_json({
        "envelope": r["envelope"], "schema": r["schema"], "seq": r["seq"], "receipt_hash": r["receipt_hash"],
        "chain_hash": r["chain_hash"], "tenant_id": r["tenant_id"], "cell_id": r["cell_id"],
        "key_id": r["key_id"], "extensions": r["extensions"],
    })


def v1_result_hash(answer: Mapping[str, Any]) -> str:
    """result_hash of an answer's exit_code, status, stderr and stdout (copy of v1.result_hash)."""
    body = {k: answer[k] for k in ("exit_code", "status", "stderr", "stdout")}
    return _sha(json.dumps(body, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode("utf-8"))


def results_hash(results: Sequence[Mapping[str, Any]]) -> str:
    """SHA-256 of the canonical JSON of an answer's ``results`` list (copy of envelope.results_hash)."""
    return _sha(json.dumps(list(results), sort_keys=True, separators=(",", ":"), ensure_ascii=False,
                           allow_nan=False).encode("utf-8"))


def seal_message(t: Mapping[str, Any]) -> bytes:
    """What the node signs at the end of an export (copy of envelope.seal_message)."""
    return canonical_json({k: t[k] for k in SEAL_FIELDS})


class _Merkle:
    """RFC 6962 tree head, incremental (copy of merkle.Frontier)."""

    def __init__(self) -> None:
        self.count, self.stack = 0, []  # type: int, list[tuple[int, bytes]]

    def push(self, hex_leaf: str) -> None:
        size, node = 1, hashlib.sha256(b"\x00" + bytes.fromhex(hex_leaf)).digest()
        while self.stack and self.stack[-1][0] == size:
            lsize, left = self.stack.pop()
            size, node = lsize + size, hashlib.sha256(b"\x01" + left + node).digest()
        self.stack.append((size, node))
        self.count += 1

    def root(self) -> str:
        if not self.stack:
            return _sha(b"")
        node = self.stack[-1][1]
        for _, left in reversed(self.stack[:-1]):
            node = hashlib.sha256(b"\x01" + left + node).digest()
        return node.hex()
# --- end of copy ---


def key_id_of(public_key: bytes) -> str:
    return _sha(public_key)[:16]


@dataclass
class Problem:
    kind: str
    detail: str
    seq: int | None = None
    line: int | None = None

    def as_dict(self) -> dict[str, Any]:
        return {"seq": self.seq, "kind": self.kind, "detail": self.detail}

    def __str__(self) -> str:
        where = " ".join(p for p in (f"line {self.line}" if self.line else "", f"seq {self.seq}" if self.seq else "") if p)
        return f"{where + ': ' if where else ''}{self.kind}: {self.detail}"


@dataclass
class Report:
    ok: bool
    count: int
    first_problem: Problem | None = None
    head: str = GENESIS
    root_hash: str = ""
    notes: list[str] = field(default_factory=list)
    unbound: int = 0  # pre-envelope receipts: tenant_id and cell_id not signed

    def as_dict(self) -> dict[str, Any]:
        fp = self.first_problem.as_dict() if self.first_problem else None
        return {"ok": self.ok, "count": self.count, "first_problem": fp, "head": self.head,
                "root_hash": self.root_hash, "unbound": self.unbound, "notes": list(self.notes)}


class _Failed(Exception):
    def __init__(self, problem: Problem) -> None:
        super().__init__(str(problem))
        self.problem = problem


def _fail(kind: str, detail: str, *, seq: int | None = None, line: int | None = None) -> _Failed:
    return _Failed(Problem(kind, detail, seq, line))


VerificationFailed = _Failed  # public name, for the live auditor (appliance/receipts/audit.py)


def _verify_key(public_key_hex: object, where: str) -> tuple[str, nacl.signing.VerifyKey]:
    try:
        raw = bytes.fromhex(public_key_hex) if isinstance(public_key_hex, str) else b""
        if len(raw) != 32:
            raise ValueError
        return key_id_of(raw), nacl.signing.VerifyKey(raw)
    except (ValueError, nacl.exceptions.CryptoError):
        raise _fail("bad_key", f"{where}: not a 32-byte Ed25519 public key in hex") from None


def _check_sig(vk: nacl.signing.VerifyKey, message: bytes, signature: object) -> bool:
    try:
        sig = base64.b64decode(signature, validate=True) if isinstance(signature, str) else b""
        vk.verify(message, sig)
        return len(sig) == 64
    except (binascii.Error, ValueError, nacl.exceptions.BadSignatureError):
        return False


class _Log:
    """Walks receipts in log order and checks every T-RCPT-1 guard on each one."""

    def __init__(self, keys: Mapping[str, nacl.signing.VerifyKey],
                 checkpoints: Sequence[tuple[str, Mapping[str, Any]]], *, track_ids: bool = True) -> None:
        self.keys = keys
        self.count, self.prev = 0, GENESIS
        # The live auditor does not keep every id (memory grows with the log);
        # the offline verifier does.
        self.ids: set[str] | None = set() if track_ids else None
        self.merkle = _Merkle()
        self.unbound = 0  # pre-envelope receipts seen
        self.enveloped = False  # an enveloped receipt has been seen
        self.signatures = 0  # Ed25519 checks made on receipts
        self.pending: list[tuple[str, Mapping[str, Any]]] = []
        self.add_checkpoints(checkpoints)

    def add_checkpoints(self, checkpoints: Sequence[tuple[str, Mapping[str, Any]]]) -> None:
        for label, cp in checkpoints:
            self._check_checkpoint_signature(label, cp)
        # Sorted by count so one pass of the incremental tree checks them all.
        self.pending = sorted([*self.pending, *checkpoints], key=lambda lc: int(lc[1]["count"]))
        self._match_checkpoints()

    def _check_checkpoint_signature(self, label: str, cp: Mapping[str, Any]) -> None:
        if not isinstance(cp, Mapping) or any(k not in cp for k in ("count", "root_hash", "timestamp", "key_id", "signature")):
            raise _fail("bad_checkpoint", f"{label}: missing fields")
        if type(cp["count"]) is not int or cp["count"] < 0 or not isinstance(cp["root_hash"], str) \
                or not _HEX64.fullmatch(cp["root_hash"]) or type(cp["timestamp"]) is not int:
            raise _fail("bad_checkpoint", f"{label}: malformed count, root_hash or timestamp")
        vk = self.keys.get(cp["key_id"]) if isinstance(cp["key_id"], str) else None
        if vk is None:
            raise _fail("unknown_key", f"{label}: signed by unknown key_id {cp['key_id']!r}")
        if not _check_sig(vk, checkpoint_message(cp), cp["signature"]):
            raise _fail("bad_checkpoint_signature", f"{label}: signature does not verify")

    def _match_checkpoints(self) -> None:
        while self.pending and int(self.pending[0][1]["count"]) == self.merkle.count:
            label, cp = self.pending.pop(0)
            if self.merkle.root() != cp["root_hash"]:
                kind = "not_append_only" if label.startswith("auditor") else "checkpoint_mismatch"
                raise _fail(kind, f"{label}: tree head over the first {cp['count']} receipts is "
                                  f"{self.merkle.root()}, the checkpoint signed {cp['root_hash']}",
                            seq=cp["count"] or None)

    def add(self, r: object, line: int | None, rest: Callable[[], Iterable[int]], *,
            check_signature: bool = True) -> None:
        """Check one receipt. ``check_signature=False`` only for rows a signed
        checkpoint already vouches for (the live auditor's start-up pass)."""
        expected = self.count + 1
        if not isinstance(r, dict):
            raise _fail("malformed", "a receipt must be a JSON object", line=line)
        seq = r.get("seq")
        if r.get("schema") not in KNOWN_SCHEMAS:
            raise _fail("unknown_schema", f"schema {r.get('schema')!r} is not one of {', '.join(KNOWN_SCHEMAS)}",
                        seq=seq if type(seq) is int else None, line=line)
        missing = [f for f in RECEIPT_FIELDS if f not in r]
        if missing:
            raise _fail("missing_field", f"missing {', '.join(missing)}", line=line)
        if type(seq) is not int:
            raise _fail("field_format", "seq must be an integer", line=line)
        if seq < expected:
            # Every seq below `expected` has already been seen, in order.
            raise _fail("duplicate_row", f"seq {seq} appears again after seq {expected - 1}", seq=seq, line=line)
        if seq > expected:
            # T-RCPT-1: tell a removed row from a moved one by whether the
            # expected seq shows up later in the log.
            if expected in set(rest()):
                raise _fail("reordered", f"seq {seq} found where seq {expected} belongs", seq=seq, line=line)
            raise _fail("deleted_row", f"seq {expected}..{seq - 1} missing: row(s) deleted", seq=seq, line=line)
        bad = _v1_field_error(r)
        if bad:
            raise _fail("field_format", f"{bad} breaks the v1 format", seq=seq, line=line)
        for name in ("receipt_hash", "prev_chain_hash", "chain_hash"):
            if not isinstance(r[name], str) or not _HEX64.fullmatch(r[name]):
                raise _fail("field_format", f"{name} is not 64 lowercase hex", seq=seq, line=line)
        if v1_receipt_hash(r) != r["receipt_hash"]:
            raise _fail("receipt_hash_mismatch", "receipt_hash does not match the v1 fields "
                        "(execution_id|code_hash|result_hash|template|timestamp): a field was edited", seq=seq, line=line)
        if r["prev_chain_hash"] != self.prev:
            raise _fail("chain_break", "prev_chain_hash is not the previous receipt's chain_hash "
                        "(a row was removed, inserted or replaced)", seq=seq, line=line)
        if chain_hash(r["prev_chain_hash"], r["receipt_hash"]) != r["chain_hash"]:
            raise _fail("chain_hash_mismatch", "chain_hash != SHA-256(prev_chain_hash|receipt_hash)", seq=seq, line=line)
        vk = self.keys.get(r["key_id"]) if isinstance(r["key_id"], str) else None
        if vk is None:
            raise _fail("unknown_key", f"key_id {r['key_id']!r} is not a trusted node key", seq=seq, line=line)
        if r["cell_id"] is not None and not isinstance(r["cell_id"], str):
            raise _fail("field_format", "cell_id must be a string or null", seq=seq, line=line)
        if r.get("envelope") is None:
            # A pre-envelope receipt: signed over chain_hash alone, so its
            # tenant and cell are not bound. The node stopped writing these
            # when envelopes came in: one after an enveloped receipt is a
            # downgrade (T-RCPT-2).
            if self.enveloped:
                raise _fail("downgrade", "a receipt without a signed envelope follows enveloped receipts",
                            seq=seq, line=line)
            message, what = r["chain_hash"].encode("ascii"), "chain_hash"
        else:
            self._check_binding(r, seq, line)
            message, what = envelope_message(r), "the envelope (tenant_id, cell_id, chain_hash)"
        if check_signature:
            self.signatures += 1
            if not _check_sig(vk, message, r["signature"]):
                raise _fail("bad_signature", f"signature over {what} does not verify", seq=seq, line=line)
        if self.ids is not None:
            if r["execution_id"] in self.ids:
                raise _fail("duplicate_execution_id", f"execution_id {r['execution_id']} was already receipted",
                            seq=seq, line=line)
            self.ids.add(r["execution_id"])
        if r.get("envelope") is None:
            self.unbound += 1
        else:
            self.enveloped = True
        self.count, self.prev = seq, r["chain_hash"]
        self.merkle.push(r["receipt_hash"])
        self._match_checkpoints()

    def _check_binding(self, r: Mapping[str, Any], seq: int, line: int | None) -> None:
        """T-RCPT-2: the fields the envelope signs must be well formed and known."""
        missing = [f for f in BINDING_FIELDS if f not in r]
        if missing:
            raise _fail("missing_field", f"missing {', '.join(missing)}", seq=seq, line=line)
        if r["envelope"] != ENVELOPE:
            raise _fail("unknown_envelope", f"envelope {r['envelope']!r} is not {ENVELOPE}", seq=seq, line=line)
        if not isinstance(r["tenant_id"], str) or not _ID.fullmatch(r["tenant_id"]):
            raise _fail("field_format", "tenant_id must match ^[A-Za-z0-9_-]{1,64}$", seq=seq, line=line)
        if r["cell_id"] is not None and not _ID.fullmatch(r["cell_id"]):
            raise _fail("field_format", "cell_id must be null or match ^[A-Za-z0-9_-]{1,64}$", seq=seq, line=line)
        if not isinstance(r["extensions"], dict):
            raise _fail("field_format", "extensions must be an object", seq=seq, line=line)
        unknown = sorted(k for k in r["extensions"] if k not in KNOWN_EXTENSIONS)
        if unknown:
            raise _fail("unknown_extension", f"extension(s) {unknown} not known to this verifier", seq=seq, line=line)
        ext = r["extensions"].get(RESULTS_EXTENSION)
        if ext is not None and (not isinstance(ext, dict) or set(ext) != {"results_hash"}
                                or not isinstance(ext["results_hash"], str) or not _HEX64.fullmatch(ext["results_hash"])):
            raise _fail("field_format", f'{RESULTS_EXTENSION} must be {{"results_hash": 64 lowercase hex}}',
                        seq=seq, line=line)

    def finish(self) -> None:
        if self.pending:
            label, cp = self.pending[0]
            # T-RCPT-1: a signed checkpoint counts more receipts than we hold.
            raise _fail("truncated", f"{label} signed {cp['count']} receipts but only {self.count} are present")


ChainWalker = _Log  # public name: the live auditor walks the chain with the same checks


def _loads(text: str) -> Any:
    def pairs(items: list[tuple[str, Any]]) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for k, v in items:
            if k in out:  # two parsers could see two different values
                raise ValueError(f"duplicate key {k!r}")
            out[k] = v
        return out

    def no_constants(name: str) -> Any:
        raise ValueError(f"{name} is not JSON")

    return json.loads(text, object_pairs_hook=pairs, parse_constant=no_constants)


def _trusted_keys(declared: Mapping[str, str], pinned: Sequence[str] | None, notes: list[str]) -> dict[str, nacl.signing.VerifyKey]:
    keys = {}
    for kid, pk in declared.items():
        real_kid, vk = _verify_key(pk, f"key {kid}")
        if real_kid != kid:
            raise _fail("bad_header", f"key_id {kid} is not the first 16 hex of sha256(public key)")
        keys[kid] = vk
    if pinned:
        pins = dict(_verify_key(pk, "--public-key") for pk in pinned)
        for kid in keys:
            if kid not in pins:
                raise _fail("untrusted_key", f"key {kid} is not among the pinned --public-key values")
        return pins
    notes.append("node public key taken from the data itself; pin it with --public-key for a real audit")
    return keys


def _run(body: Callable[[list[str], list[_Log]], None]) -> Report:
    notes: list[str] = []
    seen: list[_Log] = []  # body registers its walker so a failure can report how far it got

    def partial(problem: Problem) -> Report:
        log = seen[0] if seen else None
        return Report(False, log.count if log else 0, problem, log.prev if log else GENESIS, "", notes)

    try:
        body(notes, seen)
    except _Failed as failed:
        return partial(failed.problem)
    except (OSError, UnicodeDecodeError) as exc:
        return partial(Problem("unreadable", str(exc)))
    log = seen[0]
    if log.unbound:
        notes.append(f"{log.unbound} receipt(s) predate signed envelopes: their tenant_id and cell_id "
                     "are not covered by any signature")
    return Report(True, log.count, None, log.prev, log.merkle.root(), notes, log.unbound)


def _load_checkpoint_file(path: str | Path) -> dict[str, Any]:
    try:
        cp = _loads(Path(path).read_text(encoding="utf-8"))
    except ValueError as exc:
        raise _fail("bad_checkpoint", f"{path}: {exc}") from None
    if isinstance(cp, dict) and isinstance(cp.get("checkpoint"), dict):
        cp = cp["checkpoint"]  # accept a saved export header too
    checkpoint: dict[str, Any] = cp
    return checkpoint


def verify_export(path: str | Path, *, public_keys: Sequence[str] | None = None,
                  checkpoints: Sequence[str | Path] = ()) -> Report:
    """Check a JSON Lines export: header, receipts, trailer (docs/receipts.md)."""

    def body(notes: list[str], seen: list[_Log]) -> None:
        with open(path, encoding="utf-8", newline="") as fh:
            lines = enumerate(fh, start=1)
            try:
                _, first = next(lines)
                header = _loads(first)
            except (StopIteration, ValueError):
                raise _fail("bad_header", "the first line is not a JSON header", line=1) from None
            if not isinstance(header, dict) or header.get("type") != "header" \
                    or header.get("format") not in (EXPORT_FORMAT, LEGACY_EXPORT_FORMAT):
                raise _fail("bad_header", f"not a {EXPORT_FORMAT} (or {LEGACY_EXPORT_FORMAT}) header", line=1)
            legacy = header["format"] == LEGACY_EXPORT_FORMAT
            unknown = [s for s in header.get("schemas", []) if s not in KNOWN_SCHEMAS]
            if unknown or not isinstance(header.get("schemas"), list):
                raise _fail("unknown_schema", f"export declares schemas {header.get('schemas')!r}; known: {KNOWN_SCHEMAS}", line=1)
            extra = header.get("keys") or {}
            if not isinstance(extra, dict):
                raise _fail("bad_header", "keys must map key_id to public key", line=1)
            declared = {**extra, str(header.get("key_id")): header.get("node_public_key")}
            keys = _trusted_keys(declared, public_keys, notes)
            cps: list[tuple[str, Mapping[str, Any]]] = []
            if header.get("checkpoint") is not None:
                cps.append(("header checkpoint", header["checkpoint"]))
            elif legacy:
                # A pre-envelope export's trailer is unsigned: its header
                # checkpoint is the only signed count, and every export of
                # that format carried one. Without it a cut tail is invisible.
                raise _fail("truncated", f"a {LEGACY_EXPORT_FORMAT} export without its signed header checkpoint "
                            "cannot show whether rows were cut off the end", line=1)
            if legacy:
                notes.append(f"{LEGACY_EXPORT_FORMAT} export (before signed envelopes): the trailer is not signed, "
                             "truncation is checked against the header checkpoint only")
            cps += [(f"auditor checkpoint {p}", _load_checkpoint_file(p)) for p in checkpoints]
            log = _Log(keys, cps)
            seen.append(log)
            trailer: dict[str, Any] | None = None

            def rest() -> Iterator[int]:
                for _, text in lines:
                    try:
                        obj = _loads(text)
                        if isinstance(obj, dict) and type(obj.get("seq")) is int:
                            yield obj["seq"]
                    except ValueError:
                        continue

            for no, text in lines:
                try:
                    obj = _loads(text)
                except ValueError as exc:
                    if not text.endswith("\n"):
                        raise _fail("truncated", "the last line is cut off", line=no) from None
                    raise _fail("malformed", f"not JSON: {exc}", line=no) from None
                if trailer is not None:
                    raise _fail("malformed", "data after the trailer line", line=no)
                if isinstance(obj, dict) and obj.get("type") == "trailer":
                    trailer = obj
                    continue
                log.add(obj, no, rest)
            if trailer is None:
                raise _fail("truncated", f"no trailer line after {log.count} receipts: the export is cut short")
            if not legacy:
                _check_seal(trailer, keys)
            if trailer.get("count") != log.count or trailer.get("last_chain_hash") != log.prev:
                raise _fail("truncated", f"trailer says {trailer.get('count')} receipts ending at "
                            f"{trailer.get('last_chain_hash')}, found {log.count} ending at {log.prev}")
            if not legacy and trailer["root_hash"] != log.merkle.root():
                raise _fail("checkpoint_mismatch", f"the seal's tree head {trailer['root_hash']} is not the tree head "
                            f"{log.merkle.root()} of the {log.count} receipts present")
            log.finish()

    return _run(body)


def _check_seal(trailer: Mapping[str, Any], keys: Mapping[str, nacl.signing.VerifyKey]) -> None:
    """T-RCPT-2: the last line is a signed statement of how many receipts the
    export holds; cutting rows (and re-writing the trailer) breaks it."""
    fields = set(trailer) - {"type", "signature"}
    if fields != set(SEAL_FIELDS) or "signature" not in trailer or trailer["seal"] != SEAL:
        raise _fail("truncated", f"the trailer is not a signed {SEAL}: the export's end cannot be trusted")
    if type(trailer["count"]) is not int or type(trailer["timestamp"]) is not int \
            or not all(isinstance(trailer[k], str) and _HEX64.fullmatch(trailer[k]) for k in ("last_chain_hash", "root_hash")):
        raise _fail("truncated", "the seal's count, timestamp or hashes are malformed")
    vk = keys.get(trailer["key_id"]) if isinstance(trailer["key_id"], str) else None
    if vk is None:
        raise _fail("unknown_key", f"the seal is signed by unknown key_id {trailer['key_id']!r}")
    if not _check_sig(vk, seal_message(trailer), trailer["signature"]):
        raise _fail("bad_seal_signature", "the trailer's signature does not verify (forged or edited end of export)")


def verify_db(path: str | Path, public_key_hex: str | Sequence[str] | None = None, *,
              checkpoints: Sequence[str | Path] = ()) -> Report:
    """Check the receipts and checkpoints tables of a node database, opened read-only."""
    if not Path(path).is_file():
        return Report(False, 0, Problem("unreadable", f"{path} does not exist"))
    pins = [public_key_hex] if isinstance(public_key_hex, str) else public_key_hex
    conn = sqlite3.connect(f"{Path(path).resolve().as_uri()}?mode=ro", uri=True)
    try:
        return verify_connection(conn, pins, checkpoints=checkpoints)
    finally:
        conn.close()


def verify_connection(conn: Any, public_keys: Sequence[str] | None, *,
                      checkpoints: Sequence[str | Path] = ()) -> Report:
    """Check an open sqlite3 connection's receipts and checkpoints (also used by the live store)."""
    def body(notes: list[str], seen: list[_Log]) -> None:
        try:
            declared: dict[str, str] = {}
            if not public_keys:
                declared = {kid: pk for kid, pk in conn.execute("SELECT key_id, public_key FROM receipt_keys")}
            keys = _trusted_keys(declared, public_keys, notes)
            cps: list[tuple[str, Mapping[str, Any]]] = [
                (f"checkpoint #{row[0]}", dict(zip(("count", "root_hash", "timestamp", "key_id", "signature"), row[1:])))
                for row in conn.execute(
                    "SELECT id, count, root_hash, timestamp, key_id, signature FROM checkpoints ORDER BY id")]
            counts = [cp["count"] for _, cp in cps]
            if counts != sorted(counts):
                # T-RCPT-1: a later signed head with fewer receipts means history was cut.
                raise _fail("checkpoint_mismatch", "checkpoints do not grow monotonically (history rewritten)")
            cps += [(f"auditor checkpoint {p}", _load_checkpoint_file(p)) for p in checkpoints]
            _walk_rows(conn, keys, cps, seen)
        except sqlite3.DatabaseError as exc:
            raise _fail("unreadable", f"database: {exc}") from None

    return _run(body)


def dumps_line(obj: Mapping[str, Any]) -> str:
    """One JSON Lines record, as the exporter writes it."""
    return json.dumps(obj, separators=(",", ":"), ensure_ascii=False) + "\n"


def db_columns(conn: Any) -> str:
    """The SELECT list for receipts rows; a database from before envelopes has NULLs there."""
    have = {row[1] for row in conn.execute("PRAGMA table_info(receipts)")}
    binding = [f if f in have else f"NULL AS {f}" for f in BINDING_FIELDS]
    return ", ".join([*RECEIPT_FIELDS, *binding])


def db_row(row: Sequence[Any]) -> dict[str, Any]:
    """A receipts row as the export and the API show it (extensions parsed from JSON)."""
    r = dict(zip((*RECEIPT_FIELDS, *BINDING_FIELDS), row))
    if r["envelope"] is None:
        r["extensions"] = None
    elif isinstance(r["extensions"], str):
        try:
            r["extensions"] = _loads(r["extensions"])
        except ValueError:
            r["extensions"] = None  # not an object: the verifier names it
    return r


def _walk_rows(conn: Any, keys: Mapping[str, nacl.signing.VerifyKey],
               cps: Sequence[tuple[str, Mapping[str, Any]]], seen: list[_Log]) -> None:
    """Shared by verify_db and the live store: walk a ``receipts`` table in seq order."""
    log = _Log(keys, cps)
    seen.append(log)
    cursor = conn.execute(f"SELECT {db_columns(conn)} FROM receipts ORDER BY seq")
    rows = (db_row(row) for row in cursor)
    for r in rows:
        log.add(r, None, lambda: (int(x["seq"]) for x in rows))
    log.finish()


def verify_answer(answer: object, public_keys: Sequence[str]) -> Report:
    """Check one run's API answer against its own receipt: result_hash from
    its stdout, stderr, exit_code and status; the v1 receipt_hash and
    chain_hash; ``results_hash`` (extension "results/1") from its ``results``
    list, present exactly when the list is not empty; and the node's signature
    over the envelope, with a key you pin (docs/receipts.md)."""
    def body(notes: list[str], seen: list[_Log]) -> None:
        if not public_keys:
            raise _fail("untrusted_key", "an answer carries no node key: give the node's --public-key")
        keys = dict(_verify_key(pk, "--public-key") for pk in public_keys)
        if not isinstance(answer, dict) or not isinstance(answer.get("receipt"), dict):
            raise _fail("malformed", "an answer is a JSON object with a receipt object")
        r = answer["receipt"]
        missing = [f for f in (*RECEIPT_FIELDS, *BINDING_FIELDS) if f not in r] + [
            f for f in ("exit_code", "status", "stderr", "stdout") if f not in answer]
        if missing:
            raise _fail("missing_field", f"missing {', '.join(missing)}")
        seq = r["seq"] if type(r["seq"]) is int else None
        if r.get("schema") not in KNOWN_SCHEMAS:
            raise _fail("unknown_schema", f"schema {r.get('schema')!r} is not one of {', '.join(KNOWN_SCHEMAS)}", seq=seq)
        bad = _v1_field_error(r)
        if bad or seq is None:
            raise _fail("field_format", f"{bad or 'seq'} breaks the v1 format", seq=seq)
        if execution := answer.get("execution_id"):
            if execution != r["execution_id"]:
                raise _fail("answer_mismatch", "the answer's execution_id is not its receipt's", seq=seq)
        try:
            if v1_result_hash(answer) != r["result_hash"]:
                raise _fail("result_hash_mismatch", "result_hash does not match the answer's exit_code, status, "
                            "stderr and stdout", seq=seq)
        except (TypeError, ValueError):
            raise _fail("field_format", "exit_code, status, stderr and stdout are not JSON values", seq=seq) from None
        if v1_receipt_hash(r) != r["receipt_hash"]:
            raise _fail("receipt_hash_mismatch", "receipt_hash does not match the v1 fields", seq=seq)
        if not all(isinstance(r[k], str) and _HEX64.fullmatch(r[k]) for k in ("prev_chain_hash", "chain_hash")) \
                or chain_hash(r["prev_chain_hash"], r["receipt_hash"]) != r["chain_hash"]:
            raise _fail("chain_hash_mismatch", "chain_hash != SHA-256(prev_chain_hash|receipt_hash)", seq=seq)
        log = _Log(keys, [])
        log._check_binding(r, seq, None)
        results = answer.get("results", [])
        if not isinstance(results, list):
            raise _fail("field_format", "results must be a list", seq=seq)
        ext = r["extensions"].get(RESULTS_EXTENSION)
        if results and ext is None:
            raise _fail("results_unreceipted", f"the answer has results but its receipt has no {RESULTS_EXTENSION}",
                        seq=seq)
        if ext is not None:
            try:
                got = results_hash(results)
            except (TypeError, ValueError):
                raise _fail("field_format", "results are not JSON values", seq=seq) from None
            if got != ext["results_hash"]:
                raise _fail("results_hash_mismatch", f"results_hash {ext['results_hash']} signed, the answer's "
                            f"results hash to {got}", seq=seq)
        vk = keys.get(r["key_id"]) if isinstance(r["key_id"], str) else None
        if vk is None:
            raise _fail("unknown_key", f"key_id {r['key_id']!r} is not a trusted node key", seq=seq)
        if not _check_sig(vk, envelope_message(r), r["signature"]):
            raise _fail("bad_signature", "signature over the envelope (with its extensions) does not verify", seq=seq)
        log.count, log.prev = seq, r["chain_hash"]
        log.merkle.push(r["receipt_hash"])
        seen.append(log)

    return _run(body)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="verify", description="Verify Cell receipts offline.")
    src = parser.add_mutually_exclusive_group(required=True)
    src.add_argument("file", nargs="?", help="a JSON Lines export from `cell receipts export`")
    src.add_argument("--db", help="a node database (opened read-only)")
    src.add_argument("--answer", help="one run's API answer (JSON) with its receipt and results; needs --public-key")
    parser.add_argument("--public-key", action="append", default=[], metavar="HEX",
                        help="the node public key you trust (repeat for rotated keys)")
    parser.add_argument("--checkpoint", action="append", default=[], metavar="FILE",
                        help="an older checkpoint you hold: the log must extend it")
    parser.add_argument("--json", action="store_true", help="print the report as JSON")
    args = parser.parse_args(argv)
    if args.answer:
        try:
            answer = _loads(Path(args.answer).read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, ValueError) as exc:
            return render(Report(False, 0, Problem("unreadable", f"{args.answer}: {exc}")), as_json=args.json)
        report = verify_answer(answer, args.public_key)
    elif args.db:
        report = verify_db(args.db, args.public_key or None, checkpoints=args.checkpoint)
    else:
        report = verify_export(args.file, public_keys=args.public_key or None, checkpoints=args.checkpoint)
    return render(report, as_json=args.json)


def render(report: Report, *, as_json: bool = False) -> int:
    """Print a report the way both CLIs do; return the exit code (0 ok, 1 problem)."""
    if as_json:
        print(json.dumps(report.as_dict(), indent=2))
    elif report.ok:
        print(f"OK: {report.count} receipts, chain head {report.head}, tree head {report.root_hash}")
    else:
        print(f"FAIL: {report.first_problem}")
    for note in report.notes:
        print(f"note: {note}", file=sys.stderr)
    return 0 if report.ok else 1


if __name__ == "__main__":
    sys.exit(main())
