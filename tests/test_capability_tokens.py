"""Capability tokens through the real service: an allowed lease (and a gate check that asks)
carries a token a cell verifies offline with the keys of GET /.well-known/metergate-keys; the
example cell (metergate_client/cell_example.py) refuses a create without one, with a forged,
expired, another org's or a too-small one, or one signed with a key not published; a rotation
keeps the previous key's tokens valid."""

from __future__ import annotations

import threading
import time
import uuid
from datetime import UTC, datetime

import httpx
import msgspec
import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from pydantic import ValidationError

from config.settings import Settings, SettingsError, generated_tokens
from metergate_client import CapabilityError, Refusal, Resources, Verifier
from metergate_client.captoken import Claims, Grant, b64, sign, unb64
from metergate_client.cell_example import TOKEN_HEADER, Cell, CreateBody, serve
from serve_app.captokens import GATE_TOKEN_TTL_S, KEYS_MAX_AGE_S
from tests.delaying_relay import DelayingRelay
from tests.helpers import SERVICE_TOKEN
from tests.test_token_rotation import replica_answers

KEYS = "/.well-known/metergate-keys"
RESOURCES = {"memory_mb": 2048, "cpu_count": 1}


def service_clock(admin):
    """The service's clock (the test clock may be ahead of this host's)."""
    offset_s = admin.get("/v1/test-clock").json()["offset_s"]
    return lambda: time.time() + offset_s


def lease(compute, org: str, lease_id: str | None = None, **extra) -> dict:
    answer = compute.post("/v1/leases", json={"org_id": org, "lease_id": lease_id or f"sbx_{uuid.uuid4().hex[:8]}",
                                              "resources": RESOURCES, "ttl_s": 600, **extra})
    assert answer.status_code in (200, 201), answer.text
    return answer.json()


@pytest.fixture
def cell(service, admin):
    """The example cell on a port of its own, with the service's keys; (its URL, the Cell)."""
    made = Cell(service.base_url, clock=service_clock(admin))
    server = serve(made, port=0)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_port}", made
    finally:
        server.shutdown()
        server.server_close()


def create(cell_url: str, token: str | None, org: str, **resources) -> httpx.Response:
    return httpx.post(f"{cell_url}/sandboxes", json={"org_id": org, **resources}, timeout=30,
                      headers={TOKEN_HEADER: token} if token is not None else {})


def test_an_allowed_lease_carries_a_token_that_verifies_with_the_published_keys(service, admin, compute, new_org):
    org = new_org()
    answer = lease(compute, org, "sbx_token")
    verifier = Verifier(httpx.get(service.base_url + KEYS, timeout=30).json(), clock=service_clock(admin))
    capability = verifier.verify(answer["capability_token"], org, "create")
    claims = capability.claims
    assert (claims.org_id, claims.lease_id, claims.action) == (org, "sbx_token", "create")
    assert claims.resources == Grant(memory_mb=2048, cpu_count=1)
    assert claims.exp == int(datetime.fromisoformat(answer["expires_at"]).timestamp())  # the lease's own expiry
    held = admin.get(f"/v1/orgs/{org}").json()
    assert (claims.tier, claims.plan) == (held["tier"], held["plan"]["id"])  # what the cell must enforce
    capability.requires(Resources(memory_mb=2048, cpu_count=1))
    with pytest.raises(CapabilityError) as refused:
        capability.requires(Resources(memory_mb=4096))
    assert refused.value.refusal is Refusal.EXCEEDS_GRANT
    with pytest.raises(CapabilityError) as refused:
        verifier.verify(answer["capability_token"], "org_someone_else", "create")
    assert refused.value.refusal is Refusal.WRONG_ORG

    renewed = compute.post(f"/v1/leases/{org}/sbx_token/renew").json()
    again = verifier.verify(renewed["capability_token"], org, "create").claims
    assert again.lease_id == "sbx_token" and again.exp >= claims.exp and again.tier == claims.tier


