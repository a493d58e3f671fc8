"""Usage parity against the platform's own numbers (docs/operations/parity.md): the body the
platform posts, its exact conversion to metergate's units, and the comparison per org and UTC
hour, pure (no I/O: serve_app/routes/parity.py reads and writes).

Every quantity is an integer in the units metergate meters: MB·ms of memory, vCPU·ms, MB·ms of
disk, counts of each unit. The platform may give memory, vCPU and disk in GiB-seconds and
vCPU-seconds instead, as decimal strings: they are converted exactly (1 GiB-s = 1,024 MB x
1,000 ms = 1,024,000 MB·ms; 1 vCPU-s = 1,000 vCPU·ms), and a figure that is not a whole number
of metergate's units is refused rather than rounded. Whether a quantity is within the tolerance
is decided with integers: |ours - theirs| x 1,000,000 <= tolerance_ppm x max(ours, theirs).
The ratio (ours / theirs) is a decimal string for people, never an input to that decision.
"""

from __future__ import annotations

from dataclasses import dataclass
from decimal import Decimal, localcontext
from typing import Annotated

from pydantic import Field

from actors.timeutil import BadTime, parse_time_us, us_to_rfc3339
from serve_app.bodies import OrgId, StrictModel, Text
from serve_app.errors import ApiError
from storage.parity import HOUR_US, HourUsage

MAX_POST_ORG_HOURS = 200  # per POST /v1/parity/usage; a body also stays under METERGATE_MAX_BODY_BYTES
MAX_UNIT_NAMES = 64  # per org and hour
MAX_QUANTITY = 10**18  # of any quantity of an org and hour, in metergate's units: below 2**63
PPM = 1_000_000
DEFAULT_TOLERANCE_PPM = 100  # 0.01 %; the edge-billing cutover saw 0.007 %
RATIO_DECIMALS = 6
# (the field in metergate's units, the decimal alternative, how many of metergate's units one is)
CONVERTED = (("memory_mb_ms", "memory_gib_s", 1_024_000), ("cpu_ms", "cpu_vcpu_s", 1_000),
             ("disk_mb_ms", "disk_gib_s", 1_024_000))
QUANTITIES = tuple(field for field, _, _ in CONVERTED)

Quantity = Annotated[int, Field(ge=0, le=MAX_QUANTITY)]
DecimalText = Annotated[str, Field(min_length=1, max_length=40, pattern=r"^[0-9]{1,19}(\.[0-9]{1,12})?$")]


class PostedHourBody(StrictModel):
    """The platform's usage of one org in one UTC hour. Each of memory, vCPU and disk in
    metergate's units (integers) or in GiB-s / vCPU-s (decimal strings), not both; one not
    given is 0."""

    org_id: OrgId
    hour: str | int  # the hour's start: RFC 3339 or an epoch number
    memory_mb_ms: Quantity | None = None
    memory_gib_s: DecimalText | None = None
    cpu_ms: Quantity | None = None  # vCPU·ms
    cpu_vcpu_s: DecimalText | None = None
    disk_mb_ms: Quantity | None = None
    disk_gib_s: DecimalText | None = None
    units: Annotated[dict[Text, Quantity], Field(max_length=MAX_UNIT_NAMES)] | None = None


class UsageParityBody(StrictModel):
    usage: Annotated[list[PostedHourBody], Field(min_length=1, max_length=MAX_POST_ORG_HOURS)]


def _field_error(index: int, field: str, message: str) -> ApiError:
    name = f"usage.{index}.{field}"
    return ApiError(422, "invalid_request", f"{name}: {message}", field=name)


def exact_units(text: str, per_unit: int) -> int | None:
    """A decimal string times `per_unit`, if that is a whole number (None if not): no float."""
    with localcontext() as context:
        context.prec = 60  # the pattern allows 31 digits, times 7 of per_unit: exact, never rounded
        value = Decimal(text) * per_unit
    return int(value) if value == value.to_integral_value() else None


