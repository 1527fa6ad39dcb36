"""Receipts: the v1 hash (pure), the signed hash chain and its offline verifier.

Only the pure v1 names are re-exported here, so that importing the package —
which ``python -m appliance.receipts.verify`` does — pulls in neither
sqlite-utils nor anything else an auditor would not have.
"""
from __future__ import annotations

from appliance.receipts.v1 import (
    GENESIS,
    SCHEMA,
    STATUSES,
    ReceiptFieldError,
    chain_hash,
    code_hash,
    receipt_hash,
    result_hash,
)

__all__ = [
    "GENESIS",
    "SCHEMA",
    "STATUSES",
    "ReceiptFieldError",
    "chain_hash",
    "code_hash",
    "receipt_hash",
    "result_hash",
]