def test_a_renewal_or_the_same_lease_again_gets_a_token_only_while_the_org_may_run(service, admin, compute,
                                                                                   new_org):
    """Neither a renewal nor a repeated POST /v1/leases passes the gate: their tokens are signed
    only while the org is neither halted, nor suspended, nor out of money."""
    org = new_org()
    first = lease(compute, org, "sbx_standing")
    assert "capability_token" in first
    assert admin.post(f"/v1/orgs/{org}/halt").status_code == 200
    renewed = compute.post(f"/v1/leases/{org}/sbx_standing/renew")
    assert renewed.status_code == 200 and "capability_token" not in renewed.json(), renewed.text
    assert "capability_token" not in lease(compute, org, "sbx_standing")  # the same lease again
    assert admin.post(f"/v1/orgs/{org}/resume").status_code == 200
    assert "capability_token" in compute.post(f"/v1/leases/{org}/sbx_standing/renew").json()


def test_a_token_has_one_spelling(service, compute, new_org):
    """The signature's last character carries unused bits: a spelling with them set is refused
    (else 16 strings verify for one token, and a cell counting tokens by string is fooled)."""
    token = lease(compute, new_org())["capability_token"]
    head, body, signature = token.split(".")
    alphabet = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_"
    respelled = signature[:-1] + alphabet[alphabet.index(signature[-1]) ^ 1]  # an unused bit set
    assert _same_bytes(respelled, unb64(signature))
    verifier = Verifier(httpx.get(service.base_url + KEYS, timeout=30).json())
    with pytest.raises(CapabilityError):
        verifier.verify(f"{head}.{body}.{respelled}", None, "create")


def _same_bytes(text: str, raw: bytes) -> bool:
    import base64
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4)) == raw


def test_a_gate_check_carries_a_token_only_when_asked_and_allowed(service, admin, compute, new_org):
    org = new_org()
    verifier = Verifier(httpx.get(service.base_url + KEYS, timeout=30).json(), clock=service_clock(admin))
    plain = compute.post("/v1/gate", json={"org_id": org, "action": "create", "resources": RESOURCES}).json()
    assert plain["allowed"] and "capability_token" not in plain
    asked = compute.post("/v1/gate", json={"org_id": org, "action": "ingest", "token": True}).json()
    claims = verifier.verify(asked["capability_token"], org, "ingest").claims
    assert claims.lease_id is None and claims.exp - claims.iat == GATE_TOKEN_TTL_S
    denied = compute.post("/v1/gate", json={"org_id": org, "action": "create", "token": True,
                                            "resources": {"disk_mb": 10**9}}).json()
    assert denied["allowed"] is False and "capability_token" not in denied
    batch = compute.post("/v1/gate/batch", json={"checks": [
        {"org_id": org, "action": "wake", "token": True}, {"org_id": org, "action": "wake"}]}).json()
    assert verifier.verify(batch["decisions"][0]["capability_token"], org, "wake")
    assert "capability_token" not in batch["decisions"][1]


def test_a_gate_checks_token_ends_no_later_than_the_view_it_was_decided_from(service, admin, compute, new_org):
    """A grant that expires in 20 s ends the org's view then (time alone changes its balance):
    the token of a check decided from that view expires by then, not GATE_TOKEN_TTL_S later."""
    org = new_org()
    verifier = Verifier(httpx.get(service.base_url + KEYS, timeout=30).json(), clock=service_clock(admin))
    before = compute.post("/v1/gate", json={"org_id": org, "action": "ingest"}).json()["balance_micros"]
    expires_s = int(service_clock(admin)()) + 20
    granted = admin.post(f"/v1/orgs/{org}/credits", json={
        "kind": "grant", "amount_micros": 1_000_000, "expires_at": datetime.fromtimestamp(expires_s, UTC).isoformat()})
    assert granted.status_code in (200, 201), granted.text
    deadline = time.monotonic() + 10
    while True:  # until the router's view of the org holds the grant
        asked = compute.post("/v1/gate", json={"org_id": org, "action": "ingest", "token": True}).json()
        if asked["balance_micros"] == before + 1_000_000 or time.monotonic() > deadline:
            break
        time.sleep(0.05)
    claims = verifier.verify(asked["capability_token"], org, "ingest").claims
    assert claims.iat <= claims.exp <= expires_s < claims.iat + GATE_TOKEN_TTL_S, (claims, expires_s)
    batch = compute.post("/v1/gate/batch", json={"checks": [{"org_id": org, "action": "wake", "token": True}]}).json()
    claims = verifier.verify(batch["decisions"][0]["capability_token"], org, "wake").claims
    assert claims.iat <= claims.exp <= expires_s, (claims, expires_s)


