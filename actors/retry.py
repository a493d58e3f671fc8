"""One retry policy for everything metergate sends out (webhooks, Stripe meter events):
exponential backoff with a cap, and a dead letter after the last attempt."""

from __future__ import annotations

from dataclasses import dataclass

US_PER_S = 1_000_000
PENDING = "pending"
DEAD = "dead"


@dataclass(frozen=True, slots=True)
class RetryPolicy:
    base_s: int  # the first retry waits this long; each next one twice as long
    max_attempts: int  # after this many failed attempts the item is dead (kept, listed, retried by hand)
    cap_s: int = 3_600

    def delay_s(self, attempts: int) -> int:
        """Seconds before attempt n + 1, after n failed ones: base, 2·base, 4·base, … at most cap."""
        assert attempts >= 1, attempts
        return min(self.base_s * 2 ** (attempts - 1), self.cap_s)

    def after_failure(self, attempts: int, now_us: int) -> tuple[str, int]:
        """(status, next attempt in µs) once `attempts` attempts have failed."""
        if attempts >= self.max_attempts:
            return DEAD, now_us
        return PENDING, now_us + self.delay_s(attempts) * US_PER_S
