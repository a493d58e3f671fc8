"""The service's one clock. Everything that needs `now` reads it here and passes it down.

Real UTC time, plus an offset that only the test clock (METERGATE_TEST_CLOCK=1) moves. The
offset is kept in Postgres (`test_clock`); the scheduler pushes each change to every shard
before it runs what became due, and ingress replicas follow it within a second.
"""

from __future__ import annotations

import time

_offset_us = 0


def now_us() -> int:
    return time.time_ns() // 1_000 + _offset_us


def offset_us() -> int:
    return _offset_us


def set_offset_us(offset: int) -> None:
    """Move this process's clock to real time + offset; the clock never goes back."""
    global _offset_us
    _offset_us = max(_offset_us, offset)
