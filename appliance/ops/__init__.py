"""Operations layer: structured logs, Prometheus metrics, the OpenAPI
description, `cell doctor`, and backup/restore (docs/operations.md).

Nothing here is built at import time; ``appliance.ops.web.register_ops``
attaches the per-app pieces to a Flask app and ``appliance.ops.cli.register``
adds the operator commands.
"""
from __future__ import annotations
