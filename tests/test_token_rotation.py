"""Rotating the service token, the admin token and the org-token secret without a 401 window:
while METERGATE_*_PREVIOUS is set, the value being replaced still works with its own rights,
and each use of it is logged at most once a minute per replica, never the token itself.

The HTTP tests run the ingress's own ASGI app (hot path, body limit, routes) in this process on
the session service's shards and Postgres, with settings of their own: the session service's
tokens are fixed, and a rotation is a replica started with other settings."""

from __future__ import annotations

import asyncio
import logging
import time

import httpx
import pytest

from config.settings import Settings, SettingsError, load_settings, with_generated_tokens
from serve_app.auth import PREVIOUS_LOG_EVERY_S, OrgTokens, PreviousUses
from serve_app.errors import ApiError
from tests.helpers import ADMIN_TOKEN, SERVICE_TOKEN, mint

NEW_SERVICE_TOKEN = "rotated-service-token-0123456789"
NEW_ADMIN_TOKEN = "rotated-admin-token-0123456789"
NEW_ORG_SECRET = "rotated-org-token-secret-0123456789-abcdef"


def replica_answers(service, calls: list[tuple[str, str, str, dict | None]], **rotation) -> tuple[list, object]:
    """(status, body) of each call (method, path, token, JSON body) made to an ingress replica
    whose settings are the service's with `rotation` applied, in order; and its Context."""
    from actors.routing import ShardRouter
    from config.catalog import load_catalog
    from serve_app.app import build_app
    from serve_app.context import Context
    from serve_app.hot_path import HotPath

    settings = Settings.model_validate({**service.settings.model_dump(), **rotation})  # validated, as a start does
    ctx = Context(settings, load_catalog(settings.catalog), ShardRouter(service.slot_map))

    async def run() -> list:
        replica = HotPath(build_app(ctx), ctx)
        try:
            async with httpx.AsyncClient(transport=httpx.ASGITransport(app=replica), base_url="http://metergate",
                                         timeout=60) as client:
                answers = []
                for method, path, token, body in calls:
                    response = await client.request(method, path, json=body,
                                                    headers={"Authorization": f"Bearer {token}"})
                    answers.append((response.status_code, response.json() if "json" in response.headers.get(
                        "content-type", "") else response.text))
                return answers
        finally:
            if ctx._clock_task is not None:
                ctx._clock_task.cancel()
            if ctx.pool is not None:
                await ctx.pool.close()

    return asyncio.run(run()), ctx


def test_during_a_rotation_the_old_service_and_admin_tokens_keep_their_own_rights(service, admin, new_org):
    org = new_org()
    gate = {"org_id": org, "action": "create"}
    calls = [
        ("POST", "/v1/gate", SERVICE_TOKEN, gate),          # old service token: still the compute plane
        ("POST", "/v1/gate", NEW_SERVICE_TOKEN, gate),
        ("GET", f"/v1/orgs/{org}", SERVICE_TOKEN, None),    # ... and still not an operator
        ("GET", f"/v1/orgs/{org}", ADMIN_TOKEN, None),      # old admin token: still an operator
        ("GET", f"/v1/orgs/{org}", NEW_ADMIN_TOKEN, None),
        ("POST", "/v1/gate", "some-token-nobody-was-given-0123", gate),
    ]
    answers, ctx = replica_answers(service, calls, service_token=NEW_SERVICE_TOKEN, admin_token=NEW_ADMIN_TOKEN,
                                   service_token_previous=SERVICE_TOKEN, admin_token_previous=ADMIN_TOKEN)
    statuses = [status for status, _ in answers]
    assert statuses == [200, 200, 403, 200, 200, 401], answers
    assert answers[0][1]["allowed"] is True and answers[1][1]["allowed"] is True
    assert answers[2][1]["error"]["code"] == "forbidden"
    assert answers[3][1]["org_id"] == org
    # A POST is checked at the edge (before its body) and again by its route: the gate's counts twice.
    assert ctx.previous_tokens.uses.total == {"service": 3, "admin": 1}

    # The rotation done (the previous settings unset): the old tokens are refused.
    answers, ctx = replica_answers(service, calls[:1] + calls[3:4], service_token=NEW_SERVICE_TOKEN,
                                   admin_token=NEW_ADMIN_TOKEN)
    assert [status for status, _ in answers] == [401, 401], answers
    assert ctx.previous_tokens is None  # nothing on the token check's path without a rotation


