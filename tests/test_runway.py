"""Burn and runway (billing-rules 2.10) and auto-recharge on the runway (9.2), in the pure core:
what an hour of the live leases costs, how long the money lasts at it, one `balance.runway_low`
per crossing, one charge when the runway falls under its threshold, and a replay that decides
the same. The engine is checked against the reference model in tests/test_differential.py."""

from __future__ import annotations

import msgspec
import pytest

from actors.commands import (JOURNAL_ENCODER, AcquireLease, ApplyUsage, Credit, JournalItem, ReleaseLease,
                             SetAlerts, SetAutoRecharge, SettleRecharge, execute)
from actors.org import OrgBillingActor, Resources
from actors.runway import burn_micros_per_hour, runway_s
from tests.helpers import CATALOG, PAYG, T0, make_org, rebuilt_from, usage_costing

US = 1_000_000
# 1 GiB and 1 vCPU for an hour at payg: 4,500 × 3,600 nanos of memory + 14,000 × 3,600 of CPU.
SANDBOX = Resources(memory_mb=1_024, cpu_count=1)
SANDBOX_HOUR = 16_200 + 50_400


class Org:
    """One org fed commands as a shard would: each journaled, so a replay can be compared."""

    def __init__(self, **kwargs) -> None:
        self.org, self.fx = make_org(**kwargs)
        self.start = msgspec.msgpack.encode(self.org.to_snapshot())
        self.journal: list[bytes] = []
        self.now = T0

    def run(self, command, seconds: int = 1):
        self.now += seconds * US
        outcome = execute(self.org, command, CATALOG, self.now, self.fx)
        self.journal.append(JOURNAL_ENCODER.encode([JournalItem(self.now, command)]))
        return outcome

    def spend(self, micros: int):
        return self.run(ApplyUsage([usage_costing(micros, "ls_a")]))

    def events(self, kind: str = "balance.runway_low") -> list[dict]:
        return [e.data for e in self.fx.events if e.type == kind]

    def rebuilt(self) -> OrgBillingActor:
        return rebuilt_from(self.start, self.journal, self.org)


def test_the_burn_is_an_hour_of_each_live_leases_resources_rounded_up():
    o = Org()
    assert o.org.runway_at(o.now) is None and o.org.burn_at(o.now) == 0  # nothing runs
    o.run(AcquireLease("ls_a", SANDBOX, 600))
    o.run(AcquireLease("ls_b", Resources(memory_mb=1_024, cpu_count=1, quantity=2), 600))
    assert o.org.burn_at(o.now) == 3 * SANDBOX_HOUR
    assert o.org.runway_at(o.now) == 5 * US * 3_600 // (3 * SANDBOX_HOUR)
    # 1 MB of disk for an hour costs 30 × 3,600 / 1,024 nanos: 0.105… µUSD, rounded up to 1.
    assert burn_micros_per_hour(PAYG, [o.org.leases["ls_a"]]) == SANDBOX_HOUR
    disk = msgspec.structs.replace(o.org.leases["ls_a"], memory_mb=0, cpu_count=0, disk_mb=1)
    assert burn_micros_per_hour(PAYG, [disk]) == 1
    # A lease past its expiry burns nothing, though the org still holds it until its sweep.
    assert o.org.burn_at(o.now + 601 * US) == 0 and o.org.runway_at(o.now + 601 * US) is None
    o.run(ReleaseLease("ls_b"))
    assert o.org.burn_at(o.now) == SANDBOX_HOUR


def test_runway_arithmetic():
    assert runway_s(10, 0) is None
    assert runway_s(-5, 100) == 0
    assert runway_s(100, 3_600) == 100 and runway_s(99, 7_200) == 49


def test_a_postpaid_org_has_no_runway():
    o = Org(prepaid=False)
    o.run(AcquireLease("ls_a", SANDBOX, 600))
    assert o.org.burn_at(o.now) == SANDBOX_HOUR and o.org.runway_at(o.now) is None


def test_one_runway_low_event_per_crossing_with_the_leases_that_would_stop():
    o = Org()
    for lease in ("ls_a", "ls_b"):
        o.run(AcquireLease(lease, SANDBOX, 3_600))
    burn = 2 * SANDBOX_HOUR  # 60 minutes of it: 133,200 µUSD
    o.spend(5 * US - burn)  # exactly 60 minutes left: not under the alert
    assert o.org.runway_at(o.now) == 3_600 and o.events() == []
    o.spend(1)
    assert o.events() == [{"threshold_s": 3_600, "runway_s": 3_599, "burn_micros_per_hour": burn,
                           "balance_micros": burn - 1, "lease_ids": ["ls_a", "ls_b"]}]
    o.spend(10_000)  # still under: nothing more
    assert len(o.events()) == 1
    o.run(Credit("grant", 1 * US))  # back above: re-armed, silently
    assert len(o.events()) == 1 and o.org.runway_armed
    o.spend(1 * US)  # a new crossing
    assert len(o.events()) == 2 and o.events()[-1]["runway_s"] < 3_600
    o.rebuilt()


