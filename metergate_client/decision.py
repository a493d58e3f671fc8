"""The gate: may an org do an action now? A pure function of the few facts it reads.

One function for everyone who decides: the ingress answers POST /v1/gate with it from the
views its shards publish, and a gateway's GateClient answers from the same views in its own
process (DESIGN.md, gate projection). So `decide` reads a GateView, never the org, and
answers a reason, never an HTTP status: the edge maps reasons to statuses. It lives in the
client package, which needs neither Ray nor the server, so that there is one copy of it.
"""

from __future__ import annotations

from collections.abc import Mapping
from enum import StrEnum
from typing import Annotated

import msgspec

ACTIONS = ("create", "wake", "ingest", "purchase")


class Reason(StrEnum):
    OK = "ok"
    INSUFFICIENT_BALANCE = "insufficient_balance"
    HALTED = "halted"
    SUSPENDED = "suspended"
    QUOTA_EXCEEDED = "quota_exceeded"
    NO_PAYMENT_METHOD = "no_payment_method"
    CONCURRENCY_LIMIT = "concurrency_limit"
    RESOURCE_LIMIT = "resource_limit"
    DEGRADED = "degraded"


class HaltCause(StrEnum):
    BALANCE = "balance"  # ran out of money: money (a credit, new quota) lifts it
    ADMIN = "admin"  # an operator's: only an operator lifts it


