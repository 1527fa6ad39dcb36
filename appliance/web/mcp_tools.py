"""The MCP server's tools: what ``run_code``, ``create_cell``, ``delete_cell``,
``list_cells``, ``read_file``, ``write_file`` and ``list_files`` do, over the
same services as the HTTP API (threat T-MCP-1; the transport is
``appliance/web/routes_mcp.py``, the argument rules
``appliance/policy/mcp_server.py``).

Another tenant's cell is "no such cell" (``CellService.cell``, T-TENANT-1);
files go through the files routes' confined volume (T-PATH-1/2) and quota
checks (T-DISK-1). A failure is a tool result with ``isError``, its text
starting with the machine-readable code.
"""
from __future__ import annotations

import base64
import logging
import time
from dataclasses import dataclass
from typing import Any, Callable

from appliance.errors import BadRequest, CellError, PayloadTooLarge
from appliance.policy import mcp_server as rules
from appliance.policy.mcp_server import ToolArgsError
from appliance.web import validate
from appliance.web.files import MAX_FILE_BYTES, _new_entries, _volume

log = logging.getLogger("cell.mcp.server")


def tool_text(body: str, *, error: bool = False, structured: dict[str, Any] | None = None) -> dict[str, Any]:
    out: dict[str, Any] = {"content": [{"type": "text", "text": body}], "isError": error}
    if structured is not None:
        out["structuredContent"] = structured
    return out


@dataclass
class Ctx:
    """What a tool may use: the caller's tenant, the services, and for a
    streamed run the sink of its output (tools may run off the request thread)."""
    tenant: Any
    svc: Any
    on_chunk: Callable[[int, bytes], None] | None = None


def call_tool(ctx: Ctx, name: str, arguments: Any) -> dict[str, Any]:
    started = time.perf_counter()
    outcome = "ok"
    try:
        result = TOOLS[name](ctx, rules.tool_args(name, arguments))
        if result.get("isError"):
            outcome = "tool_error"
        return result
    except ToolArgsError as exc:
        outcome = "invalid_arguments"
        return tool_text(f"invalid arguments: {exc}", error=True)
    except CellError as exc:
        outcome = exc.code
        return tool_text(f"{exc.code}: {exc.message}", error=True)
    except Exception:
        log.exception("mcp tool %s failed", name)
        outcome = "internal"
        return tool_text("internal: internal error", error=True)
    finally:
        # T-MCP-1 audit: who called which tool, how it ended; never the arguments.
        log.info("mcp_tool tenant=%s tool=%s outcome=%s ms=%d", ctx.tenant.id, name, outcome,
                 int((time.perf_counter() - started) * 1000))


def _run_code(ctx: Ctx, args: dict[str, Any]) -> dict[str, Any]:
    svc, tenant = ctx.svc, ctx.tenant
    cells = svc.cells
    language = args.get("language")
    exec_req: dict[str, Any] = {"code": args["code"]}
    if language is not None:
        exec_req["language"] = language
    if "timeout_ms" in args:
        exec_req["timeout_ms"] = args["timeout_ms"]
    if "envs" in args:
        exec_req["envs"] = args["envs"]  # validate.run_envs: the HTTP API's rules and codes (T-ENV-1)
    cell_id = args.get("cell_id")
    if cell_id is None:
        template = rules.LANGUAGE_TEMPLATE[language or "python"]
        run = validate.exec_body(exec_req, template, svc.settings)  # checked before a cell is made for it
        cell_id = cells.create(tenant, **validate.cell_create({"template": template}, svc.settings)).id
    else:
        run = validate.exec_body(exec_req, cells.cell(tenant, cell_id).template, svc.settings)
    try:
        answer = cells.exec_in_cell(tenant, cell_id, run["code"], run["is_text"], run["language"],
                                    on_chunk=ctx.on_chunk, timeout_ms=run["timeout_ms"], run_envs=run["envs"])
    except CellError as exc:
        if "cell_id" not in args:  # the model must learn the id of the cell it now holds
            exc.message = f"{exc.message} (cell {cell_id} was created for this run; pass it as cell_id or delete it)"
        raise
    return _run_result(answer, cell_id)


def _run_result(answer: dict[str, Any], cell_id: str) -> dict[str, Any]:
    receipt = answer.get("receipt") or {}
    structured = {
        "cell_id": cell_id, "status": answer["status"], "exit_code": answer["exit_code"],
        "stdout": answer["stdout"], "stderr": answer["stderr"], "truncated": answer["truncated"],
        "execution_id": answer["execution_id"], "receipt_hash": receipt.get("receipt_hash"),
        "receipt_seq": receipt.get("seq"),
    }
    for extra in ("note", "denials", "restarted"):
        if extra in answer:
            structured[extra] = answer[extra]
    lines = [f"status: {answer['status']} (exit code {answer['exit_code']})", f"cell_id: {cell_id}"]
    if answer["stdout"]:
        lines += ["stdout:", answer["stdout"].rstrip("\n")]
    if answer["stderr"]:
        lines += ["stderr:", answer["stderr"].rstrip("\n")]
    if answer["truncated"]:
        lines.append("(output truncated at the appliance's limit)")
    if answer.get("note"):
        lines.append(f"note: {answer['note']}")
    lines.append(f"execution_id: {answer['execution_id']} receipt_hash: {receipt.get('receipt_hash')}")
    out = tool_text("\n".join(lines), error=answer["status"] != "ok", structured=structured)
    out["content"].extend(_rich_content(answer.get("results") or []))
    return out


