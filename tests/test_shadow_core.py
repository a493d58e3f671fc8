"""Shadow mode and cutover (billing-rules 2.12) in the pure core: a shadow org is billed as any
but always allowed (the decision it would get rides along), asks for no charge, records its
halts as `*.shadow` events; a cutover at T ends that at T, exactly; an undo is refused once a
charge was asked. The engine is checked against the reference model in test_differential.py."""

from __future__ import annotations

import msgspec
import pytest

from actors.commands import (JOURNAL_ENCODER, AcquireLease, ApplyUsage, Credit, CreateOrg, Halt, JournalItem,
                             LeaseGranted, SetAutoRecharge, SetEnforcement, SetPaymentMethod, execute)
from actors.effects import Effects
from actors.enforcement import SHADOW_FOREVER_US, CutoverCharged
from actors.org import OrgBillingActor, Resources
from metergate_client.decision import Reason, decide
from tests.helpers import CATALOG, T0, rebuilt_from, usage_costing

US = 1_000_000
SMALL = Resources(memory_mb=1_024, cpu_count=1)


class Org:
    def __init__(self, shadow: bool = True) -> None:
        self.fx = Effects()
        self.org = execute(None, CreateOrg("ops@acme.test", "payg", True, shadow), CATALOG, T0, self.fx,
                           org_id="org_s").org
        self.start = msgspec.msgpack.encode(self.org.to_snapshot())
        self.journal: list[bytes] = []
        self.now = T0

    def run(self, command, seconds: int = 1):
        self.now += seconds * US
        self.journal.append(JOURNAL_ENCODER.encode([JournalItem(self.now, command)]))
        return execute(self.org, command, CATALOG, self.now, self.fx)

    def spend_all(self):
        return self.run(ApplyUsage([usage_costing(self.org.balance_micros + 1, "ls_a")]))

    def types(self) -> list[str]:
        return [e.type for e in self.fx.events]

    def rebuilt(self) -> OrgBillingActor:
        return rebuilt_from(self.start, self.journal, self.org)


def test_a_shadow_org_out_of_money_is_halted_inside_but_allowed_with_what_it_would_get():
    o = Org()
    o.spend_all()
    assert o.org.halted is not None and o.org.debt_micros > 0
    assert "org.halted.shadow" in o.types() and "org.halted" not in o.types()
    decision = o.org.gate("create", SMALL, o.now)
    assert (decision.allowed, decision.reason, decision.would_allow, decision.would_reason) == (
        True, Reason.OK, False, Reason.NO_PAYMENT_METHOD)
    assert o.org.gate("wake", SMALL, o.now).would_reason is Reason.HALTED
    # Leases: granted past the cap too, each with what it would have got.
    cap = o.org.max_concurrent
    for i in range(cap + 1):
        granted = o.run(AcquireLease(f"ls_{i}", SMALL, 600))
        assert isinstance(granted, LeaseGranted) and granted.shadowed.would_allow is False
    assert len(o.org.leases) == cap + 1
    # An enforced org's answers carry no would_*.
    enforced = Org(shadow=False)
    assert enforced.org.gate("create", SMALL, enforced.now).would_allow is None
    assert o.rebuilt().to_snapshot() == o.org.to_snapshot()


def test_a_shadow_org_asks_for_no_charge_until_its_cutover():
    o = Org()
    o.run(SetPaymentMethod(True))
    o.run(SetAutoRecharge(True, 5_000_000, 10_000_000, 3))
    o.spend_all()
    assert o.fx.charges == []
    # Cut over now: enforced, and the low balance asks for its charge at once.
    o.run(SetEnforcement("enforce"))
    assert o.org.enforcement(o.now) == "enforce" and len(o.fx.charges) == 1
    with pytest.raises(CutoverCharged):  # a charge was asked since: no undo
        o.run(SetEnforcement("shadow", undo=True))
    assert o.org.enforcement(o.now) == "enforce"
    o.run(SetEnforcement("shadow"))  # without undo, the operator may
    assert o.org.shadow_until_us == SHADOW_FOREVER_US
    assert o.rebuilt().to_snapshot() == o.org.to_snapshot()


