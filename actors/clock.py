"""The service's one clock. Everything that needs `now` reads it here and passes it down."""

from __future__ import annotations

import time


def now_us() -> int:
    return time.time_ns() // 1_000