def test_the_runway_alert_is_set_per_org_and_off_at_zero():
    o = Org()
    o.run(AcquireLease("ls_a", SANDBOX, 3_600))
    o.run(SetAlerts(-1, 0))  # off; the low-balance alert left as it was
    o.spend(5 * US - 100)
    assert o.events() == []
    o.run(SetAlerts(-1, 60))  # 100 µUSD at 66,600 an hour: 5 seconds, under 60
    assert o.events() == [{"threshold_s": 60, "runway_s": 5, "burn_micros_per_hour": SANDBOX_HOUR,
                           "balance_micros": 100, "lease_ids": ["ls_a"]}]
    o.run(ReleaseLease("ls_a"))  # nothing runs: no runway; still disarmed
    assert o.org.runway_at(o.now) is None and not o.org.runway_armed
    o.rebuilt()


def test_starting_leases_again_while_the_money_is_low_is_no_new_crossing():
    """A CI org that starts and stops short sandboxes gets one event, not one per sandbox."""
    o = Org()
    big = Resources(memory_mb=65_536, cpu_count=32)  # 2.6 USD an hour: 5 USD last under 2 hours
    for n in range(5):
        o.run(AcquireLease(f"ls_{n}", big, 600))
        o.run(ReleaseLease(f"ls_{n}"))
    assert len(o.events()) == 0  # 5 USD at 2.6 USD/h: 6,793 s, above the hour
    o.run(SetAlerts(-1, 3 * 3_600))
    for n in range(5, 10):
        o.run(AcquireLease(f"ls_{n}", big, 600))
        o.run(ReleaseLease(f"ls_{n}"))
    assert [e["lease_ids"] for e in o.events()] == [["ls_5"]]
    o.run(Credit("grant", 10 * US))  # 15 USD: 5.7 hours at that burn
    o.run(AcquireLease("ls_10", big, 600))  # runs above the alert: re-armed
    assert o.org.runway_armed and len(o.events()) == 1
    o.rebuilt()


def test_the_org_view_survives_a_runway_of_centuries():
    """1 MB of disk burns 1 µUSD an hour: 75 USD last 270,000,000,000 s, past any date."""
    from serve_app.views import org_view

    o = Org()
    o.run(Credit("grant", 70 * US))
    o.run(AcquireLease("ls_a", Resources(disk_mb=1), 600))
    runway = org_view(o.org.state(o.now))["runway"]
    assert runway == {"burn_micros_per_hour": 1, "runway_s": 75 * US * 3_600, "runs_out_at": None}


def test_a_charge_asked_for_on_the_runway_brings_it_back_to_its_threshold_at_once():
    """0.50 USD would buy 11 minutes at 2.65 USD an hour: the charge is what brings the runway
    back to 24 hours (63.67 USD, whole cents), so the card is charged once, not every minute."""
    o = Org(card=True)
    big = Resources(memory_mb=65_536, cpu_count=32)
    o.run(AcquireLease("ls_a", big, 3_600))
    burn = o.org.burn_at(o.now)
    o.run(SetAutoRecharge(True, 1, 500_000, 100, 0, False, 86_400))
    (charge,) = o.fx.charges
    needed = -(-(86_400 * burn // 3_600 - 5 * US) // 10_000) * 10_000
    assert charge.amount_micros == needed > 500_000
    o.run(SettleRecharge.of_payment(charge.charge_id, True, charge.amount_micros, "pi_ar_1"))
    assert o.org.runway_at(o.now) >= 86_400
    o.spend(1_000)
    o.run(AcquireLease("ls_a", big, 3_600))
    assert len(o.fx.charges) == 1
    o.rebuilt()


def test_auto_recharge_on_the_runway_asks_for_one_charge_at_the_crossing():
    o = Org(card=True)
    for lease in ("ls_a", "ls_b"):
        o.run(AcquireLease(lease, SANDBOX, 3_600))
    # By the balance alone it would wait until 1 µUSD; by the runway it charges under 2 hours.
    o.run(SetAutoRecharge(True, 1, 10 * US, 3, 0, False, 7_200))
    assert o.fx.charges == []
    o.spend(5 * US - 2 * 2 * SANDBOX_HOUR)  # exactly 2 hours left
    assert o.fx.charges == []
    o.spend(1)
    assert [(c.charge_id, c.amount_micros) for c in o.fx.charges] == [("ar_1", 10 * US)]
    o.spend(1_000)  # in flight: no second charge
    assert len(o.fx.charges) == 1
    o.run(SettleRecharge.of_payment("ar_1", True, 10 * US, "pi_ar_1"))
    assert o.org.runway_at(o.now) > 7_200
    o.spend(1_000)
    assert len(o.fx.charges) == 1
    o.rebuilt()


@pytest.mark.parametrize("runway", [0, 600])
def test_without_a_runway_threshold_auto_recharge_waits_for_the_balance(runway):
    o = Org(card=True)
    o.run(AcquireLease("ls_a", SANDBOX, 3_600))
    o.run(SetAutoRecharge(True, 1_000_000, 10 * US, 3, 0, False, runway))
    o.spend(5 * US - 1_000_000)  # 15 hours left at 66,600 an hour: above both
    assert o.fx.charges == []
    o.spend(1)
    assert len(o.fx.charges) == 1  # under the balance threshold
