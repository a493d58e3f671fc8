"""UTC time as integer microseconds: epoch parsing, RFC 3339 output, billing periods."""

from __future__ import annotations

from datetime import date, datetime, timedelta, timezone

US_PER_S = 1_000_000
# Plausible instants: 2000-01-01 .. 2100-01-01. An epoch number is read as s, ms, µs or ns
# by which of these ranges it falls in; the ranges do not overlap, so the unit is unambiguous.
_MIN_S = 946_684_800
_MAX_S = 4_102_444_800
MAX_PLAUSIBLE_S = _MAX_S  # no time this service reads or writes is later
_EPOCH_SCALES = ((1, 1_000_000), (1_000, 1_000), (1_000_000, 1), (1_000_000_000, None))


class BadTime(ValueError):
    """A time input that is not RFC 3339 or a plausible epoch number."""


def epoch_to_us(value: int) -> int:
    for per_s, to_us in _EPOCH_SCALES:
        if _MIN_S * per_s <= value < _MAX_S * per_s:
            return value * to_us if to_us is not None else value // 1_000
    raise BadTime(f"epoch {value} is not a plausible time in s, ms, µs or ns")


def rfc3339_to_us(text: str) -> int:
    try:
        moment = datetime.fromisoformat(text.replace("Z", "+00:00").replace("z", "+00:00"))
    except ValueError:
        raise BadTime(f"{text!r} is not an RFC 3339 time") from None
    if moment.tzinfo is None:
        raise BadTime(f"{text!r} has no UTC offset")
    delta = moment - datetime(1970, 1, 1, tzinfo=timezone.utc)
    us = (delta.days * 86_400 + delta.seconds) * US_PER_S + delta.microseconds
    if not _MIN_S * US_PER_S <= us < _MAX_S * US_PER_S:
        raise BadTime(f"{text!r} is not a plausible time")
    return us


def parse_time_us(value: object) -> int:
    """RFC 3339 string or epoch number (s/ms/µs/ns by magnitude) → µs since the epoch."""
    if isinstance(value, bool):
        raise BadTime("expected a time, got a boolean")
    if isinstance(value, int):
        return epoch_to_us(value)
    if isinstance(value, str):
        return rfc3339_to_us(value)
    raise BadTime("expected an RFC 3339 string or an epoch number")


def us_to_rfc3339(us: int) -> str:
    moment = datetime(1970, 1, 1, tzinfo=timezone.utc) + timedelta(microseconds=us)
    if moment.microsecond:
        return moment.strftime("%Y-%m-%dT%H:%M:%S.%fZ")
    return moment.strftime("%Y-%m-%dT%H:%M:%SZ")


def _date_us(day: date) -> int:
    return (day - date(1970, 1, 1)).days * 86_400 * US_PER_S


def period_bounds(period: str, now_us: int) -> tuple[str, int, int]:
    """(key, start_us, end_us) of the billing period containing now_us: ISO week or month."""
    today = date(1970, 1, 1) + timedelta(days=now_us // (86_400 * US_PER_S))
    if period == "week":
        year, week, weekday = today.isocalendar()
        start = today - timedelta(days=weekday - 1)
        return f"{year}-W{week:02d}", _date_us(start), _date_us(start + timedelta(days=7))
    if period == "month":
        start = today.replace(day=1)
        end = date(start.year + (start.month == 12), start.month % 12 + 1, 1)
        return f"{start.year}-{start.month:02d}", _date_us(start), _date_us(end)
    raise ValueError(f"unknown period {period!r}")


def minute_us(us: int) -> int:
    return us - us % (60 * US_PER_S)
