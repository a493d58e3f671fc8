"""The OpenAPI document: request bodies the handlers decode themselves, and what every route
answers.

The gate, leases, usage and webhook routes read their body themselves (msgspec is what keeps
them fast), so FastAPI cannot see it. Their request and response schemas are generated here
from the very msgspec types the handlers decode with, so the document cannot drift from what
the code accepts, and generated clients and fuzzers know these routes too.

Every route returns a `Response` it built (serve_app/context.py `json`), so FastAPI cannot see
what any of them answers either: each route names its answers and the error statuses it can
answer here (`answers`), with the shapes below, which serve_app/views.py fills. Every error,
whatever its status, has the `Error` shape; docs/reference/errors.md lists the codes.
"""

from __future__ import annotations

import msgspec
from fastapi import FastAPI
from pydantic import BaseModel

from actors.ticks import TypedUsageBody
from metergate_client.decision import HaltCause
from metergate_client.projection import PublishedRecord, ViewPage
from serve_app.bodies import GateBody, LeaseBody, body_schema
from serve_app.views import Decision

REF = "#/components/schemas/{name}"


class ErrorDetail(msgspec.Struct):
    code: str
    message: str
    field: str | None = None


class Error(msgspec.Struct):
    """Every non-2xx answer: a code to branch on, a message for people, details beside them."""

    error: ErrorDetail


class RejectedTick(msgspec.Struct):
    index: int
    error: str
    tick_id: str | None = None
    org_id: str | None = None


class UsageResult(msgspec.Struct):
    accepted: int
    duplicates: int
    rejected: list[RejectedTick]


class LeaseResult(msgspec.Struct):
    """A lease taken or renewed; `gate_view` is the org's latest view record, when the
    ingress has one (a GateClient applies it at once)."""

    org_id: str
    lease_id: str
    expires_at: str
    ttl_s: int
    quantity: int
    capability_token: str | None = None  # docs/integrate/capability-tokens.md
    gate_view: PublishedRecord | None = None


class GateDecision(Decision, kw_only=True):
    """A gate check's decision; an allowed one whose check asked (`"token": true`) carries a
    capability token (docs/integrate/capability-tokens.md)."""

    capability_token: str | None = None


class LeaseDenied(Decision, kw_only=True):
    """POST /v1/leases refused for money (402) or at the concurrency cap (429): the error,
    the gate's decision beside it, and the org's latest view record."""

    error: ErrorDetail
    gate_view: PublishedRecord | None = None


class LeaseReleased(msgspec.Struct):
    """DELETE /v1/leases/... with `Prefer: return=representation`."""

    org_id: str
    lease_id: str
    released: bool
    gate_view: PublishedRecord | None = None


class SvixEvent(msgspec.Struct):
    """`data` is the body of POST /v1/leases (sandbox.started), {org_id, lease_id}
    (sandbox.stopped) or the body of POST /v1/usage (usage.batch)."""

    type: str
    data: dict


class SvixAnswer(msgspec.Struct):
    """`result`: the lease answer or its refusal (sandbox.started), {released, org_id,
    lease_id} (sandbox.stopped), the usage answer (usage.batch), or {ignored: true} (any other
    type). `duplicate`: true when this is the first answer to the same svix-id again."""

    type: str
    result: dict
    duplicate: bool = False


class GateBatch(msgspec.Struct):
    """Up to 1,000 POST /v1/gate bodies."""

    checks: list[GateBody]


class GateBatchResult(msgspec.Struct):
    """One entry per check, in order: its decision, or `{"error": {...}}` in its place."""

    decisions: list[dict]  # Decision or Error: msgspec cannot say so (untagged), see below


class StripeEvent(msgspec.Struct):
    id: str
    type: str
    data: dict


class AppliedCommand(msgspec.Struct):
    org_id: str
    command: str
    replayed: bool
    stale: bool


class StripeAnswer(msgspec.Struct):
    """`outcome`: applied, ignored or dead_letter, and why (`reason`) when not applied.
    `duplicate`: true when this is the first answer to the same event id again."""

    event: str
    type: str | None
    outcome: str
    reason: str | None
    applied: list[AppliedCommand]
    duplicate: bool = False


# ----- ops --------------------------------------------------------------------------------