def hour_usage(body: UsageParityBody) -> list[HourUsage]:
    """The posted hours in metergate's units; a 422 naming the first field that cannot be."""
    rows, seen = [], {}
    for index, item in enumerate(body.usage):
        try:
            hour_us = parse_time_us(item.hour)
        except BadTime as exc:
            raise _field_error(index, "hour", str(exc)) from None
        if hour_us % HOUR_US:
            raise _field_error(index, "hour", "must be the start of a UTC hour (like 2026-12-07T10:00:00Z)")
        quantities = []
        for field, decimal_field, per_unit in CONVERTED:
            whole, text = getattr(item, field), getattr(item, decimal_field)
            if whole is not None and text is not None:
                raise _field_error(index, decimal_field, f"give {field} or {decimal_field}, not both")
            if text is not None:
                whole = exact_units(text, per_unit)
                if whole is None:
                    raise _field_error(index, decimal_field, f"{text} is not a whole number of {field} "
                                       f"({per_unit:,} per unit); give {field} as an integer instead")
                if whole > MAX_QUANTITY:
                    raise _field_error(index, decimal_field, f"is more than {MAX_QUANTITY} {field}")
            quantities.append(whole or 0)
        first = seen.setdefault((item.org_id, hour_us), index)
        if first != index:
            raise _field_error(index, "hour", f"org {item.org_id} and this hour are also at usage.{first}")
        units = {name: count for name, count in (item.units or {}).items() if count}
        rows.append(HourUsage(item.org_id, hour_us, *quantities, units))
    return rows


# ----- the comparison -----------------------------------------------------------------------


def ratio_text(ours: int, theirs: int) -> str | None:
    """ours / theirs to RATIO_DECIMALS, rounded half up, from integers; None when theirs is 0
    and ours is not (no ratio), "1.000000" when both are 0."""
    if theirs == 0:
        return None if ours else f"1.{'0' * RATIO_DECIMALS}"
    scaled, rest = divmod(ours * 10**RATIO_DECIMALS, theirs)
    scaled += 1 if 2 * rest >= theirs else 0
    whole, fraction = divmod(scaled, 10**RATIO_DECIMALS)
    return f"{whole}.{fraction:0{RATIO_DECIMALS}d}"


def within(ours: int, theirs: int, tolerance_ppm: int) -> bool:
    assert ours >= 0 and theirs >= 0 and 0 <= tolerance_ppm <= PPM
    return abs(ours - theirs) * PPM <= tolerance_ppm * max(ours, theirs)


def quantity_view(ours: int, theirs: int, tolerance_ppm: int) -> dict:
    return {"ours": ours, "theirs": theirs, "difference": ours - theirs, "ratio": ratio_text(ours, theirs),
            "within_tolerance": within(ours, theirs, tolerance_ppm)}


@dataclass(frozen=True, slots=True)
class ParityReport:
    org_hours: list[dict]  # by hour, then org
    outside_tolerance: int
    only_metergate: int
    only_platform: int


def compare(ours: list[HourUsage], theirs: list[HourUsage], tolerance_ppm: int) -> ParityReport:
    """Each org and hour either side has, compared quantity by quantity (a side without the
    org and hour counts as 0 of everything, and `only` names the side that has it)."""
    metered = {(u.hour_us, u.org_id): u for u in ours}
    posted = {(u.hour_us, u.org_id): u for u in theirs}
    assert len(metered) == len(ours) and len(posted) == len(theirs)
    org_hours, outside = [], 0
    for key in sorted(metered.keys() | posted.keys()):
        a, b = metered.get(key), posted.get(key)
        view: dict = {"org_id": key[1], "hour": us_to_rfc3339(key[0]),
                      "only": None if a and b else "metergate" if a else "platform"}
        for field in QUANTITIES:
            view[field] = quantity_view(getattr(a, field, 0), getattr(b, field, 0), tolerance_ppm)
        units_a, units_b = (a.units if a else {}), (b.units if b else {})
        view["units"] = {name: quantity_view(units_a.get(name, 0), units_b.get(name, 0), tolerance_ppm)
                         for name in sorted(units_a.keys() | units_b.keys())}
        ok = all(view[f]["within_tolerance"] for f in QUANTITIES) and all(
            q["within_tolerance"] for q in view["units"].values())
        view["within_tolerance"] = ok
        outside += not ok
        org_hours.append(view)
    return ParityReport(org_hours, outside, sum(1 for v in org_hours if v["only"] == "metergate"),
                        sum(1 for v in org_hours if v["only"] == "platform"))
