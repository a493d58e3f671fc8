"""The catalog: versioned plans (rate card, included quota, period), tiers, packs."""

from __future__ import annotations

import tomllib
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path

import msgspec

PERIODS = ("week", "month")
UNIT_NAME_MAX = 64
PAID_TIERS = ("pro", "pro_plus", "pro_plus_plus")
MICROS_PER_CENT = 10_000  # Stripe charges whole cents


# Each plan version's next version in the catalog that made it, by the version's own object:
# two catalogs in one process (a reload, the tests) may give one version different successors,
# and a lookup by id and version would take whichever was parsed last. Plan versions are
# immutable (a change is a new version), so this is configuration, not state: replaying an
# org's journal takes the same versions at the same period starts. An org holds only plans of
# its catalog (OrgBillingActor.from_snapshot resolves every plan it stores).
_SUCCESSORS: dict[int, tuple["Plan", "Plan"]] = {}


def plan_for_period(plan: "Plan", start_us: int) -> "Plan":
    """The version of `plan` that a period starting at start_us runs on."""
    while plan.effective_until_us is not None and plan.effective_until_us <= start_us:
        known = _SUCCESSORS.get(id(plan))
        if known is None or known[0] is not plan:
            break
        plan = known[1]
    return plan


class CatalogError(Exception):
    """The catalog file is not valid; the message says where."""


class Plan(msgspec.Struct, frozen=True):
    """One immutable plan version. Orgs hold a reference to the version they run on."""

    id: str
    version: int
    effective_from_us: int
    effective_until_us: int | None
    period: str
    included_micros: int
    overage: bool
    memory_nanos_per_gib_s: int
    cpu_nanos_per_vcpu_s: int
    disk_nanos_per_gib_s: int
    unit_nanos: dict[str, int]


class Pack(msgspec.Struct, frozen=True):
    id: str
    amount_micros: int
    expires_after_days: int | None = None


@dataclass(frozen=True)
class Catalog:
    default_plan: str
    signup_grant_micros: int
    default_max_disk_mb: int
    default_tier: str
    tiers: dict[str, int]
    plans: dict[tuple[str, int], Plan]
    packs: dict[str, Pack] = field(default_factory=dict)
    stripe_prices: dict[str, str] = field(default_factory=dict)  # paid tier -> Stripe price id
    # paid tier -> its monthly price, published to Stripe by `metergate stripe ensure-products`
    tier_monthly_micros: dict[str, int] = field(default_factory=dict)
    low_balance_micros: int = 0  # a new org's balance.threshold_crossed alert (0: off)
    runway_alert_s: int = 3_600  # a new org's balance.runway_low alert, seconds of runway (0: off)

    def plan_version(self, plan_id: str, version: int) -> Plan:
        plan = self.plans.get((plan_id, version))
        if plan is None:
            raise CatalogError(f"plan {plan_id!r} version {version} is not in the catalog")
        return plan

    def current_plan(self, plan_id: str, now_us: int) -> Plan | None:
        """The version of plan_id in effect at now_us, or None if the plan is unknown."""
        best: Plan | None = None
        for plan in self.plans.values():
            if plan.id != plan_id or plan.effective_from_us > now_us:
                continue
            if plan.effective_until_us is not None and plan.effective_until_us <= now_us:
                continue
            if best is None or plan.version > best.version:
                best = plan
        return best

    def tiers_on_sale(self) -> list[str]:
        """The paid tiers an org can buy: an explicit price id, or a monthly amount to publish."""
        return [tier for tier in PAID_TIERS
                if tier in self.tiers and (tier in self.stripe_prices or tier in self.tier_monthly_micros)]

    def plan_ids(self) -> list[str]:
        return sorted({plan_id for plan_id, _ in self.plans})


def _rfc3339_us(value: object, where: str) -> int:
    if isinstance(value, datetime):
        moment = value
    elif isinstance(value, str):
        try:
            moment = datetime.fromisoformat(value.replace("Z", "+00:00"))
        except ValueError:
            raise CatalogError(f"{where}: {value!r} is not an RFC 3339 time") from None
    else:
        raise CatalogError(f"{where}: expected an RFC 3339 time")
    if moment.tzinfo is None:
        raise CatalogError(f"{where}: time must carry a UTC offset")
    return int(moment.timestamp()) * 1_000_000 + moment.microsecond


def _nonneg_int(raw: dict, key: str, where: str) -> int:
    value = raw.get(key)
    if not isinstance(value, int) or isinstance(value, bool) or value < 0:
        raise CatalogError(f"{where}.{key}: expected a non-negative integer, got {value!r}")
    return value