def test_org_tokens_signed_with_the_previous_secret_still_open_their_org_and_new_ones_use_the_new_secret(
        service, admin, new_org):
    org, other = new_org(), new_org()
    old_signed = mint(admin, org)  # by the session service: its secret is the one being replaced
    old_secret = service.settings.org_token_secret
    calls = [
        ("GET", f"/billing/{org}", old_signed, None),
        ("GET", f"/billing/{other}", old_signed, None),  # still scoped to its org
        ("POST", f"/v1/orgs/{org}/tokens", NEW_ADMIN_TOKEN, {"ttl_s": 3600}),
    ]
    answers, ctx = replica_answers(service, calls, admin_token=NEW_ADMIN_TOKEN, org_token_secret=NEW_ORG_SECRET,
                                   org_token_secret_previous=old_secret)
    assert [status for status, _ in answers] == [200, 403, 201], answers
    assert answers[0][1].lstrip().lower().startswith("<!doctype html")
    new_signed = answers[2][1]["token"]
    assert OrgTokens(NEW_ORG_SECRET).verify(new_signed, int(time.time())).org == org
    with pytest.raises(ApiError, match="invalid token"):
        OrgTokens(old_secret).verify(new_signed, int(time.time()))
    assert ctx.previous_tokens is None and set(ctx.org_tokens.uses.total) == {"org secret"}

    answers, _ = replica_answers(service, calls[:1], org_token_secret=NEW_ORG_SECRET)  # the rotation done
    assert answers[0][0] == 401, answers


def _forged(secret: str, org: str, exp_s: int, iat_us: int) -> str:
    """An org token signed with `secret` whatever its claims: what a holder of a leaked secret
    can make (mint() itself refuses such claims)."""
    import msgspec

    from serve_app.auth import ORG_TOKEN_PREFIX, OrgTokenClaims, _b64

    payload = _b64(msgspec.json.encode(OrgTokenClaims(org, exp_s, iat_us)))
    return f"{ORG_TOKEN_PREFIX}{payload}.{OrgTokens(secret)._sign(payload)}"


def test_a_token_signed_with_the_previous_secret_cannot_outlive_a_revocation_or_a_month(service, admin, new_org):
    """A leaked secret kept as the previous one must not make tokens that a revocation misses
    (issued in the future) or that live longer than any minted one (MAX_ORG_TOKEN_TTL_S)."""
    from serve_app.auth import MAX_ORG_TOKEN_TTL_S

    org = new_org()
    old_secret = service.settings.org_token_secret
    now_s = int(time.time())
    signer = OrgTokens(NEW_ORG_SECRET, old_secret)
    for exp_s, iat_us in ((now_s + 3600, (now_s + 10 * 86_400) * 1_000_000),  # issued in ten days
                          (now_s + MAX_ORG_TOKEN_TTL_S + 3600, now_s * 1_000_000),  # lives a month and an hour
                          (now_s + MAX_ORG_TOKEN_TTL_S + 3600, 0)):  # no issue time, a month and an hour
        with pytest.raises(ApiError, match="invalid token"):
            signer.verify(_forged(old_secret, org, exp_s, iat_us), now_s)
    assert signer.verify(_forged(old_secret, org, now_s + 3600, now_s * 1_000_000), now_s).org == org
    # A token of the previous secret, then the org's tokens revoked: 401 through a rotating replica.
    old_signed = mint(admin, org)
    assert admin.post(f"/v1/orgs/{org}/tokens/revoke").status_code == 200
    answers, _ = replica_answers(service, [("GET", f"/billing/{org}", old_signed, None)],
                                 org_token_secret=NEW_ORG_SECRET, org_token_secret_previous=old_secret)
    assert answers[0][0] == 401, answers


