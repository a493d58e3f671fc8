"""The OpenAPI document for the routes whose bodies are decoded by msgspec, not FastAPI.

The gate, leases, usage and webhook routes read their body themselves (msgspec is what keeps
them fast), so FastAPI cannot see it. Their request and response schemas are generated here
from the very msgspec types the handlers decode with, so the document cannot drift from what
the code accepts, and generated clients and fuzzers know these routes too.
"""

from __future__ import annotations

import msgspec
from fastapi import FastAPI

from actors.ticks import TypedUsageBody
from serve_app.bodies import GateBody, LeaseBody
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
    org_id: str
    lease_id: str
    expires_at: str
    ttl_s: int
    quantity: int


class SvixEvent(msgspec.Struct):
    """`data` is the body of POST /v1/leases (sandbox.started), {org_id, lease_id}
    (sandbox.stopped) or the body of POST /v1/usage (usage.batch)."""

    type: str
    data: dict


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


_DOCUMENTED = (GateBody, GateBatch, GateBatchResult, LeaseBody, TypedUsageBody, Decision, Error, UsageResult, LeaseResult, SvixEvent,
               StripeEvent)
_, COMPONENTS = msgspec.json.schema_components(_DOCUMENTED, ref_template=REF)
COMPONENTS["GateBatchResult"]["properties"]["decisions"]["items"] = {
    "anyOf": [{"$ref": REF.format(name="Decision")}, {"$ref": REF.format(name="Error")}]}

_ERRORS = {
    "400": "Not JSON (broken, not UTF-8, nested too deep)",
    "401": "Missing or bad token",
    "403": "A token without access to this",
    "404": "Unknown org",
    "413": "Body over the size limit",
    "422": "A field out of its bounds; `error.field` names it",
    "503": "A shard or the database is unavailable; retry after `Retry-After` seconds",
}


def _ref(kind: type) -> dict:
    return {"$ref": REF.format(name=kind.__name__)}


def operation(body: type, answers: dict[str, tuple[str, type | None]], headers: tuple[str, ...] = ()) -> dict:
    """openapi_extra for a route that decodes `body` itself and answers `answers` besides errors."""
    responses = {status: {"description": text, **({"content": {"application/json": {"schema": _ref(kind)}}}
                                                   if kind else {})}
                 for status, (text, kind) in answers.items()}
    for status, text in _ERRORS.items():
        responses.setdefault(status, {"description": text, "content": {"application/json": {"schema": _ref(Error)}}})
    extra = {"requestBody": {"required": True, "content": {"application/json": {"schema": _ref(body)}}},
             "responses": responses}
    if headers:
        extra["parameters"] = [{"name": name, "in": "header", "required": True, "schema": {"type": "string"}}
                               for name in headers]
    return extra


GATE = operation(GateBody, {"200": ("The decision (always 200 when the check ran)", Decision)})
GATE_BATCH = operation(GateBatch, {"200": ("A decision or an error per check, in order", GateBatchResult)})
LEASE = operation(LeaseBody, {"201": ("A new lease", LeaseResult), "200": ("The same lease again", LeaseResult),
                              "402": ("Denied for money: the gate's answer", Decision),
                              "429": ("Denied at the concurrency cap: the gate's answer", Decision)})
USAGE = operation(TypedUsageBody, {"200": ("Durable: accepted, duplicates and each rejected tick", UsageResult)})
SVIX = operation(SvixEvent, {"200": ("Applied, ignored, or the first answer again", None)},
                 headers=("svix-id", "svix-timestamp", "svix-signature"))
STRIPE = operation(StripeEvent, {"200": ("Applied or ignored", None)}, headers=("stripe-signature",))


def install(app: FastAPI) -> None:
    """Add the msgspec components to the document FastAPI generates."""
    generate = app.openapi

    def openapi() -> dict:
        if app.openapi_schema is None:
            document = generate()
            document.setdefault("components", {}).setdefault("schemas", {}).update(COMPONENTS)
        return app.openapi_schema

    app.openapi = openapi
