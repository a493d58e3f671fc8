"""One line of an import (`metergate import`, POST /v1/import) read into the core's ImportOrg
(billing-rules 2.11): the edge checks every field, resolves what replay must not look up (the
plan's version, the tier's cap, the dunning policy, the auto-recharge cooldown), and turns the
org's balance into amounts keyed by the source's ids. A line that is wrong in any part is
refused whole, with why; nothing of it reaches a shard.

The balance and the grants: each grant is an amount of its kind keyed by its id; what the
balance holds beyond them (`balance_micros − Σ grants`) is one more amount, `<org_id>:balance`,
an `adjustment` without expiry; a negative balance without grants is a debt under that id.
"""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import Field, ValidationError

from actors import commands as cmd
from actors.money import MAX_AMOUNT_MICROS
from actors.timeutil import BadTime, parse_time_us
from config.catalog import Catalog
from config.settings import Settings
from serve_app.bodies import AutoRechargeBody, OrgId, StrictModel, Text
from serve_app.calls import auto_recharge_command
from serve_app.errors import ApiError

MAX_IMPORT_ORGS = 100  # per request; the CLI sends a file in chunks of at most this many
MAX_IMPORT_GRANTS = 100  # per org
SourceId = Annotated[str, Field(min_length=1, max_length=200, pattern=r"^[A-Za-z0-9_.:@/+-]+$")]
Amount = Annotated[int, Field(ge=-MAX_AMOUNT_MICROS, le=MAX_AMOUNT_MICROS)]
Time = Annotated[str, Field(min_length=1, max_length=40)] | Annotated[int, Field(ge=0, le=10**11)]  # RFC 3339 or Unix s


class ImportGrant(StrictModel):
    id: SourceId
    kind: Literal["grant", "topup", "adjustment", "auto_recharge"]
    amount_micros: Annotated[int, Field(ge=1, le=MAX_AMOUNT_MICROS)]
    expires_at: Time | None = None


class ImportLine(StrictModel):
    org_id: OrgId
    email: Annotated[str, Field(min_length=3, max_length=254, pattern=r"^[^@\s\x00-\x1f\x7f]+@[^@\s\x00-\x1f\x7f]+$")]
    balance_micros: Amount
    source_id: SourceId | None = None  # the org's id in the source: the operator's reference only
    billing_mode: Literal["prepaid", "postpaid"] | None = None
    plan_id: Text | None = None
    tier: Literal["base", "pro", "pro_plus", "pro_plus_plus", "custom"] | None = None
    max_concurrent: Annotated[int, Field(ge=0, le=1_000_000)] | None = None
    grants: Annotated[list[ImportGrant], Field(max_length=MAX_IMPORT_GRANTS)] = []
    card_on_file: bool | None = None
    stripe_customer_id: Annotated[str, Field(min_length=4, max_length=255, pattern=r"^cus_[A-Za-z0-9]+$")] | None = None
    auto_recharge: AutoRechargeBody | None = None
    past_due_since: Time | None = None


class ImportBody(StrictModel):
    """POST /v1/import: each org checked on its own, so a bad one is refused alone."""

    orgs: Annotated[list[dict], Field(min_length=1, max_length=MAX_IMPORT_ORGS)]
    dry_run: bool = False


class BadLine(Exception):
    """A line refused before any shard saw it: `why` names the field and the problem."""

    def __init__(self, why: str, org_id: str | None = None) -> None:
        super().__init__(why)
        self.why, self.org_id = why, org_id


def import_of(raw: dict, catalog: Catalog, settings: Settings, now_us: int) -> tuple[str, cmd.ImportOrg, str | None]:
    """(org_id, the command, the Stripe customer id or None) of one line; BadLine if any part is wrong."""
    org_id = raw.get("org_id") if isinstance(raw.get("org_id"), str) else None
    try:
        line = ImportLine.model_validate(raw)
    except ValidationError as exc:
        first = exc.errors()[0]
        raise BadLine(f"{'.'.join(str(p) for p in first['loc']) or 'line'}: {first['msg']}", org_id) from None
    amounts = [cmd.ImportAmount(g.id, g.kind, g.amount_micros, _time(g.expires_at, f"grants.{g.id}.expires_at"))
               for g in line.grants]
    # The rest of the balance is keyed by the org, never by its source id: a re-run that adds or
    # changes source_id (or comes from Stripe after a file) must find the balance booked.
    balance_id = f"{line.org_id}:balance"
    ids = [a.source_id for a in amounts] + [balance_id]
    if len(set(ids)) != len(ids):
        raise BadLine("grants: two amounts of the org have the same id", org_id)
    rest = line.balance_micros - sum(a.amount_micros for a in amounts)
    if rest < 0 and amounts:
        raise BadLine(f"balance_micros {line.balance_micros} is less than its grants ({-rest} µUSD short): an org "
                      "never holds debt and a grant at once", org_id)
    if rest:
        amounts.append(cmd.ImportAmount(balance_id, "adjustment", rest))
    # The core applies the amounts in the import's order (billing-rules 2.11 step 3): money that
    # can be spent first, then grants already expired (credited and lapsed at once), then debts,
    # so an org never halts and resumes within its own import.
    amounts.sort(key=lambda a: 0 if a.amount_micros > 0 and (a.expires_at_us is None or a.expires_at_us > now_us)
                 else 1 if a.amount_micros > 0 else 2)
    plan_id = plan_version = None
    if line.plan_id is not None:
        plan = catalog.current_plan(line.plan_id, now_us)
        if plan is None:
            raise BadLine(f"plan_id: plan {line.plan_id} is not in the catalog", org_id)
        plan_id, plan_version = plan.id, plan.version
    cap = 0
    if line.tier == "custom":
        if line.max_concurrent is None:
            raise BadLine("max_concurrent: a custom tier needs max_concurrent", org_id)
        cap = line.max_concurrent
    elif line.tier is not None:
        if line.max_concurrent is not None:
            raise BadLine("max_concurrent: set by the tier; use tier custom", org_id)
        cap = catalog.tiers[line.tier]
    recharge = None
    if line.auto_recharge is not None:
        try:
            recharge = auto_recharge_command(_Settings(settings), line.auto_recharge)
        except ApiError as exc:
            raise BadLine(f"auto_recharge.{exc.details.get('field', '')}: {exc.message}", org_id) from None
    past_due = None
    if line.past_due_since is not None:
        since = _time(line.past_due_since, "past_due_since")
        if since > now_us:
            raise BadLine("past_due_since: in the future", org_id)
        free = catalog.current_plan(settings.dunning_free_plan, now_us)
        if free is None:
            raise BadLine(f"past_due_since: the dunning free plan {settings.dunning_free_plan} is not in the catalog",
                          org_id)
        past_due = cmd.InvoiceFailed(since, settings.dunning_suspend_after_s, settings.dunning_degrade_after_s,
                                     settings.dunning_downgrade_after_s, free.id, free.version)
    prepaid = None if line.billing_mode is None else line.billing_mode == "prepaid"
    command = cmd.ImportOrg(line.email, amounts, plan_id, plan_version or 0, prepaid, line.tier, cap,
                            line.card_on_file, past_due, recharge)
    return line.org_id, command, line.stripe_customer_id


def _time(value: str | int | None, field: str) -> int | None:
    if value is None:
        return None
    try:
        return parse_time_us(value)
    except BadTime as exc:
        raise BadLine(f"{field}: {exc}") from None


class _Settings:
    """What auto_recharge_command reads of the context: the service's settings."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