def test_uses_of_previous_tokens_are_logged_once_a_minute_per_replica_and_never_the_token(
        service, admin, new_org, caplog):
    org = new_org()
    calls = [("GET", f"/v1/orgs/{org}", ADMIN_TOKEN, None)] * 3 + [
        ("POST", "/v1/gate", SERVICE_TOKEN, {"org_id": org, "action": "create"})]
    with caplog.at_level(logging.INFO, logger="metergate.auth"):
        answers, _ = replica_answers(service, calls, service_token=NEW_SERVICE_TOKEN, admin_token=NEW_ADMIN_TOKEN,
                                     service_token_previous=SERVICE_TOKEN, admin_token_previous=ADMIN_TOKEN)
    assert [status for status, _ in answers] == [200, 200, 200, 200], answers
    lines = [record.getMessage() for record in caplog.records if record.name == "metergate.auth"]
    assert len(lines) == 1, lines
    assert "admin 1" in lines[0] and "PREVIOUS" in lines[0]
    assert not any(secret in line for line in lines for secret in (SERVICE_TOKEN, ADMIN_TOKEN))


def test_the_log_line_counts_every_use_since_the_last_one(caplog):
    now_s = [1_000.0]
    uses = PreviousUses(clock=lambda: now_s[0])
    with caplog.at_level(logging.INFO, logger="metergate.auth"):
        for at_s, kind in [(0, "service"), (10, "service"), (30, "org secret"),
                           (PREVIOUS_LOG_EVERY_S - 1, "admin"), (PREVIOUS_LOG_EVERY_S, "service")]:
            now_s[0] = 1_000.0 + at_s
            uses.used(kind)
    lines = [record.getMessage() for record in caplog.records if record.name == "metergate.auth"]
    assert len(lines) == 2, lines
    assert "service 1)" in lines[0]
    assert "admin 1, org secret 1, service 2)" in lines[1]
    assert uses.total == {"service": 3, "org secret": 1, "admin": 1}


@pytest.mark.parametrize("variable, value, mentions", [
    ("METERGATE_SERVICE_TOKEN_PREVIOUS", ADMIN_TOKEN, "METERGATE_ADMIN_TOKEN"),
    ("METERGATE_ADMIN_TOKEN_PREVIOUS", SERVICE_TOKEN, "METERGATE_SERVICE_TOKEN"),
    ("METERGATE_ADMIN_TOKEN_PREVIOUS", "an-old-token-of-both-roles-0123", "METERGATE_SERVICE_TOKEN_PREVIOUS"),
    ("METERGATE_SERVICE_TOKEN_PREVIOUS", "short", "at least 16 characters"),
    ("METERGATE_ORG_TOKEN_SECRET_PREVIOUS", "s" * 31, "at least 32 characters"),
])
def test_a_previous_token_of_another_role_or_too_short_stops_the_start(monkeypatch, variable, value, mentions):
    monkeypatch.setenv("METERGATE_SERVICE_TOKEN", SERVICE_TOKEN)
    monkeypatch.setenv("METERGATE_ADMIN_TOKEN", ADMIN_TOKEN)
    monkeypatch.setenv("METERGATE_SERVICE_TOKEN_PREVIOUS", "an-old-token-of-both-roles-0123")
    monkeypatch.setenv(variable, value)
    with pytest.raises(SettingsError) as caught:
        load_settings()
    assert f"{variable}:" in str(caught.value) and mentions in str(caught.value), str(caught.value)


def test_a_previous_token_equal_to_a_generated_token_of_another_role_stops_the_start(tmp_path):
    generated = with_generated_tokens(Settings(data_dir=tmp_path))
    with pytest.raises(SettingsError, match="METERGATE_ADMIN_TOKEN_PREVIOUS: must differ from METERGATE_SERVICE_TOKEN:"):
        with_generated_tokens(Settings(data_dir=tmp_path, admin_token_previous=generated.service_token))
    rotated = with_generated_tokens(Settings(data_dir=tmp_path, admin_token_previous=generated.admin_token,
                                             admin_token=NEW_ADMIN_TOKEN))  # the admin token rotated
    assert (rotated.admin_token, rotated.admin_token_previous) == (NEW_ADMIN_TOKEN, generated.admin_token)
