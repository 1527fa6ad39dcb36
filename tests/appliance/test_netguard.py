"""The network guard itself refuses before connecting (T-SSRF-1)."""
from __future__ import annotations

import socket

import pytest

from tests.netguard import NetworkGuardViolation


@pytest.mark.parametrize("target", [("169.254.169.254", 80), ("10.0.0.1", 80), ("192.168.1.1", 443), ("8.8.8.8", 53)])
def test_ssrf_guard_refuses_non_loopback_connect(target: tuple[str, int]) -> None:
    s = socket.socket()
    try:
        with pytest.raises(NetworkGuardViolation):
            s.connect(target)
    finally:
        s.close()


def test_ssrf_guard_refuses_non_loopback_resolution() -> None:
    with pytest.raises(NetworkGuardViolation):
        socket.getaddrinfo("example.com", 80)


def test_ssrf_guard_allows_loopback() -> None:
    srv = socket.socket()
    srv.bind(("127.0.0.1", 0))
    srv.listen(1)
    c = socket.socket()
    try:
        c.connect(srv.getsockname())
    finally:
        c.close()
        srv.close()