def test_the_cell_refuses_without_a_token_or_with_a_forged_expired_or_too_small_one(service, admin, compute,
                                                                                    new_org, cell):
    cell_url, made = cell
    org, other = new_org(), new_org()
    token = lease(compute, org)["capability_token"]

    assert create(cell_url, token, org, memory_mb=1024).status_code == 201  # less than granted
    # A token is not a ticket: its lease's one slot is taken, so the same token again creates nothing.
    again = create(cell_url, token, org, memory_mb=1024)
    assert (again.status_code, again.json()["error"]["code"]) == (403, "exceeds_grant"), again.text
    token = lease(compute, org)["capability_token"]
    assert create(cell_url, token, org, memory_mb=2048, cpu_count=1).status_code == 201
    token = lease(compute, org)["capability_token"]  # a fresh lease for the refusals below
    checked = compute.post("/v1/gate", json={"org_id": org, "action": "create", "token": True,
                                             "resources": {"memory_mb": 1024}}).json()
    by_gate = create(cell_url, checked["capability_token"], org, memory_mb=1024)  # holds no slot
    assert (by_gate.status_code, by_gate.json()["error"]["code"]) == (403, "wrong_action"), by_gate.text

    refused = {
        "no token": (create(cell_url, None, org, memory_mb=1024), 401, "capability_required"),
        "more memory": (create(cell_url, token, org, memory_mb=4096), 403, "exceeds_grant"),
        "another org": (create(cell_url, token, other, memory_mb=1024), 403, "wrong_org"),
        "forged": (create(cell_url, forged(token, memory_mb=65_536), org, memory_mb=65_536), 403, "bad_signature"),
        "another key": (create(cell_url, signed_elsewhere(token), org, memory_mb=1024), 403, "unknown_key"),
        "truncated": (create(cell_url, token[:-20], org, memory_mb=1024), 403, "truncated"),
    }
    for what, (answer, status, code) in refused.items():
        assert (answer.status_code, answer.json()["error"]["code"]) == (status, code), what

    later = Cell(service.base_url, clock=lambda: service_clock(admin)() + 3600)  # the lease's hour has passed
    status, answer = later.create(token, CreateBody(org, memory_mb=1024))
    assert (status, answer["error"]["code"]) == (403, "expired")
    assert len(made.created) == 2


def test_a_cell_fetching_the_key_set_again_goes_on_creating_and_fetches_once(service, admin, compute, new_org):
    """A token of a key the cell lacks makes it fetch the key set again. The fetch is slow here
    (metergate's answers held 2 s on the way) and holds no lock: a create whose token the cell
    can check is answered meanwhile; a second token of an unknown key waits for the same fetch
    instead of starting another; both are refused (still unknown)."""
    org = new_org()
    with DelayingRelay(service.base_url) as slow:
        made = Cell(slow.url, clock=service_clock(admin), keys_refetch_s=0)
        unknown = [signed_elsewhere(lease(compute, org)["capability_token"]) for _ in range(2)]
        known = lease(compute, org)["capability_token"]
        slow.delay_s = 2.0
        answers: list = []
        fetching = [threading.Thread(target=lambda t=t: answers.append(made.create(t, CreateBody(org, memory_mb=1))))
                    for t in unknown]
        fetching[0].start()
        deadline = time.monotonic() + 10
        while made.key_refetches == 0 and time.monotonic() < deadline:
            time.sleep(0.01)
        fetching[1].start()
        started = time.monotonic()
        status, answer = made.create(known, CreateBody(org, memory_mb=1024))
        took_s = time.monotonic() - started
        assert status == 201 and took_s < 1.0, (status, answer, took_s)
        for thread in fetching:
            thread.join(30)
    assert [(status, answer["error"]["code"]) for status, answer in answers] == [(403, "unknown_key")] * 2
    assert made.key_refetches == 1


def test_a_shadow_cell_creates_anyway_and_counts_what_it_would_refuse(service, admin, new_org):
    shadow = Cell(service.base_url, shadow=True, clock=service_clock(admin))
    status, _ = shadow.create(None, CreateBody(new_org(), memory_mb=1024))
    assert status == 201 and shadow.shadow_refusals == 1


