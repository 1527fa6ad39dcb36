"""RFC 6962 Merkle tree head over receipt hashes. PURE: no IO.

leaf = SHA-256(0x00 || data), node = SHA-256(0x01 || left || right), the left
subtree holding the largest power of two strictly smaller than n. The empty
tree's head is SHA-256(""). Each leaf's data is the 32 raw bytes of a
receipt_hash (not its hex text).

A signed tree head lets an auditor holding an older checkpoint check that the
log only grew (threat T-RCPT-1, deletion or rewrite of history): the old head
must equal the head recomputed over the first ``old.count`` leaves.
"""
from __future__ import annotations

import hashlib
from typing import Iterable, Sequence

EMPTY_ROOT = hashlib.sha256(b"").hexdigest()


def leaf_hash(data: bytes) -> bytes:
    return hashlib.sha256(b"\x00" + data).digest()


def node_hash(left: bytes, right: bytes) -> bytes:
    return hashlib.sha256(b"\x01" + left + right).digest()


def _leaf_bytes(hex_leaf: str) -> bytes:
    data = bytes.fromhex(hex_leaf)
    if len(data) != 32:
        raise ValueError("leaf must be a 64-hex SHA-256")
    return data


def _mth(leaves: Sequence[bytes]) -> bytes:
    """The recursive definition from RFC 6962 §2.1, kept as the reference."""
    n = len(leaves)
    if n == 1:
        return leaf_hash(leaves[0])
    k = 1 << ((n - 1).bit_length() - 1)  # largest power of two < n
    return node_hash(_mth(leaves[:k]), _mth(leaves[k:]))


def root(hex_leaves: Sequence[str]) -> str:
    """Tree head over the given receipt hashes, by the RFC's recursive definition."""
    if not hex_leaves:
        return EMPTY_ROOT
    return _mth([_leaf_bytes(h) for h in hex_leaves]).hex()


class Frontier:
    """Incremental tree head: the roots of the perfect subtrees of the log so far.

    Appending is O(log n) and the head is O(log n), so a checkpoint every N
    receipts costs O(N) new work rather than re-hashing the whole log. The
    perfect subtrees are exactly the binary digits of n, largest first, and
    RFC 6962's head is their right fold — equal to :func:`root` (pinned by tests).
    """

    def __init__(self) -> None:
        self.count = 0
        self._stack: list[tuple[int, bytes]] = []  # (subtree size, subtree root)

    def push(self, hex_leaf: str) -> None:
        size, node = 1, leaf_hash(_leaf_bytes(hex_leaf))
        while self._stack and self._stack[-1][0] == size:
            left_size, left = self._stack.pop()
            size, node = left_size + size, node_hash(left, node)
        self._stack.append((size, node))
        self.count += 1

    def extend(self, hex_leaves: Iterable[str]) -> None:
        for leaf in hex_leaves:
            self.push(leaf)

    def root(self) -> str:
        if not self._stack:
            return EMPTY_ROOT
        node = self._stack[-1][1]
        for _, left in reversed(self._stack[:-1]):
            node = node_hash(left, node)
        return node.hex()
