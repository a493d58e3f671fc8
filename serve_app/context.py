"""What every request handler of a replica shares: settings, catalog, shard router, pool, auth."""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass

import asyncpg
import msgspec
from fastapi import Request, Response

from actors import clock
from actors.clock import now_us
from config.catalog import Catalog
from config.settings import Settings
from serve_app.auth import Caller, bearer, forbidden, identify, token_checks
from serve_app.captokens import CapabilitySigner
from serve_app.errors import ApiError
from actors.routing import ShardRouter
from serve_app.stripe_gateway import StripeGateway
from storage import clock_offset, orgs
from storage.db import create_pool

REVOCATIONS_FRESH_S = 1.0


@dataclass
class Context:
    settings: Settings
    catalog: Catalog
    router: ShardRouter
    pool: asyncpg.Pool | None = None
    _pool_lock: asyncio.Lock | None = None
    _clock_task: asyncio.Task | None = None

    async def db(self) -> asyncpg.Pool:
        """The replica's pool, made on first use (it must be made on the serving loop)."""
        if self.pool is None:
            self._pool_lock = self._pool_lock or asyncio.Lock()
            async with self._pool_lock:
                if self.pool is None:
                    self.pool = await create_pool(self.settings.database_url, min_size=1, max_size=4)
                    if self.settings.test_clock:
                        self._clock_task = asyncio.ensure_future(self._follow_test_clock())
        return self.pool

    async def _follow_test_clock(self) -> None:
        """Test clock only: take the offset another replica or the scheduler set, within a second."""
        while True:
            try:
                async with self.pool.acquire() as conn:
                    clock.set_offset_us(await clock_offset.offset_us(conn))
            except Exception:  # noqa: BLE001 - Postgres away: try again in a second
                pass
            await asyncio.sleep(1.0)

    def jobs(self):
        """The scheduler actor."""
        import ray

        from actors.jobs import JOBS_NAME
        from actors.placement import NAMESPACE

        return ray.get_actor(JOBS_NAME, namespace=NAMESPACE)

    def __post_init__(self) -> None:
        self.org_tokens, self.previous_tokens = token_checks(self.settings)
        # None without a key: an app built without generated secrets (tests), or a cluster whose
        # nodes were not given METERGATE_CAPABILITY_KEY; answers then carry no token.
        self.capabilities = (CapabilitySigner(self.settings.capability_key, self.settings.capability_key_previous)
                             if self.settings.capability_key else None)
        self._revocations: dict[str, tuple[int, float]] = {}  # org → (tokens valid after, µs; read at)
        self.recent_months: dict[str, tuple[float, tuple, asyncio.Future]] = {}  # org → months: calls.py
        self.stripe = StripeGateway(self.settings)

    def caller(self, request: Request, browser: bool = False) -> Caller:
        return self.identify(bearer(request, browser))

    def identify(self, token: str) -> Caller:
        return identify(token, self.settings.service_token, self.settings.admin_token, self.org_tokens,
                        now_us() // 1_000_000, self.previous_tokens)

    async def require_unrevoked(self, caller: Caller) -> None:
        """401 for an org token issued before its org's tokens were revoked. Every request that
        carries an org token passes here (serve_app/limits.py); a revocation reaches every
        replica within REVOCATIONS_FRESH_S."""
        at = time.monotonic()
        known = self._revocations.get(caller.org_id)
        if known is None or at - known[1] > REVOCATIONS_FRESH_S:
            async with (await self.db()).acquire() as conn:
                valid_after = await orgs.tokens_valid_after(conn, caller.org_id)
            known = self._revocations[caller.org_id] = (valid_after or 0, at)
            if len(self._revocations) > 10_000:
                self._revocations.clear()
        if known[0] and caller.issued_us < known[0]:
            raise ApiError(401, "token_revoked", "this org token was revoked; ask for a new one")

    def service(self, request: Request) -> None:
        """The compute plane's endpoints: service token (or admin)."""
        if self.caller(request).role == "org":
            raise forbidden("an org token cannot use the compute-plane API")

    def admin(self, request: Request) -> None:
        if self.caller(request).role != "admin":
            raise forbidden("this endpoint needs the admin token")

    def org_or_admin(self, request: Request, org_id: str, browser: bool = False) -> Caller:
        """Self-serve: the org's own token, or admin. Another org's token is 403. `browser`:
        the billing page, which also takes the token from its link and its cookie."""
        caller = self.caller(request, browser)
        if caller.role == "admin" or (caller.role == "org" and caller.org_id == org_id):
            return caller
        raise forbidden("this token does not give access to this org")


def json(body: object, status: int = 200) -> Response:
    return Response(msgspec.json.encode(body), status_code=status, media_type="application/json")
