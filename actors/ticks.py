"""The one tick decoder: HTTP usage ticks → validated, normalised ticks for the shards."""

from __future__ import annotations

from typing import Annotated

import msgspec

from actors.metering import LeaseUsage
from actors.timeutil import BadTime, parse_time_us

ID_PATTERN = r"^[A-Za-z0-9_.:\-]+$"
Id = Annotated[str, msgspec.Meta(min_length=1, max_length=128, pattern=ID_PATTERN)]
# Bounds: an hour per tick, 4 TiB of memory, 1024 vCPUs, 64 TiB of disk. A tick outside them
# is a caller bug, and rejecting it keeps every product below 2**63.
DurationMs = Annotated[int, msgspec.Meta(ge=0, le=3_600_000)]
MemoryMb = Annotated[int, msgspec.Meta(ge=0, le=4_194_304)]
CpuCount = Annotated[int, msgspec.Meta(ge=0, le=1024)]
DiskMb = Annotated[int, msgspec.Meta(ge=0, le=67_108_864)]
UnitCount = Annotated[int, msgspec.Meta(ge=0, le=10**15)]
UnitName = Annotated[str, msgspec.Meta(min_length=1, max_length=64)]
MAX_FUTURE_US = 300 * 1_000_000  # a tick may not start more than 5 minutes in the future


class TickIn(msgspec.Struct, forbid_unknown_fields=True):
    """A tick as POST /v1/usage receives it."""

    tick_id: Id
    org_id: Id
    started_at: str | int
    duration_ms: DurationMs
    lease_id: Id | None = None
    memory_mb: MemoryMb = 0
    cpu_count: CpuCount = 0
    disk_mb: DiskMb = 0
    units: dict[UnitName, UnitCount] | None = None


class Tick(msgspec.Struct, array_like=True):
    """A validated tick, as shards receive it (msgpack, compact)."""

    tick_id: str
    org_id: str
    lease_id: str
    started_at_us: int
    duration_ms: int
    memory_mb: int
    cpu_count: int
    disk_mb: int
    units: dict[str, int] | None

    def usage(self) -> LeaseUsage:
        d = self.duration_ms
        units = {k: v for k, v in self.units.items() if v} if self.units else None
        return LeaseUsage(self.lease_id, self.memory_mb * d, self.cpu_count * d, self.disk_mb * d,
                          units or None, 1)


_TICK_DECODER = msgspec.json.Decoder(TickIn)
TICKS_ENCODER = msgspec.msgpack.Encoder()
TICKS_DECODER = msgspec.msgpack.Decoder(list[Tick])


class UsageBody(msgspec.Struct, forbid_unknown_fields=True):
    ticks: list[msgspec.Raw]


USAGE_DECODER = msgspec.json.Decoder(UsageBody)


def decode_tick(raw: bytes | msgspec.Raw, now_us: int) -> Tick:
    """Decode one tick; raises ValueError with a message naming the bad field."""
    try:
        tick = _TICK_DECODER.decode(raw)
    except msgspec.DecodeError as exc:
        raise ValueError(str(exc)) from None
    try:
        started_us = parse_time_us(tick.started_at)
    except BadTime as exc:
        raise ValueError(f"{exc} - at `$.started_at`") from None
    if started_us > now_us + MAX_FUTURE_US:
        raise ValueError("started_at is more than 5 minutes in the future - at `$.started_at`")
    return Tick(tick.tick_id, tick.org_id, tick.lease_id or "", started_us, tick.duration_ms,
                tick.memory_mb, tick.cpu_count, tick.disk_mb, tick.units)
