"""Who is calling: the service token (compute plane), the admin token, or an org token.

An org token is `mgo_<payload>.<signature>`: the payload names one org and an expiry, the
signature is HMAC-SHA256 with METERGATE_ORG_TOKEN_SECRET. It opens that org's self-serve
pages and nothing else. A token that is not valid is 401; a valid one used where its role
or org has no access is 403.

During a rotation (METERGATE_*_PREVIOUS set) the value being replaced still works, with the
same rights: callers move to the new one while both are accepted. Each use of an old value is
tallied, and logged at most once a minute per replica, so an operator sees when callers have
moved and the old value can be unset.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from urllib.parse import parse_qs

import msgspec
from fastapi import Request

from config.settings import Settings
from serve_app.errors import ApiError

ORG_TOKEN_PREFIX = "mgo_"
MIN_ORG_TOKEN_TTL_S = 60
MAX_ORG_TOKEN_TTL_S = 30 * 86_400
ISSUED_AHEAD_AT_MOST_S = 300  # replicas' clocks may differ this much
PREVIOUS_LOG_EVERY_S = 60.0

log = logging.getLogger("metergate.auth")


@dataclass(frozen=True)
class Caller:
    role: str  # "service" | "admin" | "org"
    org_id: str | None = None
    issued_us: int = 0  # an org token's issue time: a revocation voids the ones issued before it


class OrgTokenClaims(msgspec.Struct, forbid_unknown_fields=True):
    org: str
    exp: int  # epoch seconds
    iat: int = 0  # epoch µs; 0 in tokens minted before revocation existed (any revocation voids them)


def _b64(raw: bytes) -> str:
    return base64.urlsafe_b64encode(raw).rstrip(b"=").decode()


def _unb64(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


class PreviousUses:
    """Acceptances of the values a rotation replaces, on this replica, by kind ("service",
    "admin", "org secret"; a request is checked at the edge and again by its route, so one
    request may count twice): tallied, and logged at most once every PREVIOUS_LOG_EVERY_S with
    the counts since the last line. The line names kinds and counts, never a token."""

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self.total: dict[str, int] = {}  # kind → acceptances since this replica started
        self._unlogged: dict[str, int] = {}
        self._clock = clock
        self._logged_s: float | None = None  # the clock's seconds at the last line

    def used(self, kind: str) -> None:
        self.total[kind] = self.total.get(kind, 0) + 1
        self._unlogged[kind] = self._unlogged.get(kind, 0) + 1
        now_s = self._clock()
        if self._logged_s is None or now_s - self._logged_s >= PREVIOUS_LOG_EVERY_S:
            counts = ", ".join(f"{kind} {count}" for kind, count in sorted(self._unlogged.items()))
            log.warning("previous tokens still accepted on this replica (times since the last such line: %s); "
                        "unset METERGATE_*_PREVIOUS once callers have moved and these lines stop", counts)
            self._unlogged.clear()
            self._logged_s = now_s


class PreviousTokens:
    """The service and admin tokens a rotation replaces (METERGATE_SERVICE_TOKEN_PREVIOUS,
    METERGATE_ADMIN_TOKEN_PREVIOUS), accepted with their role's rights. None of it exists
    without a rotation under way: the check of a current token does no extra work."""

    def __init__(self, service: str | None, admin: str | None, uses: PreviousUses) -> None:
        assert service is not None or admin is not None
        assert service != admin, "one token would open two roles (refused by the settings)"
        self._tokens = [(role, token.encode()) for role, token in (("admin", admin), ("service", service))
                        if token is not None]
        self.uses = uses

    @classmethod
    def of(cls, service: str | None, admin: str | None, uses: PreviousUses) -> PreviousTokens | None:
        return None if service is None and admin is None else cls(service, admin, uses)

    def caller(self, token: str) -> Caller | None:
        for role, previous in self._tokens:
            if hmac.compare_digest(token.encode(), previous):
                self.uses.used(role)
                return Caller(role)
        return None


class OrgTokens:
    """Mints org tokens with the current secret; verifies with it, and during a rotation
    (METERGATE_ORG_TOKEN_SECRET_PREVIOUS) with the previous one too."""

    def __init__(self, secret: str, previous_secret: str | None = None, uses: PreviousUses | None = None) -> None:
        self._key = secret.encode()
        self._previous_key = None if previous_secret is None else previous_secret.encode()
        self.uses = uses if uses is not None else PreviousUses()

    def _sign(self, payload: str, key: bytes | None = None) -> str:
        return _b64(hmac.new(self._key if key is None else key, payload.encode(), hashlib.sha256).digest())

    def _signed(self, payload: str, signature: str) -> bool:
        if hmac.compare_digest(signature.encode(), self._sign(payload).encode()):
            return True
        if self._previous_key is not None and hmac.compare_digest(
                signature.encode(), self._sign(payload, self._previous_key).encode()):
            self.uses.used("org secret")
            return True
        return False

    def mint(self, org_id: str, now_us: int, ttl_s: int) -> tuple[str, int]:
        assert MIN_ORG_TOKEN_TTL_S <= ttl_s <= MAX_ORG_TOKEN_TTL_S, ttl_s
        expires_s = now_us // 1_000_000 + ttl_s
        payload = _b64(msgspec.json.encode(OrgTokenClaims(org_id, expires_s, now_us)))
        return f"{ORG_TOKEN_PREFIX}{payload}.{self._sign(payload)}", expires_s

    def verify(self, token: str, now_s: int) -> OrgTokenClaims:
        """What the token says (its org, expiry, issue time); 401 if it is forged, malformed
        or expired. Whether it was revoked since is the edge's question (Context)."""
        payload, _, signature = token[len(ORG_TOKEN_PREFIX):].partition(".")
        if not self._signed(payload, signature):
            raise ApiError(401, "unauthorized", "invalid token")
        try:
            claims = msgspec.json.decode(_unb64(payload), type=OrgTokenClaims)
        except (ValueError, msgspec.DecodeError):
            raise ApiError(401, "unauthorized", "invalid token") from None
        if claims.exp <= now_s:
            raise ApiError(401, "token_expired", "this org token has expired; ask for a new one")
        # What mint() never signs: issued in the future (it would outlive any revocation, which
        # voids tokens issued before it), or valid longer than MAX_ORG_TOKEN_TTL_S. Only a holder
        # of the secret could sign one; refused, a leaked secret still cannot make a token that
        # lives past a month or past a revocation.
        issued_s = claims.iat // 1_000_000 if claims.iat else now_s  # 0: minted before `iat` existed
        if issued_s > now_s + ISSUED_AHEAD_AT_MOST_S or claims.exp > issued_s + MAX_ORG_TOKEN_TTL_S:
            raise ApiError(401, "unauthorized", "invalid token")
        return claims


