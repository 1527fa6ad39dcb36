"""Pure-Python Ed25519 (RFC 8032), standard library only.

Why this exists: the installer must check a bundle's signature with code that
was trusted *before* the bundle was opened (threat T-SUPPLY-2). PyNaCl is in
the bundle's wheelhouse, so it cannot vouch for the bundle; the system
Python's ``hashlib`` can. Verification is what the air-gapped side runs.

``sign`` exists only for the vendor's bundle builder (and tests). It is not
constant-time: run it on the vendor's build host, never on a shared machine
where another process could time it.
"""
from __future__ import annotations

import hashlib

P = 2**255 - 19
L = 2**252 + 27742317777372353535851937790883648493  # order of the base point
D = (-121665 * pow(121666, P - 2, P)) % P
SQRT_M1 = pow(2, (P - 1) // 4, P)

Point = tuple[int, int, int, int]  # extended coordinates (X, Y, Z, T), x = X/Z, y = Y/Z, xy = T/Z

IDENTITY: Point = (0, 1, 1, 0)


def _add(p: Point, q: Point) -> Point:
    # RFC 8032 §5.1.4 addition; complete for a = -1, so it also doubles.
    x1, y1, z1, t1 = p
    x2, y2, z2, t2 = q
    a = (y1 - x1) * (y2 - x2) % P
    b = (y1 + x1) * (y2 + x2) % P
    c = 2 * t1 * t2 * D % P
    d = 2 * z1 * z2 % P
    e, f, g, h = b - a, d - c, d + c, b + a
    return (e * f % P, g * h % P, f * g % P, e * h % P)


def _mul(k: int, p: Point) -> Point:
    q = IDENTITY
    while k:
        if k & 1:
            q = _add(q, p)
        p = _add(p, p)
        k >>= 1
    return q


def _equal(p: Point, q: Point) -> bool:
    return (p[0] * q[2] - q[0] * p[2]) % P == 0 and (p[1] * q[2] - q[1] * p[2]) % P == 0


def _recover_x(y: int, sign: int) -> int | None:
    if y >= P:
        return None  # non-canonical y: RFC 8032 §5.1.3 step 1 says decoding fails
    x2 = (y * y - 1) * pow(D * y * y + 1, P - 2, P) % P
    if x2 == 0:
        return None if sign else 0
    x = pow(x2, (P + 3) // 8, P)
    if (x * x - x2) % P:
        x = x * SQRT_M1 % P
    if (x * x - x2) % P:
        return None
    if (x & 1) != sign:
        x = P - x
    return x


def _decode(data: bytes) -> Point | None:
    if len(data) != 32:
        return None
    y = int.from_bytes(data, "little")
    sign = y >> 255
    y &= (1 << 255) - 1
    x = _recover_x(y, sign)
    if x is None:
        return None
    return (x, y, 1, x * y % P)


def _encode(p: Point) -> bytes:
    zinv = pow(p[2], P - 2, P)
    x, y = p[0] * zinv % P, p[1] * zinv % P
    return int.to_bytes(y | ((x & 1) << 255), 32, "little")


_GY = 4 * pow(5, P - 2, P) % P
_GX = _recover_x(_GY, 0)
assert _GX is not None
G: Point = (_GX, _GY, 1, _GX * _GY % P)


def _h(*parts: bytes) -> int:
    return int.from_bytes(hashlib.sha512(b"".join(parts)).digest(), "little")


def _small_order(p: Point) -> bool:
    return _equal(_mul(8, p), IDENTITY)


def verify(public_key: bytes, message: bytes, signature: bytes) -> bool:
    """True only for a valid signature; never raises on malformed input."""
    if len(public_key) != 32 or len(signature) != 64:
        return False
    a = _decode(public_key)
    r = _decode(signature[:32])
    if a is None or r is None:
        return False
    # Small-order keys let one signature verify for many messages; libsodium
    # (PyNaCl) refuses them too, so both implementations agree on what passes.
    if _small_order(a):
        return False
    s = int.from_bytes(signature[32:], "little")
    if s >= L:
        return False  # malleability: RFC 8032 §5.1.7 step 1 requires S < L
    k = _h(signature[:32], public_key, message) % L
    # [S]B = R + [k]A, checked by comparing encodings as ref10 and libsodium do,
    # which also rejects a non-canonically encoded R.
    check = _add(_mul(s, G), _mul(L - k, a))
    return _encode(check) == signature[:32]


def public_key(seed: bytes) -> bytes:
    """The 32-byte public key of a 32-byte seed (vendor side)."""
    a, _ = _expand(seed)
    return _encode(_mul(a, G))


def _expand(seed: bytes) -> tuple[int, bytes]:
    if len(seed) != 32:
        raise ValueError("an Ed25519 seed is 32 bytes")
    h = hashlib.sha512(seed).digest()
    a = int.from_bytes(h[:32], "little")
    a &= (1 << 254) - 8
    a |= 1 << 254
    return a, h[32:]


def sign(seed: bytes, message: bytes) -> bytes:
    """Detached 64-byte signature (vendor side; not constant-time, see module doc)."""
    a, prefix = _expand(seed)
    pub = _encode(_mul(a, G))
    r = _h(prefix, message) % L
    rb = _encode(_mul(r, G))
    k = _h(rb, pub, message) % L
    s = (r + k * a) % L
    return rb + int.to_bytes(s, 32, "little")