def test_a_cutover_ahead_ends_the_view_at_its_instant_and_enforces_from_then():
    o = Org()
    o.spend_all()
    cutover = o.now + 3_600 * US
    o.run(SetEnforcement("enforce", cutover))
    view, until = o.org.view_as_of(o.now)
    assert view.shadow and until == cutover  # a gateway holding the view decides anew at T
    assert decide("create", SMALL, view).allowed
    after, _ = o.org.view_as_of(cutover)
    assert not after.shadow and decide("wake", SMALL, after).reason is Reason.HALTED
    # A halt of an instant in shadow is a shadow event; one after the cutover is sent as such.
    o.run(Credit("grant", 50_000_000, None, "back in funds"))
    assert "org.resumed.shadow" in o.types()[-2:]
    o.now = cutover
    o.spend_all()
    assert "org.halted" in o.types()[-2:]
    # An undo while nothing was charged since the cutover: shadow again.
    o.run(SetEnforcement("shadow", undo=True))
    assert o.org.in_shadow(o.now)
    assert o.rebuilt().to_snapshot() == o.org.to_snapshot()


def test_enforcement_of_an_enforced_org_and_an_undo_without_a_cutover():
    o = Org(shadow=False)
    o.run(SetEnforcement("enforce", o.now - 10 * US))
    assert o.org.shadow_until_us is None
    with pytest.raises(Exception, match="never cut over"):
        o.run(SetEnforcement("shadow", undo=True))
    o.run(Halt())
    assert o.types()[-1] == "org.halted"
    o.run(SetEnforcement("shadow"))
    assert o.org.state(o.now).enforcement == "shadow" and o.org.state(o.now).cutover_us is None


def test_a_cutover_tells_the_compute_plane_of_a_halt_it_only_had_as_a_shadow_event():
    """Billing-rules 2.12: the org halted in shadow; at its cutover the compute plane gets
    `org.halted` once, at once for a cutover now, at the first advance past it for one ahead."""
    now = Org()
    now.spend_all()
    now.run(SetEnforcement("enforce"))
    assert now.types().count("org.halted") == 1 and now.fx.events[-1].data["reason"] == "balance"
    now.run(AcquireLease("ls_x", SMALL, 600))  # denied now; nothing told again
    assert now.types().count("org.halted") == 1
    ahead = Org()
    ahead.spend_all()
    ahead.run(SetEnforcement("enforce", ahead.now + 60 * US))
    assert "org.halted" not in ahead.types()
    ahead.run(AcquireLease("ls_y", SMALL, 600), seconds=30)  # before T: still shadow, granted
    assert "org.halted" not in ahead.types()
    ahead.run(AcquireLease("ls_z", SMALL, 600), seconds=60)  # past T: told first, then denied
    assert ahead.types().count("org.halted") == 1
    assert ahead.fx.events[-1].data["lease_ids"] == ["ls_y"]
    assert ahead.rebuilt().to_snapshot() == ahead.org.to_snapshot()


def test_an_enforced_org_put_in_shadow_while_halted_is_told_to_run_and_its_own_halt_stays_real():
    """Billing-rules 2.12 (review): the compute plane stopped the org; in shadow it hears nothing
    more until a cutover, so it is told the org runs (`org.resumed`, reason `shadow`). A halt that
    time brought just before the switch went out as it was then: real."""
    o = Org(shadow=False)
    o.run(Halt())
    o.run(SetEnforcement("shadow"))
    assert o.types()[-2:] == ["org.halted", "org.resumed"] and o.fx.events[-1].data["reason"] == "shadow"
    o.run(SetEnforcement("enforce"))  # the cutover tells it again
    assert o.types()[-1] == "org.halted"
    assert o.rebuilt().to_snapshot() == o.org.to_snapshot()


def test_a_shadow_org_is_not_due_for_a_charge_and_its_cutover_is_due():
    """Review: a shadow org under its threshold is not woken for a charge it may not ask for;
    one with a cutover ahead is due at the cutover (to tell the compute plane then)."""
    o = Org()
    o.run(SetPaymentMethod(True))
    o.run(SetAutoRecharge(True, 5_000_000, 10_000_000, 3))
    o.spend_all()
    o.org.recharge.last_us = o.now - 3_600 * US  # charged once before (it was enforced then)
    assert o.org._recharge_retry_us() is not None  # a charge is wanted, by the balance alone
    assert o.org.next_due_us() == o.org.period_end_us  # ... but not in shadow
    cutover = o.now + 600 * US
    o.run(SetEnforcement("enforce", cutover))
    assert o.org.next_due_us() == cutover