class Health(msgspec.Struct):
    ok: bool


class ReadyChecks(msgspec.Struct):
    postgres: str  # "ok" or "error: <exception type>"
    shards: str


class Ready(msgspec.Struct):
    ready: bool
    checks: ReadyChecks


class ShardParity(msgspec.Struct):
    shard: int
    checked: int
    drift: list[str]


class Parity(msgspec.Struct):
    shard_count: int
    checked: int
    drift: list[str]
    shards: list[ShardParity]


class Replay(msgspec.Struct):
    shard: int
    org_id: str
    match: bool


# ----- the gate projection ----------------------------------------------------------------

class GateClock(msgspec.Struct):
    now_us: list[int | None]


# ----- orgs -------------------------------------------------------------------------------

class GrantView(msgspec.Struct):
    grant_id: str
    kind: str
    remaining_micros: int
    expires_at: str | None


class PeriodView(msgspec.Struct):
    key: str
    usage_micros: int
    quota_micros: int
    quota_used_micros: int
    resets_at: str
    usage: int  # the same as usage_micros (an older name)
    quota: int  # the same as quota_micros (an older name)


class OrgLease(msgspec.Struct):
    lease_id: str
    expires_at: str
    quantity: int


class PlanRef(msgspec.Struct):
    id: str
    version: int


class LimitsView(msgspec.Struct):
    max_disk_mb: int
    machine_quotas: dict[str, dict[str, int]]


class PendingCharge(msgspec.Struct):
    charge_id: str
    amount_micros: int
    requested_at: str


class AutoRechargeView(msgspec.Struct):
    """Only `enabled` (false) for an org that never set auto-recharge."""

    enabled: bool
    threshold_micros: int | None = None
    amount_micros: int | None = None
    max_per_day: int | None = None
    cooldown_s: int | None = None
    charges_today: int | None = None
    pending: PendingCharge | None = None
    last_charge_at: str | None = None
    paused: str | None = None
    threshold_runway_s: int | None = None


class AlertsView(msgspec.Struct):
    low_balance_micros: int
    runway_alert_s: int


class RunwayView(msgspec.Struct):
    """Billing-rules 2.10: the live leases' burn, and how long the money lasts at it (null:
    postpaid, or nothing running; `runs_out_at` also null past 2100)."""

    burn_micros_per_hour: int
    runway_s: int | None
    runs_out_at: str | None


class Org(msgspec.Struct):
    """An org as its shard holds it now (GET /v1/orgs/{org_id}, and every command that answers
    the org's state)."""

    org_id: str
    email: str
    billing_mode: str  # prepaid | postpaid
    balance_micros: int
    debt_micros: int
    grants: list[GrantView]
    period: PeriodView
    is_halted: bool
    halt_reason: HaltCause | None
    suspended: bool
    degraded: bool
    past_due_since: str | None
    active_leases: int
    leases: list[OrgLease]
    max_concurrent: int
    tier: str
    plan: PlanRef
    limits: LimitsView
    auto_recharge: AutoRechargeView
    alerts: AlertsView
    runway: RunwayView
    has_payment_method: bool
    created_at: str
    enforcement: str  # shadow | enforce (billing-rules 2.12)
    cutover_at: str | None  # when shadow ends (or ended); null: no cutover set


class OrgRow(msgspec.Struct):
    org_id: str
    email: str
    billing_mode: str
    shard: int
    created_at: str


class OrgPage(msgspec.Struct):
    orgs: list[OrgRow]
    next_cursor: str | None
    has_more: bool


class Credited(msgspec.Struct):
    """The ledger entry a credit booked, and the balance after it."""

    entry_id: str | None
    kind: str
    amount_micros: int
    created_at: str
    org_id: str
    balance_micros: int
    grant_id: str | None = None
    expires_at: str | None = None
    note: str | None = None


class OrgToken(msgspec.Struct):
    org_id: str
    token: str
    expires_at: str


class TokensRevoked(msgspec.Struct):
    org_id: str
    tokens_valid_after: str


# ----- reports ----------------------------------------------------------------------------

class LedgerEntryView(msgspec.Struct):
    entry_id: str
    kind: str
    amount_micros: int
    created_at: str
    grant_id: str | None = None
    expires_at: str | None = None
    note: str | None = None
    invoiced_micros: int | None = None  # a postpaid org's usage that Stripe bills


