"""The API's JSON shapes of what shards answer: typed core data in, the documented views out.

The core answers facts (a decision's reason, a lease, an org's state as of an instant); how
they look in the API, times as RFC 3339 and the HTTP status a gate reason stands for, is
decided here and nowhere else.
"""

from __future__ import annotations

import math
import re

from metergate_client import decision as gate
from metergate_client.decision import Reason
from actors.leases import Lease
from actors.metering import SCALED_PER_MICRO
from actors.org import MICROS_PER_CENT, OrgState
from actors.recharge import AutoRecharge
from actors.timeutil import MAX_PLAUSIBLE_S, US_PER_S, us_to_rfc3339
from storage.ledger import Entry
from storage.orgs import OrgRow
from storage.inbound_webhooks import InboundEvent
from storage.outbox import OutboundEvent
from storage.usage import UsageGroup

STATUS_BY_REASON: dict[Reason, int] = {
    Reason.OK: 200,
    Reason.INSUFFICIENT_BALANCE: 402,
    Reason.HALTED: 402,
    Reason.SUSPENDED: 402,
    Reason.QUOTA_EXCEEDED: 402,
    Reason.NO_PAYMENT_METHOD: 402,
    Reason.DEGRADED: 402,
    Reason.CONCURRENCY_LIMIT: 429,
    Reason.RESOURCE_LIMIT: 403,
}
assert set(STATUS_BY_REASON) == set(Reason), "every gate reason has its HTTP status"


# A gate decision as the API answers it: the core's, with the status its reason stands for.
# The OpenAPI document describes the gate's answer by this type (no docstring: it would show).
class Decision(gate.Decision, kw_only=True):
    status: int
    age_ms: int = 0


MICROS_PER_USD = 1_000_000
USD_INPUT = re.compile(r" *\$? *([0-9]{1,9})(?:\.([0-9]{1,6}))? *")


