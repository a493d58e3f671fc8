"""What applying commands produced, gathered for the shard to write in its commit.

The core never writes: it appends ledger entries, outbox events, charges to make and closed
periods here, and the shard turns them into rows of one transaction.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import msgspec

if TYPE_CHECKING:
    from actors.money import LedgerEntry
    from actors.periods import ClosedPeriod
    from actors.recharge import ChargeRequest


class Event(msgspec.Struct):
    type: str
    org_id: str
    at_us: int
    data: dict


class Effects:
    """What a batch of commands produced, for the shard to write in its commit."""

    __slots__ = ("ledger", "events", "charges", "periods")

    def __init__(self) -> None:
        self.ledger: list[tuple[str, LedgerEntry]] = []
        self.events: list[Event] = []
        self.charges: list[ChargeRequest] = []
        self.periods: list[ClosedPeriod] = []