class LedgerPage(msgspec.Struct):
    entries: list[LedgerEntryView]
    next_cursor: str | None
    has_more: bool


class UsageGroup(msgspec.Struct):
    """group_by=lease or day: a lease's (`lease_id`) or a UTC day's (`day`) usage and cost;
    group_by=meter: one entry per meter (memory, cpu, disk), `{meter, quantity, unit}`."""

    lease_id: str | None = None
    day: str | None = None
    memory_mb_ms: int | None = None
    cpu_ms: int | None = None
    disk_mb_ms: int | None = None
    ticks: int | None = None
    cost_micros: int | None = None
    meter: str | None = None
    quantity: int | None = None
    unit: str | None = None


class UsageReport(msgspec.Struct):
    org_id: str
    group_by: str
    groups: list[UsageGroup]


class Month(msgspec.Struct):
    month: str  # YYYY-MM
    spend_micros: int
    credits_applied_micros: int
    imported_applied_micros: int  # the part credit brought over by an import covered (billing-rules 2.11)
    billable_micros: int
    usage_hours: float
    usage_ms: int
    status: str  # open | closed


class Months(msgspec.Struct):
    org_id: str
    months: list[Month]


# ----- webhooks ---------------------------------------------------------------------------

class InboundEvent(msgspec.Struct):
    id: str
    source: str
    type: str
    outcome: str
    reason: str | None
    status: int
    received_at: str


class InboundPage(msgspec.Struct):
    events: list[InboundEvent]
    next_cursor: str | None
    has_more: bool


class OutboundEvent(msgspec.Struct):
    """An outbound webhook event; `data` is its body (docs/reference/events.md)."""

    id: str
    org_id: str
    type: str
    status: str  # pending | delivered | dead
    attempts: int
    last_error: str | None
    created_at: str
    data: dict
    delivered_at: str | None


class OutboxList(msgspec.Struct):
    events: list[OutboundEvent]


class OutboxRetried(msgspec.Struct):
    id: str
    status: str


class ReconcileOutcomes(msgspec.Struct):
    applied: int
    ignored: int
    dead_letter: int
    seen: int


class Reconciled(msgspec.Struct):
    """One page read back from Stripe. The last page (`next` null) adds `charges_released`,
    `charges_held` and `read_back_from`."""

    events: int
    outcomes: ReconcileOutcomes
    next: str | None
    started_at: float
    charges_held: bool | None = None  # whether auto-recharge charges are still held
    charges_released: bool | None = None  # whether this read-back released the hold
    read_back_from: int | None = None  # Unix seconds the read-back must start from to release it


class MetersReconciled(msgspec.Struct):
    orgs: int
    hours: int
    recorded_micros: int
    meter: str | None
    skipped: int | None = None


# ----- usage parity (serve_app/usage_parity.py) ---------------------------------------------

class OrgHour(msgspec.Struct):
    org_id: str
    hour: str


class UsageParityStored(msgspec.Struct):
    """POST /v1/parity/usage: org-hours stored, of which `replaced` had been posted before
    (`replaced_org_hours` names them) and `created` had not."""

    stored: int
    created: int
    replaced: int
    replaced_org_hours: list[OrgHour]


class QuantityParity(msgspec.Struct):
    """One quantity of an org and hour, in metergate's units. `difference`: ours - theirs;
    `ratio`: ours / theirs to 6 decimals (null when theirs is 0 and ours is not)."""

    ours: int
    theirs: int
    difference: int
    ratio: str | None
    within_tolerance: bool


class OrgHourParity(msgspec.Struct):
    """`only`: metergate or platform when only that side has the org and hour (the other side
    counts as 0), null when both do."""

    org_id: str
    hour: str
    only: str | None
    memory_mb_ms: QuantityParity
    cpu_ms: QuantityParity
    disk_mb_ms: QuantityParity
    units: dict[str, QuantityParity]
    within_tolerance: bool


class UsageParity(msgspec.Struct):
    """GET /v1/parity/usage: every org and hour of the window either side has, by hour then org."""

    from_: str = msgspec.field(name="from")
    to: str
    tolerance_ppm: int
    org_id: str | None
    checked: int
    outside_tolerance: int
    only_metergate: int
    only_platform: int
    org_hours: list[OrgHourParity]


