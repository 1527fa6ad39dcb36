"""Guest pointer/length checks are pure and exact (T-MEM-1)."""
from __future__ import annotations

import pytest

from appliance.policy.bounds import MAX_TRANSFER, span, u32

MEM = 65536


@pytest.mark.parametrize(
    "ptr,length,cap,expected",
    [
        (0, 0, None, (0, 0)),
        (0, MEM, None, (0, MEM)),
        (MEM, 0, None, (MEM, 0)),
        (1, MEM, None, None),
        (-16, 4, None, None),  # 0xFFFFFFF0: would read from the end of memory
        (-1, 1, None, None),
        (0, -1, None, None),  # length 0xFFFFFFFF
        (MEM - 4, 8, None, None),
        (0x7FFFFFFF, 0x7FFFFFFF, None, None),
        (100, -1, 1000, (100, 1000)),  # max_len-style: capped first, then checked
        (MEM - 10, 0x7FFFFFFF, 10, (MEM - 10, 10)),
        (MEM - 10, 0x7FFFFFFF, 11, None),
    ],
)
def test_t_mem_1_span_table(ptr: int, length: int, cap: int | None, expected: tuple[int, int] | None) -> None:
    assert span(ptr, length, MEM, cap) == expected


def test_t_mem_1_signed_pointers_become_unsigned() -> None:
    assert u32(-16) == 0xFFFFFFF0
    assert u32(2**32 + 5) == 5


def test_t_dos_1_transfer_ceiling_is_ten_million() -> None:
    assert MAX_TRANSFER == 10_000_000
