"""Routes of the original Synapse gateway that Cell does not offer.

The Synapse client (``synapserun`` on PyPI) and E2B-shaped code call them; a
bare 404 or 405 would leave their users guessing. When no route matched, the
error renderer asks :func:`explain` and answers with the same status, code
``not_offered`` and the reason. No cell is looked up, so the answer says
nothing about whether a cell exists (T-TENANT-1), and the API-key guard has
already run for every ``/v1`` path.
"""
from __future__ import annotations

import re

_CELL = r"/v1/cells/[^/]+"
_NO_SHELL = ("Cell has no shell and no processes: run Python or JavaScript with POST /v1/cells/<id>/exec "
             "(a cell is a WebAssembly sandbox, not a container)")
_NO_PAUSE = ("Cell has no pause, resume or snapshot calls: an idle Python cell is paused to its snapshot and "
             "resumed on its next run by the node itself (when the operator set SYNAPSE_CELL_PAUSE_IDLE_S); "
             "POST /v1/cells/<id>/fork copies a cell; its files stay in /data "
             "(POST /v1/cells/<id>/refresh restarts the idle clock)")

# (pattern over the path, reason); first match wins.
_NOT_OFFERED: tuple[tuple[re.Pattern[str], str], ...] = tuple((re.compile(p), why) for p, why in (
    (_CELL + r"/(cmd|commands(/.*)?|processes(/.*)?|pty)", _NO_SHELL),
    (_CELL + r"/(pause|resume|snapshots)", _NO_PAUSE),
    (_CELL + r"/fetch", "Cell has no fetch on the caller's behalf: a wasm module fetches with the cell.host_fetch "
                        "import, under the node's egress policy (off unless the operator turned it on)"),
    (_CELL + r"/metadata", "metadata is set when the cell is created (POST /v1/cells) and shown by GET /v1/cells/<id>"),
    (_CELL + r"/envs", "a cell's environment is fixed when it is created (its interpreter starts with it); "
                       "GET /v1/cells/<id>/envs shows it"),
    (r"/v1/volumes(/.*)?", "Cell has no named volumes: each cell has its own volume at /data, removed with the cell; "
                           "use the /v1/cells/<id>/files routes"),
    (r"/v1/templates/.+|/v1/templates", "templates come from the signed trust registry (docs/mirror.md); "
                                        "GET /v1/templates lists them"),
    (r"/v1/execute/.+", "POST /v1/execute runs code once; name the runtime with template or language"),
    (r"/health", "the liveness check is GET /healthz"),
))


def explain(path: str) -> str | None:
    """Why Cell does not offer ``path`` (a route of the original gateway), or None."""
    for pattern, why in _NOT_OFFERED:
        if pattern.fullmatch(path):
            return why
    return None
