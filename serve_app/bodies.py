"""Request bodies: msgspec for the hot path (gate, leases, usage), pydantic for admin."""

from __future__ import annotations

from typing import Annotated, Literal

import msgspec
from pydantic import BaseModel, ConfigDict, Field

from actors.org import MAX_AMOUNT_MICROS, MAX_TTL_S, Resources
from actors.runway import MAX_RUNWAY_ALERT_S
from actors.ticks import DECODE_ERRORS, ID_PATTERN, Id
from metergate_client.decision import NAME_PATTERN, ResourcesIn
from serve_app.auth import MAX_ORG_TOKEN_TTL_S, MIN_ORG_TOKEN_TTL_S
from serve_app.errors import ApiError, invalid_request

NO_RESOURCES = Resources()
Ttl = Annotated[int, msgspec.Meta(ge=1, le=MAX_TTL_S)]
MaxAgeMs = Annotated[int, msgspec.Meta(ge=0, le=3_600_000)]


class GateBody(msgspec.Struct, forbid_unknown_fields=True):
    org_id: Id
    action: Literal["create", "wake", "ingest", "purchase"]
    resources: ResourcesIn | None = None
    max_age_ms: MaxAgeMs | None = None  # the caller's staleness bound: an older view is not decided from
    token: bool = False  # an allowed answer carries a capability token (serve_app/captokens.py)


MAX_GATE_CHECKS = 1_000  # per POST /v1/gate/batch


class GateBatchBody(msgspec.Struct, forbid_unknown_fields=True):
    """POST /v1/gate/batch, each check still raw: decoded on its own, so a bad one is refused alone."""

    checks: list[msgspec.Raw]


class TypedGateBatchBody(msgspec.Struct, forbid_unknown_fields=True):
    checks: list[GateBody]


def resources_of(body: "GateBody | LeaseBody") -> Resources:
    return body.resources.to_core() if body.resources else NO_RESOURCES


NO_BOUND_S = float("inf")  # no bound of the caller's: the server's own (FRESH_S) holds


def max_age_of(body: GateBody) -> float:
    return NO_BOUND_S if body.max_age_ms is None else body.max_age_ms / 1000


def checks_max_age(checks: list) -> float:
    """A batch's bound: the tightest of its valid checks'."""
    return min((max_age_of(c) for c in checks if isinstance(c, GateBody)), default=NO_BOUND_S)


class LeaseBody(msgspec.Struct, forbid_unknown_fields=True):
    org_id: Id
    lease_id: Id
    resources: ResourcesIn | None = None
    ttl_s: Ttl = 60


def decode(decoder: msgspec.json.Decoder, body: bytes):
    """Decode a hot-path body: 400 for what is not JSON, 422 naming the field for wrong content.

    Nothing a caller sends escapes as another exception: invalid UTF-8 and nesting past what
    the decoder can follow are 400 too.
    """
    try:
        return decoder.decode(body)
    except msgspec.ValidationError as exc:
        # msgspec stops at the first problem it meets; broken JSON further on is still 400.
        if not is_json(body):
            raise not_json() from None
        raise invalid_field(str(exc)) from None
    except DECODE_ERRORS:
        raise not_json() from None


def is_json(body: bytes) -> bool:
    try:
        msgspec.json.decode(body)
    except DECODE_ERRORS:
        return False
    return True


def not_json() -> ApiError:
    return ApiError(400, "invalid_json", "request body is not valid JSON (UTF-8, nested at most "
                    f"{MAX_JSON_DEPTH} levels)")


def invalid_field(message: str) -> ApiError:
    """A msgspec validation message as the API's 422, naming the field."""
    field = message.rsplit("at `$.", 1)[-1].rstrip("`") if "at `$." in message else "body"
    return ApiError(422, "invalid_request", message, field=field)


def nests_deeper_than(value: object, limit: int) -> bool:
    """Whether a decoded JSON value has containers more than `limit` levels deep (level by
    level, no recursion: the value may be as deep as the decoder allowed)."""
    level: list = [value]
    for _ in range(limit):
        level = [child for item in level if isinstance(item, (dict, list))
                 for child in (item.values() if isinstance(item, dict) else item)]
        if not level:
            return False
    return any(isinstance(item, (dict, list)) for item in level)


