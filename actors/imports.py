"""An org brought over from another biller (billing-rules 2.11): the import of one org as one
command, applied whole or refused whole, keyed per amount by the source's id.

Pure like the rest of the core: the edge parses and resolves (plan version, tier cap, the
dunning policy), the shard applies `apply_import` to its org, or `create_imported` when the org
does not exist yet, in one commit. Re-running the same import changes nothing: every amount is
remembered by its source id (`OrgBillingActor.imported_ids`) and the settings are applied only
where they differ.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from actors.enforcement import SHADOW_FOREVER_US
from actors.effects import Effects
from actors.money import IMPORT_KIND, MAX_GRANTS_PER_ORG
from actors.org import OrgBillingActor
from actors.recharge import NO_STRIPE_CUSTOMER
from actors.refusals import BillingError, UnknownPlan
from config.catalog import Catalog

if TYPE_CHECKING:
    from actors.commands import ImportOrg, SetAutoRecharge

MAX_IMPORTED_IDS_PER_ORG = 1_000  # source ids an org remembers (never forgotten: a re-run would book twice)
IMPORT_KEY_PREFIX = "import:"  # the ledger key of an imported amount: import:<source id>

# What `Imported.changed` names, besides `import:<source id>` per amount booked.
PLAN, TIER, CARD, PAST_DUE, AUTO_RECHARGE = "plan", "tier", "card", "past_due", "auto_recharge"


class ImportRefused(BillingError):
    """The import would pass a cap (2.11 step 1) or names another billing mode: nothing of it applies."""


def create_imported(org_id: str, command: ImportOrg, catalog: Catalog, now_us: int,
                    fx: Effects) -> tuple[OrgBillingActor, list[str]]:
    """A new org made by its import (2.11): no signup grant, and rule 4.5's halt check after
    the import instead of before it. Raises before anything is made if the import is refused."""
    plan = catalog.current_plan(command.plan_id or catalog.default_plan, now_us)
    if plan is None:
        raise UnknownPlan(f"plan {command.plan_id} is not in the catalog")
    prepaid = True if command.prepaid is None else command.prepaid
    org = OrgBillingActor(org_id, command.email, prepaid, plan, catalog.default_tier,
                          catalog.tiers[catalog.default_tier], catalog.default_max_disk_mb, now_us)
    org.low_balance_micros, org.runway_alert_s = catalog.low_balance_micros, catalog.runway_alert_s
    org.shadow_until_us = SHADOW_FOREVER_US if command.shadow else None  # (billing-rules 2.12)
    changed = apply_import(org, command, catalog, now_us, fx)
    org._halt_if_out_of_money(now_us, fx)
    org.check_alerts(now_us, fx)
    return org, changed


def apply_import(org: OrgBillingActor, command: ImportOrg, catalog: Catalog, now_us: int,
                 fx: Effects) -> list[str]:
    """Billing-rules 2.11 steps 1-6 on an org (after advance); returns what changed, in
    order: empty when the import changed nothing."""
    org.advance(now_us, fx)
    _refuse_past_caps(org, command)
    changed: list[str] = []
    if command.plan_id is not None and command.plan_id != org.plan.id:
        org.set_plan(catalog.plan_version(command.plan_id, command.plan_version), now_us, fx)
        changed.append(PLAN)
    if command.tier is not None and (command.tier, command.max_concurrent) != (org.tier, org.max_concurrent):
        org.set_tier(command.tier, command.max_concurrent, now_us, fx)
        changed.append(TIER)
    for amount in command.amounts:
        if amount.source_id in (org.imported_ids or ()):
            continue
        org.imported_ids = (org.imported_ids or []) + [amount.source_id]
        key = IMPORT_KEY_PREFIX + amount.source_id
        if amount.amount_micros > 0:
            org._add_credit(amount.kind, amount.amount_micros, amount.expires_at_us, amount.source_id, now_us, fx,
                            entry_kind=IMPORT_KIND, idempotency_key=key)
        else:
            org.debit(amount.kind, -amount.amount_micros, amount.source_id, now_us, fx,
                      entry_kind=IMPORT_KIND, idempotency_key=key)
        changed.append(key)
    if command.card is not None and command.card != org.has_payment_method:
        org.set_payment_method(command.card, now_us, fx)
        changed.append(CARD)
    failed = command.past_due
    if failed is not None and org.dunning is None:
        org.invoice_failed(failed.since_us, failed.suspend_after_s, failed.degrade_after_s, failed.downgrade_after_s,
                           catalog.plan_version(failed.free_plan_id, failed.free_plan_version), now_us, fx)
        if org.dunning is not None:
            changed.append(PAST_DUE)
    settings = command.recharge
    if settings is not None and _recharge_differs(org, settings):
        org.configure_recharge(settings.enabled, settings.threshold_micros, settings.amount_micros,
                               settings.max_per_day, settings.cooldown_s, now_us, fx, False,
                               settings.threshold_runway_s)
        changed.append(AUTO_RECHARGE)
    recharge = org.recharge
    if command.customer_linked and recharge is not None and recharge.paused == NO_STRIPE_CUSTOMER:
        recharge.paused = None  # step 7: the customer the failed charge lacked is there now
        if recharge.enabled:
            org._maybe_recharge(now_us, fx)
        changed.append(AUTO_RECHARGE)
    return changed


def waits_for_customer(org: OrgBillingActor) -> bool:
    """Whether auto-recharge is paused for want of a Stripe customer (rule 9.4): what an import
    that links the org's customer lifts (2.11 step 7)."""
    return org.recharge is not None and org.recharge.paused == NO_STRIPE_CUSTOMER