def format_usd(micros: int, exact: bool = False) -> str:
    """Money for people: rounded to the cent, 4668800 → '$4.67', -1234567 → '-$1.23'.

    Half a cent rounds away from zero (4665000 → '$4.67', -4665000 → '-$4.67'), so a debit
    and a credit of the same size show the same digits; an amount that rounds to zero shows
    no sign. `exact` gives all six decimals, -1234567 → '-$1.234567', for where the exact
    amount matters (ledger detail, a tooltip). Integer arithmetic only; the JSON API never
    uses this (its money is the *_micros integers).
    """
    if exact:
        whole, fraction = divmod(abs(micros), MICROS_PER_USD)
        return f"{'-' if micros < 0 else ''}${whole:,}.{fraction:06d}"
    cents = (abs(micros) + MICROS_PER_CENT // 2) // MICROS_PER_CENT
    whole, fraction = divmod(cents, 100)
    return f"{'-' if micros < 0 and cents else ''}${whole:,}.{fraction:02d}"


def usd_input_value(micros: int) -> str:
    """An amount as a form field holds it (no sign, '$' or separators): '5.00', or all six
    decimals when it is not whole cents, so saving a form unchanged keeps the exact amount."""
    assert micros >= 0, micros
    whole, fraction = divmod(micros, MICROS_PER_USD)
    return f"{whole}.{fraction // MICROS_PER_CENT:02d}" if fraction % MICROS_PER_CENT == 0 else f"{whole}.{fraction:06d}"


def parse_usd(text: str) -> int | None:
    """What a person types for an amount ('25', '25.5', '$25.50', up to six decimals) in
    micro-USD; None if it is not a plain non-negative amount. The inverse of format_usd."""
    match = USD_INPUT.fullmatch(text)
    if match is None:
        return None
    whole, fraction = match.group(1), (match.group(2) or "").ljust(6, "0")
    return int(whole) * MICROS_PER_USD + int(fraction)


def decision_view(decision: dict, age_s: float | None = None) -> dict:
    """A gate decision as a shard sends it (msgspec.to_builtins of the core's Decision), with
    the status its reason stands for after the reason, as the `Decision` schema lists it, and
    the age of the view it was decided from (a gate answer's `age_ms`, rounded up)."""
    view = {"allowed": decision["allowed"], "reason": decision["reason"],
            "status": STATUS_BY_REASON[Reason(decision["reason"])]}
    view.update(decision)  # the keys already placed keep their place
    if age_s is not None:
        view["age_ms"] = math.ceil(age_s * 1000)
    return view


def lease_view(lease: Lease) -> dict:
    return {"lease_id": lease.lease_id, "expires_at": us_to_rfc3339(lease.expires_at_us),
            "ttl_s": lease.ttl_s, "quantity": lease.quantity}


def entry_view(entry: dict) -> dict:
    """A ledger entry a shard booked (msgspec.to_builtins of a LedgerEntry, with its entry_id)."""
    view = {"entry_id": entry.get("entry_id"), "kind": entry["kind"],
            "amount_micros": entry["amount_micros"], "created_at": us_to_rfc3339(entry["at_us"])}
    if entry.get("grant_id"):
        view["grant_id"] = entry["grant_id"]
    if entry.get("expires_at_us"):
        view["expires_at"] = us_to_rfc3339(entry["expires_at_us"])
    if entry.get("note"):
        view["note"] = entry["note"]
    return view


def org_view(state: OrgState) -> dict:
    """The org as GET /v1/orgs/{org_id} shows it (and every command that answers the state)."""
    return {
        "org_id": state.org_id,
        "email": state.email,
        "billing_mode": "prepaid" if state.prepaid else "postpaid",
        "balance_micros": state.balance_micros,
        "debt_micros": state.debt_micros,
        "grants": [
            {"grant_id": g.grant_id, "kind": g.kind, "remaining_micros": g.remaining_micros,
             "expires_at": us_to_rfc3339(g.expires_at_us) if g.expires_at_us else None}
            for g in state.grants
        ],
        "period": {
            "key": state.period_key, "usage_micros": state.period_usage_micros,
            "quota_micros": state.quota_micros, "quota_used_micros": state.quota_used_micros,
            "resets_at": us_to_rfc3339(state.period_end_us),
            # kept under the names API.md lists as well
            "usage": state.period_usage_micros, "quota": state.quota_micros,
        },
        "is_halted": state.halted is not None,
        "halt_reason": state.halted,
        "suspended": state.suspended,
        "degraded": state.degraded,
        "past_due_since": us_to_rfc3339(state.past_due_since_us) if state.past_due_since_us else None,
        "active_leases": sum(l.quantity for l in state.leases),
        "leases": [{"lease_id": l.lease_id, "expires_at": us_to_rfc3339(l.expires_at_us),
                    "quantity": l.quantity} for l in state.leases],
        "max_concurrent": state.max_concurrent,
        "tier": state.tier,
        "plan": {"id": state.plan_id, "version": state.plan_version},
        "limits": {"max_disk_mb": state.max_disk_mb, "machine_quotas": state.machine_quotas},
        "auto_recharge": recharge_view(state.recharge),
        "alerts": {"low_balance_micros": state.low_balance_micros, "runway_alert_s": state.runway_alert_s},
        "runway": {"burn_micros_per_hour": state.burn_micros_per_hour, "runway_s": state.runway_s,
                   "runs_out_at": runs_out_at(state)},
        "has_payment_method": state.has_payment_method,
        "created_at": us_to_rfc3339(state.created_us),
        # billing-rules 2.12: shadow (billed beside another biller) or enforce, and the cutover
        "enforcement": state.enforcement,
        "cutover_at": us_to_rfc3339(state.cutover_us) if state.cutover_us is not None else None,
    }


def runs_out_at(state: OrgState) -> str | None:
    """When the money runs out at the present burn; None with no runway, or past the last
    instant this service writes (a tiny burn on a large balance: centuries)."""
    if state.runway_s is None or state.as_of_us // US_PER_S + state.runway_s >= MAX_PLAUSIBLE_S:
        return None
    return us_to_rfc3339(state.as_of_us + state.runway_s * US_PER_S)


def recharge_view(r: AutoRecharge | None) -> dict:
    if r is None:
        return {"enabled": False}
    return {
        "enabled": r.enabled, "threshold_micros": r.threshold_micros, "amount_micros": r.amount_micros,
        "max_per_day": r.max_per_day, "cooldown_s": r.cooldown_s, "charges_today": r.day_count,
        "pending": {"charge_id": r.pending_id, "amount_micros": r.pending_micros,
                    "requested_at": us_to_rfc3339(r.pending_since_us)} if r.pending_id else None,
        "last_charge_at": us_to_rfc3339(r.last_us) if r.last_us else None,
        "paused": r.paused, "threshold_runway_s": r.threshold_runway_s,
    }


def stored_entry_view(entry: Entry) -> dict:
    """A ledger entry as stored (GET /v1/orgs/{id}/ledger): the same shape as a booked one."""
    view = {"entry_id": entry.entry_id, "kind": entry.kind, "amount_micros": entry.amount_micros,
            "created_at": us_to_rfc3339(entry.created_us)}
    if entry.grant_id:
        view["grant_id"] = entry.grant_id
    if entry.expires_us is not None:
        view["expires_at"] = us_to_rfc3339(entry.expires_us)
    if entry.note:
        view["note"] = entry.note
    if entry.invoiced_micros:
        view["invoiced_micros"] = entry.invoiced_micros  # a postpaid org's usage that Stripe bills
    return view


def outbound_event_view(event: OutboundEvent) -> dict:
    return {"id": event.message_id, "org_id": event.org_id, "type": event.type, "status": event.status,
            "attempts": event.attempts, "last_error": event.last_error, "created_at": us_to_rfc3339(event.created_us),
            "data": event.data,
            "delivered_at": us_to_rfc3339(event.delivered_us) if event.delivered_us is not None else None}


METER_UNITS = (("memory", "memory_mb_ms", "MB·ms"), ("cpu", "cpu_ms", "vCPU·ms"), ("disk", "disk_mb_ms", "MB·ms"))


def usage_groups_view(groups: list[UsageGroup], group_by: str) -> list[dict]:
    """Usage rollups grouped by lease or day, or per meter over the whole window."""
    views = []
    for g in groups:
        view = {"memory_mb_ms": g.memory_mb_ms, "cpu_ms": g.cpu_ms, "disk_mb_ms": g.disk_mb_ms,
                "ticks": g.ticks, "cost_micros": g.cost_scaled // SCALED_PER_MICRO}
        if group_by == "lease":
            view = {"lease_id": g.key, **view}
        elif group_by == "day":
            view = {"day": g.key.date().isoformat(), **view}
        views.append(view)
    if group_by == "meter":
        total = views[0] if views else {"memory_mb_ms": 0, "cpu_ms": 0, "disk_mb_ms": 0}
        views = [{"meter": meter, "quantity": total[column], "unit": unit} for meter, column, unit in METER_UNITS]
    return views


def org_row_view(row: OrgRow, shard: int) -> dict:
    """An org as GET /v1/orgs lists it: what Postgres keeps of it, and the shard that holds it
    (its money lives in the shard's memory and the journal; GET /v1/orgs/{id} shows that)."""
    return {"org_id": row.org_id, "email": row.email, "billing_mode": row.billing_mode, "shard": shard,
            "created_at": us_to_rfc3339(row.created_us)}


def inbound_event_view(event: InboundEvent) -> dict:
    return {"id": event.event_id, "source": event.source, "type": event.event_type, "outcome": event.outcome,
            "reason": event.reason, "status": event.status, "received_at": us_to_rfc3339(event.received_us)}