# Deeper than any body of this API; webhook payloads (Stripe events) nest about eight levels.
MAX_JSON_DEPTH = 32


GATE_DECODER = msgspec.json.Decoder(GateBody)
GATE_BATCH_DECODER = msgspec.json.Decoder(GateBatchBody)
_TYPED_GATE_BATCH_DECODER = msgspec.json.Decoder(TypedGateBatchBody)


def decode_gate_checks(body: bytes) -> list[GateBody | ApiError]:
    """Every check of a batch, or the error that refuses it in its place.

    As for usage ticks, a batch of valid checks decodes in one pass; only when one is bad is
    each decoded on its own. Past MAX_GATE_CHECKS the whole request is 413.
    """
    try:
        checks: list = _TYPED_GATE_BATCH_DECODER.decode(body).checks
    except DECODE_ERRORS:
        checks = decode(GATE_BATCH_DECODER, body).checks
        _bound_checks(checks)
        return [_check_or_error(raw) for raw in checks]
    _bound_checks(checks)
    return checks


def _bound_checks(checks: list) -> None:
    if len(checks) > MAX_GATE_CHECKS:
        raise ApiError(413, "too_many_checks", f"at most {MAX_GATE_CHECKS} checks per request", limit=MAX_GATE_CHECKS)


def _check_or_error(raw: msgspec.Raw) -> GateBody | ApiError:
    try:
        return decode(GATE_DECODER, raw)
    except ApiError as exc:
        return exc
LEASE_DECODER = msgspec.json.Decoder(LeaseBody)

# ----- admin bodies (pydantic, for the OpenAPI page) ----------------------------------------

OrgId = Annotated[str, Field(min_length=1, max_length=128, pattern=ID_PATTERN)]
Text = Annotated[str, Field(min_length=1, max_length=64, pattern=NAME_PATTERN)]


class StrictModel(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)


class CreateOrgBody(StrictModel):
    org_id: OrgId
    email: Annotated[str, Field(min_length=3, max_length=254, pattern=r"^[^@\s\x00-\x1f\x7f]+@[^@\s\x00-\x1f\x7f]+$")]
    plan_id: Text | None = None
    billing_mode: Literal["prepaid", "postpaid"] = "prepaid"


class CreditBody(StrictModel):
    kind: Literal["grant", "adjustment", "refund"]
    amount_micros: Annotated[int, Field(ge=-MAX_AMOUNT_MICROS, le=MAX_AMOUNT_MICROS)]
    expires_at: str | int | None = None
    note: Annotated[str, Field(max_length=500, pattern=r"^[^\x00-\x08\x0b-\x1f\x7f]*$")] | None = None


class PlanBody(StrictModel):
    plan_id: Text


class TierBody(StrictModel):
    tier: Literal["base", "pro", "pro_plus", "pro_plus_plus", "custom"]
    max_concurrent: Annotated[int, Field(ge=0, le=1_000_000)] | None = None


class TokenBody(StrictModel):
    ttl_s: Annotated[int, Field(ge=MIN_ORG_TOKEN_TTL_S, le=MAX_ORG_TOKEN_TTL_S)] = 3600


class ClockAdvanceBody(StrictModel):
    seconds: Annotated[int, Field(ge=1, le=400 * 86_400)]


class ReconcileBody(StrictModel):
    since: Annotated[int, Field(ge=0, le=10**11)]  # Unix seconds: Stripe's events created at or after it
    starting_after: Annotated[str, Field(min_length=1, max_length=255, pattern=r"^evt_[A-Za-z0-9_]+$")] | None = None
    limit: Annotated[int, Field(ge=1, le=100)] = 100
    started_at: Annotated[float, Field(ge=0, le=10**11)] | None = None  # the first page's `started_at`