def test_the_key_set_is_cacheable_and_names_the_key_tokens_are_signed_with(service, compute, new_org):
    answer = httpx.get(service.base_url + KEYS, timeout=30)
    assert answer.status_code == 200 and answer.headers["content-type"] == "application/json"
    assert answer.headers["cache-control"] == f"public, max-age={KEYS_MAX_AGE_S}"
    etag = answer.headers["etag"]
    (key,) = answer.json()["keys"]
    assert {k: key[k] for k in ("kty", "crv", "use", "alg")} == {"kty": "OKP", "crv": "Ed25519", "use": "sig",
                                                                  "alg": "EdDSA"}
    assert len(unb64(key["x"])) == 32
    token = lease(compute, new_org())["capability_token"]
    assert msgspec.json.decode(unb64(token.split(".")[0]))["kid"] == key["kid"]

    unchanged = httpx.get(service.base_url + KEYS, headers={"If-None-Match": etag}, timeout=30)
    assert unchanged.status_code == 304 and unchanged.content == b"" and unchanged.headers["etag"] == etag
    assert httpx.get(service.base_url + KEYS, headers={"If-None-Match": '"other"'}, timeout=30).status_code == 200


def test_a_rotation_signs_with_the_new_key_and_the_previous_keys_tokens_still_verify(service, admin, compute,
                                                                                    new_org):
    org = new_org()
    old_token = lease(compute, org)["capability_token"]
    old_key = service.settings.capability_key
    new_key = b64(bytes(range(32)))
    body = {"org_id": org, "lease_id": "sbx_rotated", "resources": RESOURCES, "ttl_s": 600}
    (keys, taken), _ = replica_answers(service, [("GET", KEYS, SERVICE_TOKEN, None),
                                                  ("POST", "/v1/leases", SERVICE_TOKEN, body)],
                                       capability_key=new_key, capability_key_previous=old_key)
    assert keys[0] == 200 and len(keys[1]["keys"]) == 2
    during = Verifier(keys[1], clock=service_clock(admin))
    new_token = taken[1]["capability_token"]
    assert during.verify(old_token, org, "create").kid != during.verify(new_token, org, "create").kid

    with pytest.raises(CapabilityError) as refused:  # a cell still holding only the old key set
        Verifier(httpx.get(service.base_url + KEYS, timeout=30).json(), clock=service_clock(admin)).verify(new_token)
    assert refused.value.refusal is Refusal.UNKNOWN_KEY

    [(_, after)], _ = replica_answers(service, [("GET", KEYS, SERVICE_TOKEN, None)], capability_key=new_key)
    with pytest.raises(CapabilityError) as refused:  # the rotation done: the previous key is gone
        Verifier(after, clock=service_clock(admin)).verify(old_token)
    assert refused.value.refusal is Refusal.UNKNOWN_KEY


def forged(token: str, **grant) -> str:
    """The token with more resources in its claims and its signature kept."""
    header, claims, signature = token.split(".")
    changed = msgspec.json.decode(unb64(claims))
    changed["resources"] = {**changed["resources"], **grant}
    return f"{header}.{b64(msgspec.json.encode(changed))}.{signature}"


def signed_elsewhere(token: str) -> str:
    """The same claims signed by a key metergate never published."""
    claims = msgspec.json.decode(unb64(token.split(".")[1]), type=Claims)
    return sign(Ed25519PrivateKey.generate(), claims)


def test_a_replica_without_a_capability_key_answers_leases_without_a_token(service, new_org):
    """A cluster node not given METERGATE_CAPABILITY_KEY: leases still work, carry no token,
    and the key set is empty, so a cell refuses (closed) rather than billing stopping."""
    body = {"org_id": new_org(), "lease_id": "sbx_keyless", "resources": RESOURCES, "ttl_s": 60}
    (keys, taken), _ = replica_answers(service, [("GET", KEYS, SERVICE_TOKEN, None),
                                                  ("POST", "/v1/leases", SERVICE_TOKEN, body)], capability_key=None)
    assert keys == (200, {"keys": []})
    assert taken[0] == 201 and "capability_token" not in taken[1]


def test_a_previous_key_equal_to_the_kept_key_is_refused_at_start(tmp_path):
    kept, _ = generated_tokens(Settings(data_dir=tmp_path))
    with pytest.raises(SettingsError, match="METERGATE_CAPABILITY_KEY_PREVIOUS"):
        generated_tokens(Settings(data_dir=tmp_path, capability_key_previous=kept.capability_key))
    with pytest.raises(ValidationError, match="must differ"):
        Settings(capability_key=kept.capability_key, capability_key_previous=kept.capability_key)
