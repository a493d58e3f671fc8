"""Exact usage cost: integer rates, scaled integer arithmetic, remainder carried per org.

One scaled unit is 1/1,024,000 of a nano-USD, so every rate of the catalog turns a usage
quantity into an integer number of scaled units without rounding:
  memory  nanos/GiB-s × MB·ms   → scaled = rate × mb_ms           (GiB = 1024 MB, s = 1000 ms)
  cpu     nanos/vCPU-s × vCPU·ms → scaled = rate × cpu_ms × 1024
  unit    nanos/unit × units     → scaled = rate × units × 1,024,000
Costs of ticks add as integers; only the org's running total is divided into micro-USD and
the remainder is kept, so one 60 s tick costs exactly what sixty 1 s ticks cost.
"""

from __future__ import annotations

import msgspec

from config.catalog import Plan

SCALED_PER_NANO = 1_024_000
SCALED_PER_MICRO = SCALED_PER_NANO * 1_000


class UnknownUnit(ValueError):
    """A usage unit the org's plan has no rate for."""


class LeaseUsage(msgspec.Struct, array_like=True):
    """Usage of one lease, summed over any number of ticks (sums keep cost exact)."""

    lease_id: str
    memory_mb_ms: int = 0
    cpu_ms: int = 0
    disk_mb_ms: int = 0
    units: dict[str, int] | None = None
    ticks: int = 0
    duration_ms: int = 0  # lease time (not priced): usage hours in the monthly accounting

    def add(self, other: "LeaseUsage") -> None:
        self.duration_ms += other.duration_ms
        self.memory_mb_ms += other.memory_mb_ms
        self.cpu_ms += other.cpu_ms
        self.disk_mb_ms += other.disk_mb_ms
        self.ticks += other.ticks
        if other.units:
            # A new dict, never the one held: a usage may share its units with another (a copy
            # made with structs.replace), and adding into it would count them twice.
            units = dict(self.units) if self.units else {}
            for name, count in other.units.items():
                units[name] = units.get(name, 0) + count
            self.units = units


def cost_scaled(plan: Plan, usage: LeaseUsage) -> int:
    scaled = (
        plan.memory_nanos_per_gib_s * usage.memory_mb_ms
        + plan.disk_nanos_per_gib_s * usage.disk_mb_ms
        + plan.cpu_nanos_per_vcpu_s * usage.cpu_ms * 1024
    )
    if usage.units:
        for name, count in usage.units.items():
            rate = plan.unit_nanos.get(name)
            if rate is None:
                raise UnknownUnit(name)
            scaled += rate * count * SCALED_PER_NANO
    return scaled


def split_micros(remainder_scaled: int, cost: int) -> tuple[int, int]:
    """(whole micro-USD to debit now, scaled remainder to carry)."""
    return divmod(remainder_scaled + cost, SCALED_PER_MICRO)