# ----- self-serve -------------------------------------------------------------------------

class CheckoutSession(msgspec.Struct):
    url: str
    session_id: str


class PortalSession(msgspec.Struct):
    url: str


class PublicKey(msgspec.Struct):
    """An Ed25519 public key (an OKP JWK, RFC 8037); `x` is the raw key in base64url."""

    kty: str
    crv: str
    x: str
    kid: str
    use: str
    alg: str


class KeySet(msgspec.Struct):
    """GET /.well-known/metergate-keys: the key capability tokens are signed with, and during a
    rotation the previous one."""

    keys: list[PublicKey]


# ----- the test clock ---------------------------------------------------------------------

class ClockNow(msgspec.Struct):
    now: str
    now_us: int
    offset_s: int


class ClockAdvanced(msgspec.Struct):
    """`ran`: what the due jobs did (sweep, meter, outbox), each job's own summary or null."""

    now: str
    now_us: int
    offset_s: int
    ran: dict


# ----- import (serve_app/routes/imports.py) ---------------------------------------------------

class ImportedOrg(msgspec.Struct):
    """One org of POST /v1/import, by its place in `orgs`. `status`: created, updated, unchanged
    (a re-run), refused (by its shard: `why`; nothing of it applied), invalid (the line: `why`;
    no shard saw it) or failed (its shard busy, away or in error: `why`; send it again).
    `changed`: what the import changed (or, on a dry run, would): plan, tier,
    `import:<source id>` per amount booked, card, past_due, auto_recharge, stripe_customer."""

    index: int
    status: str
    org_id: str | None = None
    changed: list[str] | None = None
    balance_micros: int | None = None
    why: str | None = None


class ImportResult(msgspec.Struct):
    dry_run: bool
    orgs: list[ImportedOrg]


_DOCUMENTED = (GateBody, GateBatch, GateBatchResult, LeaseBody, TypedUsageBody, GateDecision, Error, UsageResult, LeaseResult,
               LeaseDenied, LeaseReleased, SvixEvent, SvixAnswer, StripeEvent, StripeAnswer, Health, Ready, Parity,
               Replay, ViewPage, GateClock, Org, OrgPage, Credited, OrgToken, TokensRevoked, LedgerPage, UsageReport,
               Months, InboundPage, OutboxList, OutboxRetried, Reconciled, MetersReconciled, CheckoutSession,
               PortalSession, ClockNow, ClockAdvanced, KeySet, UsageParityStored, UsageParity,
               ImportResult)
_, COMPONENTS = msgspec.json.schema_components(_DOCUMENTED, ref_template=REF)
COMPONENTS["GateBatchResult"]["properties"]["decisions"]["items"] = {
    "anyOf": [{"$ref": REF.format(name="GateDecision")}, {"$ref": REF.format(name="Error")}]}
COMPONENTS["ViewPage"]["properties"]["views"]["items"] = {"$ref": REF.format(name="PublishedRecord")}  # as written

# What each error status means on any route; docs/reference/errors.md has every code.
ERRORS = {
    "400": "Not JSON (broken, not UTF-8, nested too deep), a bad cursor, page token or Idempotency-Key, "
           "or a webhook's signature refused",
    "401": "Missing, bad, expired or revoked token",
    "402": "Denied for money: the gate's answer",
    "403": "A token without access to this",
    "404": "Unknown org, lease or event",
    "409": "A conflict: the Idempotency-Key's first request differs or still runs, or the state forbids it",
    "413": "Body (or batch) over its size limit",
    "422": "A field out of its bounds; `error.field` names it",
    "429": "Too many requests (an org token's rate, large bodies at once, feed streams)",
    "500": "The org's stored data cannot be read, or a bug; it has been logged",
    "502": "Stripe refused the request",
    "503": "A shard, the database or Stripe is unavailable; retry after `Retry-After` seconds",
}
# What any route can answer before its handler runs (serve_app/limits.py): a token that is not
# valid, when the request has a body or the token is an org token (401), and an org token past
# its rate (429). Every route's answers include these.
EDGE = ("401", "429")
# The errors of a route with a body of its own: not JSON, too large, a field refused.
BODY = ("400", "413", "422")
ANY_BODY = ("413",)  # a route that reads no body still refuses one over the limit
SERVICE = ("401", "403")  # service or admin token; an org token is 403
ADMIN = ("401", "403")
ORG_OR_ADMIN = ("401", "403", "429")  # an org token is rate-limited
SHARD = ("503",)
ORG = ("404", "422", "500", "503")  # an org's path, read or changed on its shard
IDEMPOTENT = ("400", "409")  # Idempotency-Key: not printable ASCII, or its first request differs or runs