def token_checks(settings: Settings) -> tuple[OrgTokens, PreviousTokens | None]:
    """What a replica checks tokens with, from its settings: the org tokens' signer and the
    previous service and admin tokens (None: no rotation under way), sharing one tally."""
    uses = PreviousUses()
    return (OrgTokens(settings.org_token_secret, settings.org_token_secret_previous, uses),
            PreviousTokens.of(settings.service_token_previous, settings.admin_token_previous, uses))


# The billing page's own session: the token of a `?token=` link, kept in an HttpOnly cookie
# scoped to that org's page, so the address bar, history and Stripe's return URLs carry none.
BILLING_COOKIE = "mg_billing"


def presented(request: Request, browser: bool = False) -> tuple[str, str]:
    """The token a request presents and where from: "header"; for a browser page also "query"
    (a link: a browser following one cannot set headers) and then "cookie" (set from that link)."""
    found = presented_in(request.scope, browser)
    if found is None:
        raise ApiError(401, "unauthorized", "missing bearer token (Authorization: Bearer <token>)")
    return found


def presented_in(scope, browser: bool) -> tuple[str, str] | None:
    """`presented`, from an ASGI scope: the one reading of a request's token, shared by the
    middleware that checks revocation and budgets before the body (serve_app/limits.py) and
    the handlers, so both see the same token. A request naming two (two Authorization headers,
    two `token` parameters, two billing cookies) is refused: which one counts must not depend on
    who reads it."""
    headers = scope.get("headers") or ()
    authorization = [value for name, value in headers if name == b"authorization"]
    if len(authorization) > 1:
        raise ApiError(401, "unauthorized", "more than one Authorization header")
    if authorization:
        scheme, _, token = authorization[0].decode("latin-1").partition(" ")
        if scheme.lower() == "bearer" and token.strip():
            return token.strip(), "header"
    if not browser:
        return None
    if scope["method"] == "GET":
        query = parse_qs(scope.get("query_string", b"").decode("latin-1")).get("token")
        if query:
            if len(query) > 1:
                raise ApiError(401, "unauthorized", "more than one token parameter")
            return query[0], "query"  # a link's first GET only: never a form post
    held = [value for name, value in headers if name == b"cookie"
            for value in _cookie_values(value.decode("latin-1"), BILLING_COOKIE)]
    if len(held) > 1:
        raise ApiError(401, "unauthorized", f"more than one {BILLING_COOKIE} cookie")
    return (held[0], "cookie") if held and held[0] else None


def _cookie_values(header: str, name: str) -> list[str]:
    """Every value of cookie `name` in a Cookie header (`a=1; b=2`), as browsers send it."""
    values = []
    for pair in header.split(";"):
        key, sep, value = pair.strip().partition("=")
        if sep and key.strip() == name:
            values.append(value.strip().strip('"'))
    return values


def bearer(request: Request, browser: bool = False) -> str:
    return presented(request, browser)[0]


def identify(token: str, service_token: str, admin_token: str, org_tokens: OrgTokens, now_s: int,
             previous: PreviousTokens | None = None) -> Caller:
    if hmac.compare_digest(token.encode(), admin_token.encode()):
        return Caller("admin")
    if hmac.compare_digest(token.encode(), service_token.encode()):
        return Caller("service")
    if previous is not None:
        caller = previous.caller(token)
        if caller is not None:
            return caller
    if token.startswith(ORG_TOKEN_PREFIX):
        claims = org_tokens.verify(token, now_s)
        return Caller("org", claims.org, claims.iat)
    raise ApiError(401, "unauthorized", "invalid token")


def forbidden(message: str) -> ApiError:
    return ApiError(403, "forbidden", message)
