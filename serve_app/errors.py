"""API errors: one exception type, one body shape, mapped once at the edge."""

from __future__ import annotations

import logging

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from actors.routing import ShardUnavailable
from actors.refusals import Refusal
from serve_app.outage import RETRY_AFTER_S
from storage.db import is_outage

log = logging.getLogger("metergate.http")


class ApiError(Exception):
    def __init__(self, status: int, code: str, message: str, **details: object) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message
        self.details = details


def error_body(code: str, message: str, **details: object) -> dict:
    return {"error": {"code": code, "message": message, **details}}


def error_response(status: int, code: str, message: str, **details: object) -> JSONResponse:
    # A 503 is an outage the caller should wait out and retry; every other error is final.
    headers = {"Retry-After": str(RETRY_AFTER_S)} if status == 503 else None
    return JSONResponse(error_body(code, message, **details), status_code=status, headers=headers)


# What each refusal of a shard means in HTTP: the one place a shard's code becomes a status.
STATUS_BY_REFUSAL: dict[Refusal, int] = {
    Refusal.INVALID_COMMAND: 400,
    Refusal.UNKNOWN_LEASE: 404,
    Refusal.LEASE_ENDED: 409,
    Refusal.IDEMPOTENCY_CONFLICT: 409,
    Refusal.UNKNOWN_ORG: 404,
    Refusal.UNKNOWN_PLAN: 422,
    Refusal.UNKNOWN_UNIT: 422,
    Refusal.WRONG_SHARD: 503,
    Refusal.SHARD_BUSY: 503,
    Refusal.SHARD_UNAVAILABLE: 503,
    Refusal.SHARD_VERSION_MISMATCH: 503,
    Refusal.OUTCOME_UNKNOWN: 503,
    Refusal.UNSTORABLE_INPUT: 422,
    Refusal.INTERNAL_ERROR: 500,
    Refusal.CUTOVER_CHARGED: 409,
    Refusal.ORG_UNREADABLE: 500,  # a fault of the stored data, not of the request: retrying does not help
}
assert set(STATUS_BY_REFUSAL) == set(Refusal), "every refusal has its HTTP status"


def unknown_org(org_id: str) -> ApiError:
    return ApiError(404, Refusal.UNKNOWN_ORG, f"org {org_id} does not exist")


def api_error_of(refusal: dict) -> ApiError:
    """A shard's refusal ({"code", "message"}) as the API error it stands for."""
    code = Refusal(refusal["code"])
    return ApiError(STATUS_BY_REFUSAL[code], code.value, refusal["message"])


def raise_for_shard_error(result: dict) -> dict:
    """A shard answers refusals as values; turn one into the API error it stands for."""
    err = result.get("error")
    if err is not None:
        raise api_error_of(err)
    return result


def item_error(exc: ApiError) -> dict:
    """An error in the place of one item of a batch answer: the body and the status it would have."""
    return error_body(exc.code, exc.message, status=exc.status, **exc.details)


def invalid_request(errors: list[dict]) -> ApiError:
    """pydantic/FastAPI validation errors as the API's: 400 for broken JSON, else 422 naming the field."""
    if any(e.get("type") == "json_invalid" for e in errors):
        return ApiError(400, "invalid_json", "request body is not valid JSON")
    fields = [{"field": ".".join(str(p) for p in e["loc"] if p not in ("body", "query", "path")) or "body",
               "message": _message(e)} for e in errors]
    first = fields[0]
    return ApiError(422, "invalid_request", f"{first['field']}: {first['message']}",
                    field=first["field"], fields=fields)


def _message(error: dict) -> str:
    if error.get("type") == "string_pattern_mismatch" and "\\x00" in str((error.get("ctx") or {}).get("pattern")):
        return "must not contain control characters"
    return error["msg"]


def install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(ApiError)
    async def _api_error(_: Request, exc: ApiError) -> JSONResponse:
        return error_response(exc.status, exc.code, exc.message, **exc.details)

    @app.exception_handler(RequestValidationError)
    async def _validation(_: Request, exc: RequestValidationError) -> JSONResponse:
        error = invalid_request(list(exc.errors()))
        return error_response(error.status, error.code, error.message, **error.details)

    @app.exception_handler(StarletteHTTPException)
    async def _http(_: Request, exc: StarletteHTTPException) -> JSONResponse:
        code = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code, "http_error")
        return error_response(exc.status_code, code, str(exc.detail))

    @app.exception_handler(ShardUnavailable)
    async def _shard_unavailable(_: Request, exc: ShardUnavailable) -> JSONResponse:
        return error_response(503, exc.code, str(exc))  # shard_unavailable, shard_version_mismatch

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception) -> JSONResponse:
        if is_outage(exc):
            # Postgres went away mid-request (restart, shutting down, failover): retry.
            log.warning("database unavailable on %s %s: %r", request.method, request.url.path, exc)
            return error_response(503, "database_unavailable", "the database is unavailable; retry the request")
        # A bug, never the caller's fault: log it whole, tell the caller nothing internal.
        log.exception("unhandled error on %s %s", request.method, request.url.path)
        return error_response(500, "internal_error", "internal error; it has been logged")
