"""Microseconds since the epoch (what the code carries) ↔ timestamptz (what Postgres stores)."""

from __future__ import annotations

from datetime import datetime, timedelta, timezone

_EPOCH = datetime(1970, 1, 1, tzinfo=timezone.utc)


def us_to_dt(us: int) -> datetime:
    return _EPOCH + timedelta(microseconds=us)


def dt_to_us(moment: datetime) -> int:
    """Exact: no float on the way."""
    return (moment - _EPOCH) // timedelta(microseconds=1)


def optional_dt(us: int | None) -> datetime | None:
    return None if us is None else us_to_dt(us)
