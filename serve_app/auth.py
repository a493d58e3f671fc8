"""Bearer tokens: the service token (compute plane) and the admin token."""

from __future__ import annotations

import hmac

from fastapi import Request

from serve_app.errors import ApiError


def bearer(request: Request) -> str:
    header = request.headers.get("authorization", "")
    scheme, _, token = header.partition(" ")
    if scheme.lower() != "bearer" or not token:
        raise ApiError(401, "unauthorized", "missing bearer token (Authorization: Bearer <token>)")
    return token.strip()


def require_token(request: Request, *accepted: str) -> str:
    """The caller's token if it is one of `accepted` (compared in constant time)."""
    token = bearer(request)
    for expected in accepted:
        if hmac.compare_digest(token.encode(), expected.encode()):
            return expected
    raise ApiError(401, "unauthorized", "invalid token")
