"""One Idempotency-Key mechanism on every mutating route, admin and self-serve: the same key
with another body is 409 idempotency_conflict before anything reaches a shard or Stripe; the
same key and body get the first answer again; a refused request does not burn its key."""

from __future__ import annotations

import hashlib
import json
import uuid

import httpx
import pytest

from serve_app.idempotency import ABANDONED_AFTER_S
from tests.helpers import URLS, footprint, mint, org_client, stripe_client


def key() -> dict:
    return {"Idempotency-Key": f"k-{uuid.uuid4().hex}"}


def stripe_writes(service) -> tuple[int, int]:
    """What Stripe holds: sessions made (Checkout and portal) and customers."""
    sessions = httpx.get(f"{service.settings.stripe_api_base}/_fake/sessions", timeout=10).json()
    customers = stripe_client(service).v1.customers.list(params={"limit": 100}).data
    return len(sessions), len(customers)


ADMIN_ROUTES = [
    ("POST", "/v1/orgs", lambda org: {"org_id": f"{org}_new", "email": "a@example.com"},
     lambda org: {"org_id": f"{org}_other", "email": "a@example.com"}),
    ("POST", "/v1/orgs/{org}/credits", lambda org: {"kind": "grant", "amount_micros": 1_000},
     lambda org: {"kind": "grant", "amount_micros": 2_000}),
    ("PUT", "/v1/orgs/{org}/plan", lambda org: {"plan_id": "payg"}, lambda org: {"plan_id": "hobby_weekly"}),
    ("PUT", "/v1/orgs/{org}/tier", lambda org: {"tier": "pro"}, lambda org: {"tier": "base"}),
    ("PUT", "/v1/orgs/{org}/limits", lambda org: {"max_disk_mb": 1_000}, lambda org: {"max_disk_mb": 2_000}),
    ("PUT", "/v1/orgs/{org}/auto-recharge", lambda org: {"enabled": False},
     lambda org: {"enabled": True, "threshold_micros": 1, "amount_micros": 500_000}),
    ("POST", "/v1/orgs/{org}/halt", lambda org: None, lambda org: {"why": "other body"}),
    ("POST", "/v1/orgs/{org}/resume", lambda org: None, lambda org: {"why": "other body"}),
]

SELF_SERVE_ROUTES = [
    ("/v1/orgs/{org}/checkout/topup", {"amount_micros": 10_000_000, **URLS}, {"amount_micros": 20_000_000, **URLS}),
    ("/v1/orgs/{org}/checkout/setup", URLS, {**URLS, "success_url": "https://app.example.com/other"}),
    ("/v1/orgs/{org}/checkout/tier", {"tier": "pro", **URLS}, {"tier": "pro_plus", **URLS}),
    ("/v1/orgs/{org}/portal", {"return_url": "https://app.example.com/a"}, {"return_url": "https://app.example.com/b"}),
]


@pytest.mark.parametrize("method,path,first,other", ADMIN_ROUTES, ids=[f"{m} {p}" for m, p, _, _ in ADMIN_ROUTES])
def test_admin_route_same_key_other_body_is_409_and_changes_nothing(admin, sql, new_org, method, path, first, other):
    org = new_org()
    url = path.format(org=org)
    headers = key()
    answer = admin.request(method, url, json=first(org), headers=headers)
    assert answer.status_code < 300, answer.text
    before = footprint(sql, org)
    conflict = admin.request(method, url, json=other(org), headers=headers)
    assert conflict.status_code == 409 and conflict.json()["error"]["code"] == "idempotency_conflict", conflict.text
    assert footprint(sql, org) == before
    again = admin.request(method, url, json=first(org), headers=headers)
    assert (again.status_code, again.content) == (answer.status_code, answer.content)


@pytest.mark.parametrize("path,first,other", SELF_SERVE_ROUTES, ids=[p for p, _, _ in SELF_SERVE_ROUTES])
def test_self_serve_same_key_other_body_is_409_before_stripe(service, admin, new_org, path, first, other):
    org = new_org()
    url = path.format(org=org)
    headers = key()
    with org_client(service, mint(admin, org)) as customer:
        answer = customer.post(url, json=first, headers=headers)
        assert answer.status_code == 200, answer.text
        before = stripe_writes(service)
        conflict = customer.post(url, json=other, headers=headers)
        assert conflict.status_code == 409 and conflict.json()["error"]["code"] == "idempotency_conflict", conflict.text
        assert stripe_writes(service) == before  # nothing reached Stripe
        again = customer.post(url, json=first, headers=headers)
    assert again.json() == answer.json()


def test_keys_are_per_caller_and_a_refused_request_does_not_burn_its_key(service, admin, new_org):
    org, other_org = new_org(), new_org()
    headers = key()
    with org_client(service, mint(admin, org)) as first, org_client(service, mint(admin, other_org)) as second:
        mine = first.post(f"/v1/orgs/{org}/checkout/setup", json=URLS, headers=headers)
        # Another org's caller using the same key is not told anything about the first one's.
        theirs = second.post(f"/v1/orgs/{other_org}/checkout/topup", json={"amount_micros": 10_000_000, **URLS},
                             headers=headers)
    assert mine.status_code == 200 and theirs.status_code == 200, (mine.text, theirs.text)
    refused_key = key()
    refused = admin.post(f"/v1/orgs/{org}/credits", json={"kind": "grant", "amount_micros": 5,
                                                          "expires_at": "2001-01-01T00:00:00Z"}, headers=refused_key)
    assert refused.status_code == 422
    fixed = admin.post(f"/v1/orgs/{org}/credits", json={"kind": "grant", "amount_micros": 5}, headers=refused_key)
    assert fixed.status_code == 201, fixed.text  # the refused request gave its key back


def test_a_claim_whose_request_never_answered_is_taken_over_by_the_same_request(admin, sql, new_org):
    """A process that died mid-request leaves its claim unanswered: while it is recent the key
    is in progress; once it is old enough to be abandoned the same request runs again, and
    another body is still a conflict."""
    org = new_org()
    path = f"/v1/orgs/{org}/credits"
    body = json.dumps({"kind": "grant", "amount_micros": 4_000}).encode()
    digest = hashlib.sha256(f"POST {path}\n".encode() + body).hexdigest()
    recent, stale = key()["Idempotency-Key"], key()["Idempotency-Key"]
    for claim, age_s in ((recent, 1), (stale, ABANDONED_AFTER_S + 5)):
        sql.val("INSERT INTO http_idempotency (scope, key, request_hash, status, body, created_at)"
                " VALUES ('admin', $1, $2, 0, '', now() - make_interval(secs => $3)) RETURNING 1", claim, digest, age_s)
    busy = admin.post(path, content=body, headers={"Idempotency-Key": recent})
    assert busy.status_code == 409 and busy.json()["error"]["code"] == "idempotency_in_progress"
    other = admin.post(path, json={"kind": "grant", "amount_micros": 5_000}, headers={"Idempotency-Key": stale})
    assert other.status_code == 409 and other.json()["error"]["code"] == "idempotency_conflict"
    taken = admin.post(path, content=body, headers={"Idempotency-Key": stale})
    assert taken.status_code == 201, taken.text
    assert admin.post(path, content=body, headers={"Idempotency-Key": stale}).content == taken.content
