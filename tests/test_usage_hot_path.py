"""The per-tick work of the usage path, done per org or per lease (issue 23 part 4), gives what
the per-tick way gave: usage_by_lease against Tick.usage() summed with LeaseUsage.add, and a
commit's tick keys and refusals against tick_key and the shard's per-tick checks."""

from __future__ import annotations

import asyncio
import random

from actors.batch import UsageItem
from actors.metering import LeaseUsage
from actors.refusals import Refusal
from actors.shard_commit import ShardCommit, tick_key
from actors.ticks import Tick
from actors.usage import usage_by_lease


def reference_usage_by_lease(ticks: list[Tick]) -> list[LeaseUsage]:
    """The per-tick way: a usage per tick, added into the lease's first."""
    by_lease: dict[str, LeaseUsage] = {}
    for tick in ticks:
        usage = tick.usage()
        held = by_lease.get(tick.lease_id)
        if held is None:
            by_lease[tick.lease_id] = usage
        else:
            held.add(usage)
    return list(by_lease.values())


def random_ticks(rng: random.Random, n: int) -> list[Tick]:
    ticks = []
    for index in range(n):
        units = rng.choice([None, {}, {"gpu_s": 0}, {"gpu_s": rng.randint(0, 5)},
                            {"req": rng.randint(0, 3), "gpu_s": rng.randint(0, 5)}])
        ticks.append(Tick(f"t{index}", "org_a", rng.choice(["", "l1", "l2", "l3"]), 1_700_000_000_000_000,
                          rng.randint(0, 3_600_000), rng.randint(0, 4096), rng.randint(0, 8), rng.randint(0, 9999),
                          units, index))
    return ticks


def test_usage_by_lease_is_the_per_tick_sum():
    rng = random.Random(23)
    for _ in range(300):
        ticks = random_ticks(rng, rng.randint(1, 40))
        got, want = usage_by_lease(ticks), reference_usage_by_lease(ticks)
        assert got == want
        # unit order too (the journal encodes the dict as it is)
        assert [list((u.units or {}).items()) for u in got] == [list((u.units or {}).items()) for u in want]


def test_usage_by_lease_units_are_fresh_dicts():
    units = {"gpu_s": 2}
    tick = Tick("t0", "org_a", "l1", 0, 1_000, 0, 0, 0, units, 0)
    [usage] = usage_by_lease([tick, Tick("t1", "org_a", "l1", 0, 1_000, 0, 0, 0, {"gpu_s": 3}, 1)])
    assert usage.units == {"gpu_s": 5} and units == {"gpu_s": 2}


class Shard(ShardCommit):
    """What _candidate_ticks reads of a shard: its orgs, its slots (here: a set of org ids), the
    orgs it could not read."""

    def __init__(self, loaded: set[str], mine: set[str], unreadable: set[str]) -> None:
        self.orgs = {org_id: object() for org_id in loaded}
        self.mine = mine
        self.unreadable = {org_id: "bad row" for org_id in unreadable}

    def owns(self, org_id: str) -> bool:
        return org_id in self.orgs or org_id in self.mine


def test_candidate_ticks_keys_and_refusals_per_tick():
    shard = Shard(loaded={"a", "b"}, mine={"a", "b", "gone", "broken"}, unreadable={"broken"})
    loop = asyncio.new_event_loop()
    try:
        items = []
        for r in range(3):
            ticks = [Tick(f"id{n % 7}", org_id, "", 0, 1, 0, 0, 0, None, n)
                     for n, org_id in enumerate(["a", "b", "other", "gone", "broken", "a", "b"] * 3)]
            items.append(UsageItem(ticks, loop.create_future()))
        keys = shard._candidate_ticks(items)
    finally:
        loop.close()
    want: dict[bytes, Tick] = {}
    expected_errors = {"other": Refusal.WRONG_SHARD, "gone": Refusal.UNKNOWN_ORG, "broken": Refusal.ORG_UNREADABLE}
    for item in items:
        rejected = []
        for tick, key in zip(item.ticks, item.keys):
            if tick.org_id in expected_errors:
                assert key is None
                rejected.append({"index": tick.index, "tick_id": tick.tick_id, "org_id": tick.org_id,
                                 "error": expected_errors[tick.org_id]})
            else:
                assert key == tick_key(tick.org_id, tick.tick_id)
                want.setdefault(key, tick)
        assert item.rejected == rejected
    assert keys == want
    assert all(keys[k] is want[k] for k in want)  # the first tick of each key, the very object
