"""The one tick decoder: HTTP usage ticks → validated, normalised ticks for the shards."""

from __future__ import annotations

from typing import Annotated

import msgspec

from actors.metering import LeaseUsage
from actors.timeutil import BadTime, parse_time_us

from metergate_client.decision import WHOLE_NAME_PATTERN

ID_PATTERN = r"^[A-Za-z0-9_.:\-]+$"
# msgspec (and Python's re) check a pattern with a search in which `$` also matches just before
# a final newline: "lease_1\n" passed as an id and "us\n" as a name. The lookahead ends that, and
# JSON Schema reads it as before. pydantic keeps the plain patterns: its Rust regex has no
# lookaround, and there `$` is the very end already.
WHOLE_ID_PATTERN = ID_PATTERN + r"(?!\n)"
Id = Annotated[str, msgspec.Meta(min_length=1, max_length=128, pattern=WHOLE_ID_PATTERN)]
# Bounds: an hour per tick, 4 TiB of memory, 1024 vCPUs, 64 TiB of disk. A tick outside them
# is a caller bug, and rejecting it keeps every product below 2**63.
DurationMs = Annotated[int, msgspec.Meta(ge=0, le=3_600_000)]
MemoryMb = Annotated[int, msgspec.Meta(ge=0, le=4_194_304)]
CpuCount = Annotated[int, msgspec.Meta(ge=0, le=1024)]
DiskMb = Annotated[int, msgspec.Meta(ge=0, le=67_108_864)]
UnitCount = Annotated[int, msgspec.Meta(ge=0, le=10**15)]
UnitName = Annotated[str, msgspec.Meta(min_length=1, max_length=64, pattern=WHOLE_NAME_PATTERN)]
MAX_FUTURE_US = 300 * 1_000_000  # a tick may not start more than 5 minutes in the future
# A tick may not start earlier than its id is remembered, less this margin (billing-rules 6.6).
# Ids are kept by when they were first seen, in partitions dropped only once wholly past the
# retention (storage/tick_ids.py); a tick is first seen at most 5 minutes before its start, so
# a resend accepted here meets its id for the rest of the margin (55 minutes): time for the
# resend to reach its commit, and for the scheduler's clock to run ahead of the shard's.
TICK_AGE_MARGIN_S = 3_600


def max_tick_age_us(tick_id_retention_s: int) -> int:
    return (tick_id_retention_s - TICK_AGE_MARGIN_S) * 1_000_000


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
    """A validated tick, as shards receive it (msgpack, compact). `index` is its place in the
    request, so that whichever layer rejects it can say which one it was."""

    tick_id: str
    org_id: str
    lease_id: str
    started_at_us: int
    duration_ms: int
    memory_mb: int
    cpu_count: int
    disk_mb: int
    units: dict[str, int] | None
    index: int = 0

    def usage(self) -> LeaseUsage:
        d = self.duration_ms
        units = {k: v for k, v in self.units.items() if v} if self.units else None
        return LeaseUsage(self.lease_id, self.memory_mb * d, self.cpu_count * d, self.disk_mb * d,
                          units or None, 1, d)


_TICK_DECODER = msgspec.json.Decoder(TickIn)
TICKS_ENCODER = msgspec.msgpack.Encoder()
TICKS_DECODER = msgspec.msgpack.Decoder(list[Tick])


class UsageBody(msgspec.Struct, forbid_unknown_fields=True):
    ticks: list[msgspec.Raw]


class TypedUsageBody(msgspec.Struct, forbid_unknown_fields=True):
    ticks: list[TickIn]


USAGE_DECODER = msgspec.json.Decoder(UsageBody)
_TYPED_USAGE_DECODER = msgspec.json.Decoder(TypedUsageBody)


class BadBody(ValueError):
    """A body that is not JSON the decoder can read: broken, not UTF-8, or nested too deep."""


# What a msgspec decoder can raise for bytes a caller sent, besides a ValidationError: its own
# DecodeError, a UnicodeDecodeError for invalid UTF-8 in a string, a RecursionError for deep
# nesting in an untyped part.
DECODE_ERRORS = (msgspec.DecodeError, UnicodeDecodeError, RecursionError)


def _normalise(tick: TickIn, now_us: int, times: dict, index: int, max_age_us: int) -> Tick:
    started_us = times.get(tick.started_at)
    if started_us is None:
        try:
            started_us = parse_time_us(tick.started_at)
        except BadTime as exc:
            raise ValueError(f"{exc} - at `$.started_at`") from None
        times[tick.started_at] = started_us
    if started_us > now_us + MAX_FUTURE_US:
        raise ValueError("started_at is more than 5 minutes in the future - at `$.started_at`")
    if started_us < now_us - max_age_us:
        raise ValueError(f"tick_too_old: started_at is more than {max_age_us // 3_600_000_000} h in the past,"
                         " longer than tick ids are remembered, so it could be billed twice - at `$.started_at`")
    return Tick(tick.tick_id, tick.org_id, tick.lease_id or "", started_us, tick.duration_ms,
                tick.memory_mb, tick.cpu_count, tick.disk_mb, tick.units, index)


def decode_tick(raw: bytes | msgspec.Raw, now_us: int, max_age_us: int, times: dict | None = None,
                index: int = 0) -> Tick:
    """Decode one tick; raises ValueError with a message naming the bad field."""
    try:
        tick = _TICK_DECODER.decode(raw)
    except msgspec.ValidationError as exc:
        raise ValueError(str(exc)) from None
    except DECODE_ERRORS:
        raise ValueError("tick is not valid JSON") from None
    return _normalise(tick, now_us, {} if times is None else times, index, max_age_us)


class TooManyTicks(ValueError):
    """A usage body with more ticks than one request may carry."""


def decode_usage(body: bytes, now_us: int, max_ticks: int,
                 max_age_us: int) -> tuple[list[Tick], list[tuple[int, msgspec.Raw, str]]]:
    """All ticks of a usage body: (valid ticks, [(index, raw tick, error)] for the bad ones).

    A body of well-formed ticks decodes in one pass; only when something is wrong is each tick
    decoded on its own, so that one bad tick is rejected alone. Raises TooManyTicks past
    max_ticks, msgspec.ValidationError for a body that is not {"ticks": [...]}, and BadBody
    for one that is not readable JSON at all.
    """
    times: dict = {}
    try:
        typed = _TYPED_USAGE_DECODER.decode(body).ticks
    except DECODE_ERRORS:
        typed = None
    if typed is not None:
        if len(typed) > max_ticks:
            raise TooManyTicks(len(typed))
        try:
            return [_normalise(tick, now_us, times, index, max_age_us) for index, tick in enumerate(typed)], []
        except ValueError:
            pass  # some tick has a bad time: sort them out one by one below
    try:
        raw_ticks = USAGE_DECODER.decode(body).ticks
    except msgspec.ValidationError:
        raise
    except DECODE_ERRORS:
        raise BadBody("request body is not valid JSON") from None
    if len(raw_ticks) > max_ticks:
        raise TooManyTicks(len(raw_ticks))
    valid, rejected = [], []
    for index, raw in enumerate(raw_ticks):
        try:
            valid.append(decode_tick(raw, now_us, max_age_us, times, index))
        except ValueError as exc:
            rejected.append((index, raw, str(exc)))
    return valid, rejected