# MIME types of a run's results shown to the model as text, in this order of preference.
_TEXT_FORMATS = ("text/html", "application/json", "text/markdown", "text/latex", "image/svg+xml")


def _rich_content(results: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """A run's rich results as MCP content: figures and images as image
    content, the richest text form of everything else (the bundles were
    checked and capped by the host already)."""
    content: list[dict[str, Any]] = []
    for bundle in results:
        for mime in ("image/png", "image/jpeg"):
            if isinstance(bundle.get(mime), str):
                content.append({"type": "image", "data": bundle[mime], "mimeType": mime})
                break
        else:
            text = next((bundle[m] for m in _TEXT_FORMATS if isinstance(bundle.get(m), str)), None)
            if text is None:
                continue  # plain text only: already in stdout
            content.append({"type": "text", "text": text})
    return content


def _cell_summary(record: Any) -> dict[str, Any]:
    public: dict[str, Any] = record.public()
    return public


def _create_cell(ctx: Ctx, args: dict[str, Any]) -> dict[str, Any]:
    svc = ctx.svc
    body: dict[str, Any] = {"template": rules.LANGUAGE_TEMPLATE[args.get("language") or "python"]}
    if "timeout_ms" in args:
        body["timeout_ms"] = args["timeout_ms"]
    record = svc.cells.create(ctx.tenant, **validate.cell_create(body, svc.settings))
    cell = _cell_summary(record)
    return tool_text(f"created cell {record.id} ({record.template}); pass cell_id={record.id} to run_code", structured=cell)


def _delete_cell(ctx: Ctx, args: dict[str, Any]) -> dict[str, Any]:
    ctx.svc.cells.delete(ctx.tenant, args["cell_id"])
    return tool_text(f"deleted cell {args['cell_id']}", structured={"cell_id": args["cell_id"], "status": "deleted"})


def _list_cells(ctx: Ctx, _args: dict[str, Any]) -> dict[str, Any]:
    cells = [_cell_summary(c) for c in ctx.svc.store.list_cells(ctx.tenant.id)]
    text = "\n".join(f"{c['cell_id']} {c.get('template')}" for c in cells) or "no cells"
    return tool_text(text, structured={"cells": cells})


# The file tools run on the request thread: the files routes' _volume reads
# the tenant from the request (and is the same confinement, T-PATH-1/2).
def _read_file(ctx: Ctx, args: dict[str, Any]) -> dict[str, Any]:
    path = args["path"]
    with _volume(args["cell_id"]) as vol:
        entry = vol.stat(path)
        if entry.type != "file":
            raise BadRequest("path is a directory", code="is_a_directory")
        if entry.size > MAX_FILE_BYTES:
            raise PayloadTooLarge("file is over the 10 MB read ceiling", code="file_too_large")
        data = vol.read_bytes(path, MAX_FILE_BYTES)
    try:
        return tool_text(data.decode("utf-8"), structured={"path": path, "encoding": "utf-8", "size": len(data)})
    except UnicodeDecodeError:
        encoded = base64.b64encode(data).decode("ascii")
        return tool_text(encoded, structured={"path": path, "encoding": "base64", "size": len(data)})


def _write_file(ctx: Ctx, args: dict[str, Any]) -> dict[str, Any]:
    cells = ctx.svc.cells
    path, data = validate.file_content({k: args[k] for k in ("path", "content", "encoding") if k in args})
    record = cells.cell(ctx.tenant, args["cell_id"])
    with _volume(record.id) as vol:
        cells.check_quota(ctx.tenant, len(data), _new_entries(vol, path))  # T-DISK-1: quota and file count
        vol.write_bytes(path, data, make_parents=True)
        entry = vol.stat(path).as_dict()
        cells.quota.remeasure(ctx.tenant.id, record.id, vol)
    return tool_text(f"wrote {len(data)} bytes to {path}", structured=entry)


def _list_files(ctx: Ctx, args: dict[str, Any]) -> dict[str, Any]:
    with _volume(args["cell_id"]) as vol:
        entries = [e.as_dict() for e in vol.list_dir(args.get("path", ""))]
    text = "\n".join(f"{e.get('type')} {e.get('path', e.get('name'))} {e.get('size', '')}".rstrip() for e in entries)
    return tool_text(text or "empty directory", structured={"files": entries})


TOOLS = {"run_code": _run_code, "create_cell": _create_cell, "delete_cell": _delete_cell, "list_cells": _list_cells,
          "read_file": _read_file, "write_file": _write_file, "list_files": _list_files}
