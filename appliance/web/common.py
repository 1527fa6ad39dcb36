"""What every route module needs from a request: the service graph of this
app, the JSON body, integer query parameters, and Server-Sent Events."""
from __future__ import annotations

import json
import logging
import queue
import threading
from typing import Any, Callable, Iterator

from flask import Response, current_app, request

from appliance.errors import BadRequest, CellError
from appliance.web import validate

log = logging.getLogger("cell.web")


def services() -> Any:
    """The one object graph this app was built with (``create_app(services)``)."""
    return current_app.extensions["cell"]


def json_body() -> dict[str, Any]:
    """The request's JSON object, whatever its Content-Type says; 400 otherwise."""
    raw = request.get_data(cache=True, parse_form_data=False)
    if not raw:
        raise BadRequest("a JSON body is required", code="invalid_json")
    try:
        data = json.loads(raw)
    except (ValueError, RecursionError):
        raise BadRequest("malformed JSON", code="invalid_json") from None
    return validate.obj(data)


def query_int(name: str, default: int | None, lo: int, hi: int) -> int | None:
    raw = request.args.get(name)
    if raw is None or raw == "":
        return default
    if not raw.isascii() or not raw.isdigit() or not lo <= int(raw) <= hi:
        raise BadRequest(f"{name} must be an integer between {lo} and {hi}", code="invalid_query")
    return int(raw)


def sse(run: Callable[[Callable[[int, bytes], None], Callable[[int, dict[str, Any]], None]], dict[str, Any]]) -> Response:
    """Server-Sent Events: output and rich results as they are produced, then the result.

    Rich results are ``rich_result`` events (``index``, ``result``), sent the moment
    the guest shows them; the name ``result`` is taken by the final answer, the event
    clients (the SDK, synapserun) already wait for. The final answer's ``results``
    lists exactly the ``rich_result`` events sent, in order."""
    events: queue.Queue[tuple[str, Any]] = queue.Queue()

    def sink(fd: int, data: bytes) -> None:
        events.put(("chunk", (fd, data)))

    def on_result(index: int, bundle: dict[str, Any]) -> None:
        events.put(("rich", (index, bundle)))

    def worker() -> None:
        try:
            events.put(("result", run(sink, on_result)))
        except CellError as exc:
            events.put(("error", {"error": exc.message, "code": exc.code, "status": exc.status}))
        except Exception:
            log.exception("stream run failed")
            events.put(("error", {"error": "internal error", "code": "internal", "status": 500}))

    threading.Thread(target=worker, name="sse-run", daemon=True).start()

    def generate() -> Iterator[str]:
        while True:
            kind, payload = events.get()
            if kind == "chunk":
                fd, data = payload
                text = data.decode("utf-8", "replace")
                yield "data: " + json.dumps({"type": "stdout" if fd == 1 else "stderr", "text": text}) + "\n\n"
            elif kind == "rich":
                index, bundle = payload
                yield "data: " + json.dumps({"type": "rich_result", "index": index, "result": bundle}) + "\n\n"
            elif kind == "result":
                yield "data: " + json.dumps({"type": "result", **payload}) + "\n\n"
                return
            else:
                yield "data: " + json.dumps({"type": "error", **payload}) + "\n\n"
                return

    return Response(generate(), mimetype="text/event-stream", headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