def _parse_plan(raw: dict, index: int) -> Plan:
    where = f"plans[{index}]"
    plan_id = raw.get("id")
    if not isinstance(plan_id, str) or not plan_id:
        raise CatalogError(f"{where}.id: expected a non-empty string")
    period = raw.get("period")
    if period not in PERIODS:
        raise CatalogError(f"{where}.period: expected one of {PERIODS}, got {period!r}")
    version = raw.get("version")
    if not isinstance(version, int) or version < 1:
        raise CatalogError(f"{where}.version: expected an integer >= 1")
    unit_nanos = raw.get("unit_nanos", {})
    if not isinstance(unit_nanos, dict):
        raise CatalogError(f"{where}.unit_nanos: expected a table")
    for name in unit_nanos:
        if not name or len(name) > UNIT_NAME_MAX:
            raise CatalogError(f"{where}.unit_nanos: bad unit name {name!r}")
        _nonneg_int(unit_nanos, name, f"{where}.unit_nanos")
    until = raw.get("effective_until")
    return Plan(
        id=plan_id,
        version=version,
        effective_from_us=_rfc3339_us(raw.get("effective_from"), f"{where}.effective_from"),
        effective_until_us=None if until is None else _rfc3339_us(until, f"{where}.effective_until"),
        period=period,
        included_micros=_nonneg_int(raw, "included_micros", where),
        overage=bool(raw.get("overage", True)),
        memory_nanos_per_gib_s=_nonneg_int(raw, "memory_nanos_per_gib_s", where),
        cpu_nanos_per_vcpu_s=_nonneg_int(raw, "cpu_nanos_per_vcpu_s", where),
        disk_nanos_per_gib_s=_nonneg_int(raw, "disk_nanos_per_gib_s", where),
        unit_nanos=dict(unit_nanos),
    )


def _tier_monthly_micros(raw: object) -> dict[str, int]:
    if not isinstance(raw, dict):
        raise CatalogError("tier_monthly_micros: expected a table")
    for tier in raw:
        if tier not in PAID_TIERS:
            raise CatalogError(f"tier_monthly_micros.{tier}: not a paid tier (one of {PAID_TIERS})")
        amount = _nonneg_int(raw, tier, "tier_monthly_micros")
        if amount == 0 or amount % MICROS_PER_CENT:
            raise CatalogError(f"tier_monthly_micros.{tier}: expected a positive whole number of cents, got {amount}")
    return dict(raw)


def parse_catalog(raw: dict) -> Catalog:
    plans: dict[tuple[str, int], Plan] = {}
    for index, raw_plan in enumerate(raw.get("plans", [])):
        plan = _parse_plan(raw_plan, index)
        if (plan.id, plan.version) in plans:
            raise CatalogError(f"plans[{index}]: {plan.id} version {plan.version} appears twice")
        plans[(plan.id, plan.version)] = plan
    tiers = raw.get("tiers", {})
    for name in ("base", "pro", "pro_plus", "pro_plus_plus", "custom"):
        if name not in tiers:
            raise CatalogError(f"tiers.{name}: missing")
        _nonneg_int(tiers, name, "tiers")
    packs = {}
    for index, raw_pack in enumerate(raw.get("packs", [])):
        pack = Pack(
            id=str(raw_pack.get("id", "")),
            amount_micros=_nonneg_int(raw_pack, "amount_micros", f"packs[{index}]"),
            expires_after_days=raw_pack.get("expires_after_days"),
        )
        packs[pack.id] = pack
    catalog = Catalog(
        default_plan=str(raw.get("default_plan", "")),
        signup_grant_micros=_nonneg_int(raw, "signup_grant_micros", "catalog"),
        default_max_disk_mb=_nonneg_int(raw, "default_max_disk_mb", "catalog"),
        default_tier=str(raw.get("default_tier", "base")),
        tiers={name: int(cap) for name, cap in tiers.items()},
        plans=plans,
        packs=packs,
        stripe_prices={str(k): str(v) for k, v in raw.get("stripe_prices", {}).items()},
        low_balance_micros=_nonneg_int(raw, "low_balance_micros", "catalog") if "low_balance_micros" in raw else 0,
        tier_monthly_micros=_tier_monthly_micros(raw.get("tier_monthly_micros", {})),
        runway_alert_s=_nonneg_int(raw, "runway_alert_s", "catalog") if "runway_alert_s" in raw else 3_600,
    )
    for plan in plans.values():
        other_kind = [p.version for p in plans.values() if p.id == plan.id and p.period != plan.period]
        if other_kind:
            raise CatalogError(f"plans: {plan.id} version {plan.version} is per {plan.period} but version "
                               f"{other_kind[0]} is not; every version of a plan has one period")
        later = [p for p in plans.values() if p.id == plan.id and p.version > plan.version]
        if later:
            _SUCCESSORS[id(plan)] = (plan, min(later, key=lambda p: p.version))
    if not any(plan_id == catalog.default_plan for plan_id, _ in plans):
        raise CatalogError(f"default_plan {catalog.default_plan!r} is not a plan in the catalog")
    if catalog.default_tier not in catalog.tiers:
        raise CatalogError(f"default_tier {catalog.default_tier!r} is not a tier")
    return catalog


def load_catalog(path: Path) -> Catalog:
    try:
        raw = tomllib.loads(Path(path).read_text())
    except (OSError, tomllib.TOMLDecodeError) as exc:
        raise CatalogError(f"{path}: {exc}") from None
    return parse_catalog(raw)