def _ref(kind: type) -> dict:
    return {"$ref": REF.format(name=kind.__name__)}


def _json(schema: dict) -> dict:
    return {"content": {"application/json": {"schema": schema}}}


def answers(ok: dict[str, tuple[str, type | dict | None]], *errors: tuple[str, ...]) -> dict:
    """openapi_extra naming what a route answers: `ok` by status (a description and a shape: a
    documented type, a schema, or None for no body), and its error statuses, each an `Error`."""
    responses: dict = {}
    for status, (text, kind) in ok.items():
        content = {} if kind is None else _json(kind if isinstance(kind, dict) else _ref(kind))
        responses[status] = {"description": text, **content}
    for status in sorted({*EDGE, *(s for group in errors for s in group)}):
        responses.setdefault(status, {"description": ERRORS[status], **_json(_ref(Error))})
    return {"responses": responses}


def with_body(model: type[BaseModel], ok: dict[str, tuple[str, type | dict | None]], *errors: tuple[str, ...]) -> dict:
    """answers() for a route whose pydantic body the handler parses itself."""
    return {**body_schema(model), **answers(ok, BODY, *errors)}


def operation(body: type, ok: dict[str, tuple[str, type | None]], *errors: tuple[str, ...],
              headers: tuple[str, ...] = ()) -> dict:
    """openapi_extra for a route that decodes the msgspec `body` itself."""
    extra = {"requestBody": {"required": True, "content": {"application/json": {"schema": _ref(body)}}},
             **answers(ok, BODY, *errors)}
    if headers:
        extra["parameters"] = [{"name": name, "in": "header", "required": True, "schema": {"type": "string"}}
                               for name in headers]
    return extra


GATE = operation(GateBody, {"200": ("The decision (always 200 when the check ran)", GateDecision)}, SERVICE, ORG)
GATE_BATCH = operation(GateBatch, {"200": ("A decision or an error per check, in order", GateBatchResult)},
                       SERVICE, ("429", "503"))
LEASE = operation(LeaseBody, {"201": ("A new lease", LeaseResult), "200": ("The same lease again", LeaseResult),
                              "402": ("Denied for money: the gate's answer", LeaseDenied),
                              "429": ("Denied at the concurrency cap: the gate's answer", LeaseDenied)},
                  SERVICE, ORG, ("409",))
USAGE = operation(TypedUsageBody, {"200": ("Durable: accepted, duplicates and each rejected tick", UsageResult)},
                  SERVICE, ("429", "503"))
SVIX = operation(SvixEvent, {"200": ("Applied, ignored, or the first answer again", SvixAnswer)}, ORG,
                 headers=("svix-id", "svix-timestamp", "svix-signature"))
STRIPE = operation(StripeEvent, {"200": ("Applied, ignored or a dead letter, or the first answer again", StripeAnswer)},
                   ("503",), headers=("stripe-signature",))


def install(app: FastAPI) -> None:
    """Add the msgspec components to the document FastAPI generates."""
    generate = app.openapi

    def openapi() -> dict:
        if app.openapi_schema is None:
            document = generate()
            schemas = document.setdefault("components", {}).setdefault("schemas", {})
            schemas.update(COMPONENTS)
            _drop_unused(document, schemas, ("HTTPValidationError", "ValidationError"))
        return app.openapi_schema

    app.openapi = openapi


def _drop_unused(document: dict, schemas: dict, names: tuple[str, ...]) -> None:
    """FastAPI's own 422 shape, which every route's `answers` replaces by `Error`: gone, unless
    something still names it."""
    text = msgspec.json.encode(document["paths"]).decode()
    for name in names:
        if REF.format(name=name) not in text:
            schemas.pop(name, None)
