"""What the relay reads and writes on POST /v1/gate and /v1/gate/batch: the server's request
types, refusals and answer fields, restated here because the relay runs beside a gateway and
imports nothing of the server (tests/test_relay.py holds the two to each other, body by body).
"""

from __future__ import annotations

import math
from typing import Annotated, Literal

import msgspec

from metergate_client.decision import Decision, Reason, Resources, ResourcesIn

# The server's field rules (serve_app/bodies.py, actors/ticks.py): the same types give the same
# msgspec messages, so a refusal names the same field in the same words.
ID_PATTERN = r"^[A-Za-z0-9_.:\-]+$(?!\n)"
Id = Annotated[str, msgspec.Meta(min_length=1, max_length=128, pattern=ID_PATTERN)]
MaxAgeMs = Annotated[int, msgspec.Meta(ge=0, le=3_600_000)]
MAX_GATE_CHECKS = 1_000  # per POST /v1/gate/batch
MAX_JSON_DEPTH = 32
# The server's default body limits (METERGATE_MAX_BODY_BYTES, METERGATE_MAX_USAGE_BODY_BYTES).
GATE_BODY_LIMIT_BYTES = 64 * 1024
BATCH_BODY_LIMIT_BYTES = 8 * 1024 * 1024
DECODE_ERRORS = (msgspec.DecodeError, UnicodeDecodeError, RecursionError)

STATUS_BY_REASON: dict[str, int] = {
    Reason.OK: 200, Reason.INSUFFICIENT_BALANCE: 402, Reason.HALTED: 402, Reason.SUSPENDED: 402,
    Reason.QUOTA_EXCEEDED: 402, Reason.NO_PAYMENT_METHOD: 402, Reason.DEGRADED: 402,
    Reason.CONCURRENCY_LIMIT: 429, Reason.RESOURCE_LIMIT: 403,
}
assert set(STATUS_BY_REASON) == set(Reason), "every gate reason has its HTTP status"
UNAVAILABLE = "unavailable"  # the reason of an answer the action's policy gave


class GateBody(msgspec.Struct, forbid_unknown_fields=True):
    org_id: Id
    action: Literal["create", "wake", "ingest", "purchase"]
    resources: ResourcesIn | None = None
    max_age_ms: MaxAgeMs | None = None
    token: bool = False  # a capability token: only the server signs one, so such a check is asked of it


class _RawBatch(msgspec.Struct, forbid_unknown_fields=True):
    checks: list[msgspec.Raw]


class _TypedBatch(msgspec.Struct, forbid_unknown_fields=True):
    checks: list[GateBody]


GATE_DECODER = msgspec.json.Decoder(GateBody)
_RAW_BATCH_DECODER = msgspec.json.Decoder(_RawBatch)
_TYPED_BATCH_DECODER = msgspec.json.Decoder(_TypedBatch)
NO_RESOURCES = Resources()


class Refused(Exception):
    """A request the relay refuses as the server would: its status, code and message."""

    def __init__(self, status: int, code: str, message: str, **details: object) -> None:
        super().__init__(message)
        self.status, self.code, self.message, self.details = status, code, message, details

    def body(self) -> dict:
        return {"error": {"code": self.code, "message": self.message, **self.details}}

    def item(self) -> dict:
        """In the place of one check of a batch: the error and the status it would have."""
        return {"error": {"code": self.code, "message": self.message, "status": self.status, **self.details}}


def too_large(limit: int) -> Refused:
    return Refused(413, "payload_too_large", f"request body is over {limit} bytes", limit_bytes=limit)


def decode(decoder: msgspec.json.Decoder, body: bytes):
    """400 for what is not JSON, 422 naming the field for wrong content (serve_app/bodies.py)."""
    try:
        return decoder.decode(body)
    except msgspec.ValidationError as exc:
        if not _is_json(body):  # msgspec stops at the first problem; broken JSON further on is 400
            raise _not_json() from None
        message = str(exc)
        field = message.rsplit("at `$.", 1)[-1].rstrip("`") if "at `$." in message else "body"
        raise Refused(422, "invalid_request", message, field=field) from None
    except DECODE_ERRORS:
        raise _not_json() from None


def decode_checks(body: bytes) -> list[GateBody | Refused]:
    """Every check of a batch, or the refusal in its place; past MAX_GATE_CHECKS the whole is 413."""
    try:
        checks: list = _TYPED_BATCH_DECODER.decode(body).checks
    except DECODE_ERRORS:  # (a ValidationError is a DecodeError)
        checks = decode(_RAW_BATCH_DECODER, body).checks
        _bound(checks)
        return [_check_or_refusal(raw) for raw in checks]
    _bound(checks)
    return checks


def resources_of(body: GateBody) -> Resources:
    r = body.resources
    if r is None:
        return NO_RESOURCES
    return Resources(r.memory_mb, r.cpu_count, r.disk_mb, r.machine_type, r.region, r.quantity)


def decision_fields(decision: Decision, age_s: float) -> dict:
    """A decision as POST /v1/gate answers it (serve_app/views.py decision_view): allowed,
    reason, status, the decision's other fields, age_ms rounded up."""
    fields = {"allowed": decision.allowed, "reason": decision.reason.value,
              "status": STATUS_BY_REASON[decision.reason]}
    fields.update(msgspec.to_builtins(decision))  # the keys already placed keep their place
    fields["age_ms"] = math.ceil(age_s * 1000)
    return fields


def _bound(checks: list) -> None:
    if len(checks) > MAX_GATE_CHECKS:
        raise Refused(413, "too_many_checks", f"at most {MAX_GATE_CHECKS} checks per request", limit=MAX_GATE_CHECKS)


def _check_or_refusal(raw: msgspec.Raw) -> GateBody | Refused:
    try:
        return decode(GATE_DECODER, raw)
    except Refused as exc:
        return exc


def _is_json(body: bytes) -> bool:
    try:
        msgspec.json.decode(body)
    except DECODE_ERRORS:
        return False
    return True


def _not_json() -> Refused:
    return Refused(400, "invalid_json", f"request body is not valid JSON (UTF-8, nested at most {MAX_JSON_DEPTH} levels)")