class AutoRechargeBody(StrictModel):
    enabled: bool
    # Charged when the balance goes under it: at least 1 µUSD, or an org that runs down to
    # exactly zero (and halts) would never be recharged.
    threshold_micros: Annotated[int, Field(ge=1, le=10**10)] | None = None
    amount_micros: Annotated[int, Field(ge=500_000, le=10**10)] | None = None  # Stripe's least charge is 0.50 USD
    max_per_day: Annotated[int, Field(ge=1, le=100)] = 3
    # also charged when the runway (billing-rules 2.10) falls under it; 0: by the balance alone
    threshold_runway_s: Annotated[int, Field(ge=0, le=MAX_RUNWAY_ALERT_S)] = 0


class AlertsBody(StrictModel):
    # balance.threshold_crossed once each time the balance falls under it; 0 turns it off
    low_balance_micros: Annotated[int, Field(ge=0, le=MAX_AMOUNT_MICROS)] | None = None
    # balance.runway_low once each time the runway falls under it (billing-rules 2.10); 0: off
    runway_alert_s: Annotated[int, Field(ge=0, le=MAX_RUNWAY_ALERT_S)] | None = None


class EnforcementBody(StrictModel):
    """PUT /v1/orgs/{id}/enforcement (billing-rules 2.12)."""

    mode: Literal["shadow", "enforce"]
    # enforce: the cutover, a whole UTC hour (RFC 3339); absent: the next whole hour
    at: Annotated[str, Field(min_length=1, max_length=40)] | None = None
    # shadow: back from a cutover only while nothing of it was charged or sent to Stripe
    undo: bool = False


class LimitsBody(StrictModel):
    max_disk_mb: Annotated[int, Field(ge=0, le=1 << 40)] | None = None
    machine_quotas: dict[Text, dict[Text, Annotated[int, Field(ge=0, le=1_000_000)]]] | None = None


# ----- self-serve bodies ------------------------------------------------------------------

# Where Stripe sends the customer back: an http(s) URL, no spaces or control characters.
Url = Annotated[str, Field(min_length=8, max_length=2048, pattern=r"^https?://[^\x00-\x20\x7f]+$")]
MIN_TOPUP_MICROS = 500_000  # Stripe's smallest USD charge is 0.50
MAX_TOPUP_MICROS = 10_000_000_000


class TopupBody(StrictModel):
    amount_micros: Annotated[int, Field(ge=MIN_TOPUP_MICROS, le=MAX_TOPUP_MICROS)] | None = None
    pack_id: Text | None = None
    success_url: Url | None = None
    cancel_url: Url | None = None


class SetupBody(StrictModel):
    success_url: Url | None = None
    cancel_url: Url | None = None


class TierCheckoutBody(SetupBody):
    tier: Text


class PortalBody(StrictModel):
    return_url: Url | None = None



def parse_model(model: type[BaseModel], raw: bytes):
    """Parse an admin body whatever its Content-Type; errors name the field."""
    from pydantic import ValidationError

    try:
        return model.model_validate_json(raw or b"{}")
    except ValidationError as exc:
        raise invalid_request(exc.errors()) from None


def body_schema(model: type[BaseModel]) -> dict:
    """openapi_extra documenting a body that the handler parses itself."""
    return {"requestBody": {"required": True,
                            "content": {"application/json": {"schema": inlined(model.model_json_schema())}}}}


def inlined(schema: dict) -> dict:
    """The schema with its nested models written in place: an `openapi_extra` body cannot add
    components, and a `#/$defs/...` reference left in it does not resolve in the document."""
    defs = schema.get("$defs", {})

    def walk(node, seen: tuple[str, ...]):
        if isinstance(node, dict):
            ref = node.get("$ref")
            if isinstance(ref, str) and ref.startswith("#/$defs/"):
                name = ref.rsplit("/", 1)[-1]
                if name in seen:  # a recursive model: describe the inner level as any object
                    return {"type": "object"}
                return walk({**defs[name], **{k: v for k, v in node.items() if k != "$ref"}}, (*seen, name))
            return {key: walk(value, seen) for key, value in node.items() if key != "$defs"}
        if isinstance(node, list):
            return [walk(value, seen) for value in node]
        return node

    return walk(schema, ())
