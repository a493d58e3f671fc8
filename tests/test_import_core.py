"""The import's pure parts (billing-rules 2.11, 9.4): a re-run lifts a pause for want of a Stripe
customer once the customer is linked, and a re-run of an unchanged org writes nothing; the
shard's batch is driven with a stand-in shard (no Ray, no Postgres)."""

from __future__ import annotations

import asyncio
from types import SimpleNamespace

from actors.batch import BatchWork, CommandItem, LoadedOrg
from actors.commands import ImportAmount, ImportOrg, SetAutoRecharge, SettleRecharge, execute
from actors.effects import Effects
from tests.helpers import CATALOG, T0

US = 1_000_000
MIN_US = 60 * US


def line(**more) -> ImportOrg:
    """An org of the source with 1 USD, a card and auto-recharge under 2 USD: charged at once."""
    recharge = SetAutoRecharge(True, 2 * US, 10 * US, 3, 60)
    return ImportOrg("a@example.com", [ImportAmount("o:balance", "adjustment", 1 * US)], card=True,
                     recharge=recharge, **more)


def imported(command: ImportOrg, now: int = T0):
    fx = Effects()
    return execute(None, command, CATALOG, now, fx, org_id="org_imp"), fx


def failed_for_want_of_a_customer():
    outcome, fx = imported(line())
    org = outcome.org
    (charge,) = fx.charges
    settle = Effects()
    execute(org, SettleRecharge(charge.charge_id, False, charge.amount_micros, None, "no_stripe_customer"),
            CATALOG, T0 + 11 * MIN_US, settle)
    return org


def test_a_charge_failed_for_want_of_a_customer_pauses_so_and_the_import_with_the_customer_lifts_it_alone():
    org = failed_for_want_of_a_customer()
    assert (org.recharge.paused, org.recharge.pending_id) == ("no_stripe_customer", None)

    fx = Effects()  # the same line again, its customer not linked yet: nothing
    assert execute(org, line(), CATALOG, T0 + 12 * MIN_US, fx).changed == []
    assert (org.recharge.paused, fx.charges, fx.ledger) == ("no_stripe_customer", [], [])

    fx = Effects()  # linked now: the pause lifts and the charge is asked for again; no amount booked twice
    outcome = execute(org, line(customer_linked=True), CATALOG, T0 + 13 * MIN_US, fx)
    assert outcome.changed == ["auto_recharge"]
    assert org.recharge.paused is None and [c.amount_micros for c in fx.charges] == [10 * US]
    assert fx.ledger == [] and org.balance_micros == 1 * US

    fx = Effects()  # and again: changes nothing (the charge is in flight)
    assert execute(org, line(customer_linked=True), CATALOG, T0 + 14 * MIN_US, fx).changed == []
    assert (fx.charges, fx.ledger) == ([], [])


def test_the_customer_lifts_no_other_pause_and_a_new_card_lifts_either():
    outcome, fx = imported(line())
    org = outcome.org
    (charge,) = fx.charges
    execute(org, SettleRecharge(charge.charge_id, False, charge.amount_micros, "pi_1", "card_declined"),
            CATALOG, T0 + MIN_US, Effects())
    assert org.recharge.paused == "payment_failed"
    fx = Effects()
    assert execute(org, line(customer_linked=True), CATALOG, T0 + 2 * MIN_US, fx).changed == []
    assert (org.recharge.paused, fx.charges) == ("payment_failed", [])

    org = failed_for_want_of_a_customer()
    from actors.commands import SetPaymentMethod
    fx = Effects()
    execute(org, SetPaymentMethod(True), CATALOG, T0 + 12 * MIN_US, fx)
    assert org.recharge.paused is None and len(fx.charges) == 1


class StandInShard:
    """What BatchWork reads of its shard."""

    def __init__(self, org) -> None:
        self.orgs = {"org_imp": LoadedOrg(org, 1, 0, 0)}
        self.unreadable: dict = {}
        self.catalog = CATALOG
        self.recent_keys: dict = {}
        self.settings = SimpleNamespace(snapshot_every_entries=1_000)
        self.answered_after_commit: list = []

    def owns(self, org_id: str) -> bool:
        return True

    def _unanswered(self, org_id: str, future) -> None:
        self.answered_after_commit.append(org_id)


def batch_of(shard: StandInShard, command, now: int) -> tuple[dict, object]:
    loop = asyncio.new_event_loop()
    try:
        work = BatchWork(shard, now)
        result = work.apply_command(CommandItem("org_imp", command, loop.create_future()), {})
        return result, work.finish()
    finally:
        loop.close()


def test_a_re_run_of_an_unchanged_org_writes_nothing_and_one_with_something_new_is_journaled():
    outcome, _ = imported(line())
    org = outcome.org
    execute(org, SettleRecharge("ar_1", True, 10 * US, "pi_1", None), CATALOG, T0 + MIN_US, Effects())
    shard = StandInShard(org)
    now = T0 + 2 * MIN_US
    assert org.next_due_us() > now  # nothing for time alone to do

    result, out = batch_of(shard, line(), now)
    assert (result["created"], result["changed"], result["balance_micros"]) == (False, [], 11 * US)
    assert (out.journal, out.snapshots, out.ledger, out.events, out.due) == ([], [], [], [], [])
    assert shard.answered_after_commit == []

    more = line()
    more.amounts.append(ImportAmount("promo_1", "grant", 3 * US))
    result, out = batch_of(shard, more, now)
    assert result["changed"] == ["import:promo_1"] and len(out.journal) == 1 and len(out.ledger) == 1
    assert org.balance_micros == 14 * US

    result, out = batch_of(shard, more, now + MIN_US)
    assert result["changed"] == [] and (out.journal, out.ledger) == ([], [])


def test_a_re_run_when_time_has_something_to_apply_is_journaled_as_any_command():
    outcome, _ = imported(ImportOrg("a@example.com", [ImportAmount("g", "grant", 1 * US, T0 + MIN_US),
                                                      ImportAmount("o:balance", "adjustment", 5 * US)]))
    org = outcome.org
    shard = StandInShard(org)
    command = ImportOrg("a@example.com", [ImportAmount("g", "grant", 1 * US, T0 + MIN_US),
                                          ImportAmount("o:balance", "adjustment", 5 * US)])
    result, out = batch_of(shard, command, T0 + 2 * MIN_US)  # the grant expires first
    assert result["changed"] == [] and len(out.journal) == 1
    assert [entry[2] for entry in out.ledger] == ["expiration"]
