"""Per-client rate limiting: T-DOS-2 (request floods)."""
from __future__ import annotations

import threading

import pytest

from appliance.policy.ratelimit import TokenBucketLimiter, client_key, parse_rps


def test_t_dos_2_burst_then_refill_at_rate() -> None:
    lim = TokenBucketLimiter(rate=2.0, burst=3)
    assert [lim.check("a", 100.0)[0] for _ in range(3)] == [True, True, True]
    allowed, retry = lim.check("a", 100.0)
    assert not allowed and retry == pytest.approx(0.5)
    allowed, retry = lim.check("a", 100.25)  # half a token back: still short
    assert not allowed and retry == pytest.approx(0.25)
    assert lim.check("a", 100.5) == (True, 0.0)
    assert not lim.check("a", 100.5)[0]


def test_t_dos_2_refill_never_exceeds_burst() -> None:
    lim = TokenBucketLimiter(rate=10.0, burst=2)
    lim.check("a", 0.0)
    results = [lim.check("a", 1_000.0)[0] for _ in range(3)]
    assert results == [True, True, False]


def test_t_dos_2_keys_are_independent() -> None:
    lim = TokenBucketLimiter(rate=1.0, burst=1)
    assert lim.check("a", 0.0)[0] and not lim.check("a", 0.0)[0]
    assert lim.check("b", 0.0)[0]


def test_t_dos_2_clock_going_backwards_mints_no_tokens() -> None:
    lim = TokenBucketLimiter(rate=1.0, burst=1)
    assert lim.check("a", 50.0)[0]
    assert not lim.check("a", 10.0)[0]  # earlier timestamp: no refill
    assert not lim.check("a", 50.5)[0]  # and ``last`` was not moved back to 10
    assert lim.check("a", 51.0)[0]


def test_t_dos_2_memory_bounded_by_lru_eviction() -> None:
    lim = TokenBucketLimiter(rate=1.0, burst=1, max_keys=100)
    for i in range(10_000):
        lim.check(f"k{i}", 0.0)
    assert len(lim) == 100


def test_t_dos_2_lru_keeps_active_flooder() -> None:
    lim = TokenBucketLimiter(rate=1.0, burst=1, max_keys=3)
    lim.check("flooder", 0.0)
    for i in range(10):
        lim.check(f"k{i}", 0.0)
        assert not lim.check("flooder", 0.0)[0]  # recently used: never evicted


def test_t_dos_2_thread_safe_total_allowed() -> None:
    lim = TokenBucketLimiter(rate=0.001, burst=50)
    allowed: list[bool] = []
    lock = threading.Lock()

    def worker() -> None:
        for _ in range(100):
            ok = lim.check("shared", 0.0)[0]
            with lock:
                allowed.append(ok)

    threads = [threading.Thread(target=worker) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sum(allowed) == 50


@pytest.mark.parametrize(
    "kwargs",
    [{"rate": 0, "burst": 1}, {"rate": -1, "burst": 1}, {"rate": float("nan"), "burst": 1},
     {"rate": float("inf"), "burst": 1}, {"rate": 1, "burst": 0}, {"rate": 1, "burst": True},
     {"rate": 1, "burst": 1, "max_keys": 0}],
)
def test_limiter_rejects_bad_parameters(kwargs: dict[str, float]) -> None:
    with pytest.raises(ValueError):
        TokenBucketLimiter(**kwargs)  # type: ignore[arg-type]


PROXIES = ("10.0.0.0/8", "192.168.1.5", "2001:db8:ffff::/48")


@pytest.mark.parametrize(
    "remote,xff,expected",
    [
        # Untrusted peers cannot choose their own key (spoofed XFF ignored).
        ("203.0.113.7", "1.2.3.4", "203.0.113.7"),
        ("203.0.113.7", "10.0.0.1, 1.2.3.4", "203.0.113.7"),
        ("8.8.8.8", None, "8.8.8.8"),
        ("172.16.0.1", "1.2.3.4", "172.16.0.1"),
        # Trusted proxy: right-most non-proxy entry is the client.
        ("10.0.0.2", "198.51.100.9", "198.51.100.9"),
        ("10.0.0.2", "6.6.6.6, 198.51.100.9", "198.51.100.9"),
        ("10.0.0.2", "6.6.6.6, 198.51.100.9, 10.1.1.1", "198.51.100.9"),
        ("192.168.1.5", "198.51.100.9 ,192.168.1.5", "198.51.100.9"),
        ("10.0.0.2", "10.9.9.9, 10.1.1.1", "10.9.9.9"),  # all proxies: left-most
        ("10.0.0.2", "", "10.0.0.2"),
        ("10.0.0.2", None, "10.0.0.2"),
        # Garbage in the chain: fall back to the peer.
        ("10.0.0.2", "not-an-ip", "10.0.0.2"),
        ("10.0.0.2", "1.2.3.4, unknown", "10.0.0.2"),
        ("10.0.0.2", "1.2.3.4:5555", "10.0.0.2"),
        ("10.0.0.2", "1.2.3.4,,", "10.0.0.2"),
        # IPv6 grouped by /64; IPv4-mapped treated as IPv4.
        ("2001:db8:1:2:aaaa:bbbb:cccc:dddd", None, "2001:db8:1:2::/64"),
        ("2001:db8:1:2::1", None, "2001:db8:1:2::/64"),
        ("2001:db8:1:3::1", None, "2001:db8:1:3::/64"),
        ("::ffff:203.0.113.7", None, "203.0.113.7"),
        ("::ffff:10.0.0.2", "2606:4700::abcd", "2606:4700::/64"),
        ("2001:db8:ffff::1", "2001:db8:5:6::9, 2001:db8:ffff::2", "2001:db8:5:6::/64"),
        ("2001:db8:ffff::1", "::ffff:198.51.100.9", "198.51.100.9"),
        ("fe80::1%eth0", None, "fe80::/64"),
        # Non-IP peers (Unix socket) keep a stable key.
        ("", None, "unknown"),
    ],
)
def test_t_dos_2_client_key(remote: str, xff: str | None, expected: str) -> None:
    assert client_key(remote, xff, PROXIES) == expected


def test_t_dos_2_xff_ignored_without_trusted_proxies() -> None:
    assert client_key("10.0.0.2", "1.2.3.4", ()) == "10.0.0.2"


def test_t_dos_2_invalid_trusted_entry_trusts_nobody() -> None:
    assert client_key("10.0.0.2", "1.2.3.4", ("not-a-net",)) == "10.0.0.2"


def test_t_dos_2_rotating_ipv6_addresses_share_one_bucket() -> None:
    lim = TokenBucketLimiter(rate=1.0, burst=2)
    results = [lim.check(client_key(f"2001:db8:1:2::{i:x}", None, ()), 0.0)[0] for i in range(1, 6)]
    assert results == [True, True, False, False, False]


@pytest.mark.parametrize("raw,expected", [("20", 20.0), ("0.5", 0.5), ("100000", 100_000.0), ("007", 7.0), ("1.25", 1.25)])
def test_parse_rps_accepts_plain_numbers(raw: str, expected: float) -> None:
    assert parse_rps(raw) == expected


@pytest.mark.parametrize(
    "raw",
    ["", "0", "0.0", "-1", "+5", "20abc", "abc", "nan", "NaN", "inf", "-inf", "1e3", " 20", "20 ", "20\n",
     "1.", ".5", "1,5", "100001", "1_000", "\uff12\uff10", "0x10", "9" * 20],
)
def test_parse_rps_rejects(raw: str) -> None:
    with pytest.raises(ValueError):
        parse_rps(raw)
