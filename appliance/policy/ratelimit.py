"""Per-client request rate limiting (threat T-DOS-2: request floods).

Pure: the caller passes ``now`` (a monotonic clock value) and the peer
address; nothing here reads a clock, the environment or a socket. The lock is
the only shared state, and it guards an in-memory dict whose size is bounded
by ``max_keys`` so that a flood from many addresses cannot grow it without
limit.
"""
from __future__ import annotations

import functools
import ipaddress
import math
import re
import threading
from collections import OrderedDict

MAX_RPS = 100_000.0
_MAX_XFF_ENTRIES = 32


class TokenBucketLimiter:
    """One token bucket per key: ``burst`` tokens, refilled at ``rate``/s.

    Memory is bounded: buckets live in an LRU ordered dict and the least
    recently seen key is evicted once ``max_keys`` is exceeded (T-DOS-2). An
    evicted key comes back with a full bucket; a key idle for burst/rate
    seconds is full anyway, so eviction only forgives clients that were
    pushed out by ``max_keys`` more recent ones.
    """

    def __init__(self, rate: float, burst: int, max_keys: int = 100_000) -> None:
        if not (isinstance(rate, (int, float)) and math.isfinite(rate) and rate > 0):
            raise ValueError(f"rate must be a positive finite number, got {rate!r}")
        if isinstance(burst, bool) or not isinstance(burst, int) or burst < 1:
            raise ValueError(f"burst must be an integer >= 1, got {burst!r}")
        if isinstance(max_keys, bool) or not isinstance(max_keys, int) or max_keys < 1:
            raise ValueError(f"max_keys must be an integer >= 1, got {max_keys!r}")
        self.rate = float(rate)
        self.burst = burst
        self.max_keys = max_keys
        # key -> (tokens, last refill time)
        self._buckets: OrderedDict[str, tuple[float, float]] = OrderedDict()
        self._lock = threading.Lock()

    def __len__(self) -> int:
        with self._lock:
            return len(self._buckets)

    def check(self, key: str, now: float) -> tuple[bool, float]:
        """Take one token for ``key``; return (allowed, retry_after_seconds)."""
        with self._lock:
            state = self._buckets.get(key)
            if state is None:
                tokens, last = float(self.burst), now
            else:
                tokens, last = state
                # A clock that steps backwards must not mint tokens, nor move
                # ``last`` back (which would mint them on the next call).
                elapsed = max(0.0, now - last)
                tokens = min(float(self.burst), tokens + elapsed * self.rate)
                last = max(last, now)
            if tokens >= 1.0:
                allowed, retry_after = True, 0.0
                tokens -= 1.0
            else:
                allowed, retry_after = False, (1.0 - tokens) / self.rate
            self._buckets[key] = (tokens, last)
            self._buckets.move_to_end(key)
            while len(self._buckets) > self.max_keys:
                self._buckets.popitem(last=False)  # T-DOS-2: bounded memory
            return allowed, retry_after


IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
_Network = ipaddress.IPv4Network | ipaddress.IPv6Network


def _parse_ip(text: str) -> IPAddress | None:
    try:
        ip = ipaddress.ip_address(text.strip())
    except ValueError:
        return None
    if isinstance(ip, ipaddress.IPv6Address):
        if ip.ipv4_mapped is not None:
            return ip.ipv4_mapped  # ::ffff:1.2.3.4 is the IPv4 client 1.2.3.4
        if ip.scope_id:
            ip = ipaddress.IPv6Address(ip.compressed.split("%", 1)[0])
    return ip


@functools.lru_cache(maxsize=64)
def _trusted_networks(trusted_proxies: tuple[str, ...]) -> tuple[_Network, ...]:
    nets: list[_Network] = []
    for entry in trusted_proxies:
        try:
            nets.append(ipaddress.ip_network(entry.strip(), strict=False))
        except ValueError:
            # Config validates this list at start-up; an entry that still
            # fails to parse trusts nobody, which is the safe direction.
            continue
    return tuple(nets)


def _is_trusted(ip: IPAddress, nets: tuple[_Network, ...]) -> bool:
    return any(ip.version == net.version and ip in net for net in nets)


def _key(ip: IPAddress) -> str:
    if isinstance(ip, ipaddress.IPv6Address):
        # One subscriber usually owns a whole /64; keying by address would
        # give each flooder 2**64 fresh buckets (T-DOS-2).
        return str(ipaddress.IPv6Network((int(ip) >> 64 << 64, 64)))
    return str(ip)


@functools.lru_cache(maxsize=4096)  # a pure function of its inputs; bounded, so rotating headers only evict
def client_key(remote_addr: str, forwarded_for: str | None, trusted_proxies: tuple[str, ...]) -> str:
    """The rate-limit key for a request.

    X-Forwarded-For is honoured only when the TCP peer is a trusted proxy
    (T-DOS-2: anyone else could rotate the header to dodge the limit). Then
    the right-most entry that is not itself a trusted proxy is the client:
    entries to its left were written by the client and prove nothing.
    """
    peer = _parse_ip(remote_addr)
    if peer is None:
        return remote_addr or "unknown"  # e.g. a Unix socket peer
    nets = _trusted_networks(tuple(trusted_proxies))
    if not forwarded_for or not _is_trusted(peer, nets):
        return _key(peer)
    entries = [e.strip() for e in forwarded_for.split(",")][-_MAX_XFF_ENTRIES:]
    client: IPAddress | None = None
    for entry in reversed(entries):
        ip = _parse_ip(entry)
        if ip is None:
            return _key(peer)  # a garbled chain is not evidence of anything
        client = ip
        if not _is_trusted(ip, nets):
            break
    return _key(client if client is not None else peer)


_RPS_RE = re.compile(r"[0-9]{1,9}(?:\.[0-9]{1,9})?")


def parse_rps(raw: str) -> float:
    """Strictly parse SYNAPSE_RATE_LIMIT_RPS: a plain positive decimal.

    No signs, exponents, ``nan``/``inf``, whitespace or trailing junk: a
    typo must stop start-up, not silently disable the limiter.
    """
    if not isinstance(raw, str) or not _RPS_RE.fullmatch(raw):
        raise ValueError(f"rate limit must be a plain positive number, got {raw!r}")
    value = float(raw)
    if not 0.0 < value <= MAX_RPS:
        raise ValueError(f"rate limit must be > 0 and <= {MAX_RPS:g}, got {raw!r}")
    return value
