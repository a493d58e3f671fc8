"""One request's ticks for one org → the commands that bill them (billing-rules 6).

Pure, like the core: the shard calls it inside its group commit, after the commands queued
before it, and the differential test calls it the same way. A tick is billed on the plan the
org is on when the tick is applied: time is applied first (a new period may run on another
plan version), so a unit the plan no longer prices rejects that tick alone, never the request.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from actors.commands import Advance, ApplyUsage, Command, execute
from actors.effects import Effects
from actors.metering import LeaseUsage
from actors.org import OrgBillingActor
from actors.ticks import Tick
from config.catalog import Catalog


@dataclass
class Billed:
    commands: list[Command] = field(default_factory=list)  # applied, in order: what the journal keeps
    ticks: list[Tick] = field(default_factory=list)  # billed
    unpriced: list[Tick] = field(default_factory=list)  # rejected: a unit the plan does not price


def priced(tick: Tick, unit_nanos: dict[str, int]) -> bool:
    return not tick.units or all(name in unit_nanos for name in tick.units)


def usage_by_lease(ticks: list[Tick]) -> list[LeaseUsage]:
    """The ticks summed per lease (sums keep cost exact), each from a usage of its own: what
    summing their Tick.usage() with LeaseUsage.add gives, without a usage per tick (this runs
    for every tick of every usage request)."""
    sums: dict[str, list] = {}  # lease → [memory_mb_ms, cpu_ms, disk_mb_ms, units, ticks, duration_ms]
    for tick in ticks:
        d = tick.duration_ms
        held = sums.get(tick.lease_id)
        if held is None:
            sums[tick.lease_id] = held = [tick.memory_mb * d, tick.cpu_count * d, tick.disk_mb * d, None, 1, d]
        else:
            held[0] += tick.memory_mb * d
            held[1] += tick.cpu_count * d
            held[2] += tick.disk_mb * d
            held[4] += 1
            held[5] += d
        if tick.units:
            for name, count in tick.units.items():
                if count:  # a unit counted 0 is no unit (Tick.usage)
                    units = held[3]
                    if units is None:
                        held[3] = units = {}
                    units[name] = units.get(name, 0) + count
    return [LeaseUsage(lease_id, memory, cpu, disk, units, count, duration)
            for lease_id, (memory, cpu, disk, units, count, duration) in sums.items()]


def bill_ticks(org: OrgBillingActor, ticks: list[Tick], catalog: Catalog, now_us: int, fx: Effects) -> Billed:
    """Apply time, then bill the ticks the org's plan prices, as one usage command."""
    billed = Billed()
    if org.next_due_us() <= now_us:
        billed.commands.append(Advance())
        execute(org, billed.commands[-1], catalog, now_us, fx, alerts=False)  # pragma: no mutate (time reads no catalog)
    unit_nanos = org.plan.unit_nanos
    for tick in ticks:
        (billed.ticks if priced(tick, unit_nanos) else billed.unpriced).append(tick)
    if billed.ticks:
        billed.commands.append(ApplyUsage(usage_by_lease(billed.ticks)))
        execute(org, billed.commands[-1], catalog, now_us, fx)  # pragma: no mutate (usage reads no catalog)
    elif billed.commands:
        org.check_alerts(now_us, fx)  # one check for the request: it billed nothing
    return billed