class Resources(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    memory_mb: int = 0
    cpu_count: int = 0
    disk_mb: int = 0
    machine_type: str | None = None
    region: str | None = None
    quantity: int = 1


# What a request may ask for (docs/gate-protocol.md 3.2): the one statement of these bounds,
# read by the server's and the relay's bodies and by the clients' local checks. Text that is
# stored or shown carries no control characters (Postgres refuses NUL in text and jsonb, and no
# log line or page should carry the others); `$` also matches before a final newline in a
# search, so the lookahead.
NAME_PATTERN = r"^[^\x00-\x1f\x7f]+$"
# Nor a lone UTF-16 surrogate, which no UTF-8 body can carry (pydantic's Rust regex cannot
# even name one, so only here).
WHOLE_NAME_PATTERN = r"^[^\x00-\x1f\x7f\ud800-\udfff]+$(?!\n)"
Name = Annotated[str, msgspec.Meta(min_length=1, max_length=64, pattern=WHOLE_NAME_PATTERN)]
MAX_SIZE = 1 << 40  # memory_mb and disk_mb
MAX_CPU_COUNT = 1024
MAX_QUANTITY = 10_000


class ResourcesIn(msgspec.Struct, forbid_unknown_fields=True):
    """The resources a gate check or a lease asks for (docs/gate-protocol.md 3.2)."""

    memory_mb: Annotated[int, msgspec.Meta(ge=0, le=MAX_SIZE)] = 0
    cpu_count: Annotated[int, msgspec.Meta(ge=0, le=MAX_CPU_COUNT)] = 0
    disk_mb: Annotated[int, msgspec.Meta(ge=0, le=MAX_SIZE)] = 0
    machine_type: Name | None = None
    region: Name | None = None
    quantity: Annotated[int, msgspec.Meta(ge=1, le=MAX_QUANTITY)] = 1

    def to_core(self) -> Resources:
        return Resources(self.memory_mb, self.cpu_count, self.disk_mb, self.machine_type,
                         self.region, self.quantity)


NO_RESOURCES = Resources()


class BadResources(TypeError, ValueError):
    """Resources no request could carry: a wrong type or a value out of bounds."""


FIELDS_HINT = "fields: memory_mb, cpu_count, disk_mb, machine_type, region, quantity"


def resources_from(value: object) -> Resources:
    """Resources from a Resources or a mapping with the HTTP body's field names, checked as the
    server checks a body's; anything else is BadResources saying what was expected."""
    if value is None:
        return NO_RESOURCES
    if isinstance(value, Resources):
        value = msgspec.to_builtins(value)
    elif not isinstance(value, Mapping):
        raise BadResources(f"resources must be a metergate_client.Resources or a mapping with the HTTP body's "
                           f"field names ({FIELDS_HINT}), not {type(value).__name__}")
    try:
        return msgspec.convert(dict(value), ResourcesIn).to_core()
    except msgspec.ValidationError as exc:
        raise BadResources(f"resources: {exc} ({FIELDS_HINT})") from None


class Decision(msgspec.Struct, omit_defaults=True, frozen=True):
    allowed: bool
    reason: Reason
    balance_micros: int
    active_leases: int
    max_concurrent: int
    limit: int | None = None
    requested: int | None = None
    in_use: int | None = None
    resource: str | None = None
    # A shadow org's (billing-rules 2.12): every answer allows; the decision an enforced org
    # would get is here. None (omitted) for an enforced org.
    would_allow: bool | None = None
    would_reason: Reason | None = None


class GateView(msgspec.Struct, frozen=True):
    """What the gate reads of an org, as of one instant."""

    balance_micros: int
    quota_remaining_micros: int
    included_micros: int  # the plan's quota: running out then says quota_exceeded
    active_leases: int
    max_concurrent: int
    max_disk_mb: int
    halted: HaltCause | None
    suspended: bool
    degraded: bool
    overdraws: bool  # postpaid with overage: usage past credit is invoiced, never denied
    needs_card: bool  # free credit used up and nothing to pay with: the user must add a card
    machine_quotas: dict[str, dict[str, int]] | None = None
    machine_in_use: dict[str, dict[str, int]] | None = None  # active, by region and machine type
    shadow: bool = False  # billed beside another biller (billing-rules 2.12): every check is allowed


def decide(action: str, resources: Resources, view: GateView) -> Decision:
    """The decision for `action` ("create", "wake", "ingest" or "purchase"). Called for every
    gate check of every gateway, so it is written flat: one reason, then one Decision."""
    reason = _reason(action, resources, view)
    if view.shadow:  # allowed, whatever it would be (billing-rules 2.12)
        return Decision(True, Reason.OK, view.balance_micros, view.active_leases, view.max_concurrent,
                        would_allow=reason is Reason.OK, would_reason=reason)
    if reason is Reason.OK:
        return Decision(True, reason, view.balance_micros, view.active_leases, view.max_concurrent)
    if reason is Reason.RESOURCE_LIMIT:
        return Decision(False, reason, view.balance_micros, view.active_leases, view.max_concurrent,
                        **_resource_deny(resources, view))
    return Decision(False, reason, view.balance_micros, view.active_leases, view.max_concurrent)


def _reason(action: str, resources: Resources, view: GateView) -> Reason:
    if view.suspended:
        return Reason.SUSPENDED
    if action == "purchase":
        return Reason.DEGRADED if view.degraded else Reason.OK
    if action not in _CHECKED:
        raise ValueError(f"no such action: {action!r}")
    halted = view.halted
    if halted is HaltCause.ADMIN:
        return Reason.HALTED
    # A balance halt is lifted by the next mutation once money or new quota exists; a
    # read-only gate must not deny in the meantime (e.g. right after a period starts).
    funded = view.balance_micros + view.quota_remaining_micros > 0
    if not funded:
        if halted is HaltCause.BALANCE:
            return Reason.NO_PAYMENT_METHOD if action == "create" and view.needs_card else Reason.HALTED
        if not view.overdraws:
            if action == "create" and view.needs_card:
                return Reason.NO_PAYMENT_METHOD
            return Reason.QUOTA_EXCEEDED if view.included_micros > 0 else Reason.INSUFFICIENT_BALANCE
    if action != "ingest":  # create, wake: what they would hold
        if resources.disk_mb > view.max_disk_mb or (view.machine_quotas and _resource_deny(resources, view)):
            return Reason.RESOURCE_LIMIT
        if view.active_leases + resources.quantity > view.max_concurrent:
            return Reason.CONCURRENCY_LIMIT
    return Reason.OK


_CHECKED = frozenset({"create", "wake", "ingest"})


def _resource_deny(resources: Resources, view: GateView) -> dict | None:
    if resources.disk_mb > view.max_disk_mb:
        return {"limit": view.max_disk_mb, "requested": resources.disk_mb, "resource": "disk_mb"}
    if view.machine_quotas and resources.region and resources.machine_type:
        limit = view.machine_quotas.get(resources.region, {}).get(resources.machine_type)
        if limit is not None:
            in_use = (view.machine_in_use or {}).get(resources.region, {}).get(resources.machine_type, 0)
            if in_use + resources.quantity > limit:
                return {"limit": limit, "requested": in_use + resources.quantity, "in_use": in_use,
                        "resource": f"machine_type:{resources.region}/{resources.machine_type}"}
    return None