def changes_nothing(org: OrgBillingActor, command: ImportOrg, catalog: Catalog, now_us: int) -> bool:
    """Whether importing `command` into `org` now would change nothing at all: nothing is due by
    time (advance would apply nothing) and the import is unchanged (2.11). The shard then
    writes nothing for it (no journal row), as for a usage request of duplicate ticks. Decided
    on a copy; the org itself is left as it is."""
    if org.next_due_us() <= now_us:
        return False
    try:
        return not apply_import(org._advanced_copy(now_us), command, catalog, now_us, Effects())
    except BillingError:
        return False


def _refuse_past_caps(org: OrgBillingActor, command: ImportOrg) -> None:
    """2.11 step 1, before anything changes: an import is applied whole or not at all."""
    if command.prepaid is not None and command.prepaid != org.prepaid:
        mode = "prepaid" if org.prepaid else "postpaid"
        raise ImportRefused(f"org {org.org_id} is {mode}: an import cannot change its billing mode")
    known = set(org.imported_ids or ())
    new_ids = new_grants = 0
    for amount in command.amounts:
        if amount.source_id in known:
            continue
        known.add(amount.source_id)
        new_ids += 1
        new_grants += amount.amount_micros > 0
    if len(org.grants or ()) + new_grants > MAX_GRANTS_PER_ORG:
        raise ImportRefused(f"an org holds at most {MAX_GRANTS_PER_ORG} live grants: it holds "
                            f"{len(org.grants or ())} and the import adds up to {new_grants}")
    if len(org.imported_ids or ()) + new_ids > MAX_IMPORTED_IDS_PER_ORG:
        raise ImportRefused(f"an org remembers at most {MAX_IMPORTED_IDS_PER_ORG} imported ids: it remembers "
                            f"{len(org.imported_ids or ())} and the import adds {new_ids}")


def _recharge_differs(org: OrgBillingActor, settings: SetAutoRecharge) -> bool:
    current = org.recharge
    if not settings.enabled:
        return current is not None and current.enabled
    if current is None or not current.enabled:
        return True
    return ((current.threshold_micros, current.amount_micros, current.max_per_day, current.cooldown_s,
             current.threshold_runway_s)
            != (settings.threshold_micros, settings.amount_micros, settings.max_per_day, settings.cooldown_s,
                settings.threshold_runway_s))

