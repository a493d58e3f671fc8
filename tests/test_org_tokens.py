"""Org tokens: minted by admin, signed, expiring, scoped to one org; the billing page."""

from __future__ import annotations

import time

import httpx
import pytest

from serve_app.auth import OrgTokens
from serve_app.errors import ApiError
from tests.helpers import mint, org_client


def test_an_org_token_opens_its_own_billing_page_by_header_or_link(service, admin, new_org):
    org = new_org()
    admin.post(f"/v1/orgs/{org}/credits", json={"kind": "grant", "amount_micros": 2_500_000,
                                               "note": "<script>alert(1)</script>"})
    token = mint(admin, org)
    with org_client(service, token) as client:
        page = client.get(f"/billing/{org}")
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    assert "$7.50" in page.text  # 5.00 signup + 2.50 grant
    assert "&lt;script&gt;" in page.text and "<script>alert" not in page.text
    with httpx.Client(base_url=service.base_url, timeout=30, follow_redirects=True) as browser:
        page = browser.get(f"/billing/{org}", params={"token": token})  # a link: on to the page, token in a cookie
        assert page.status_code == 200 and page.url.path == f"/billing/{org}" and not page.url.query
        assert token not in page.text
    assert admin.get(f"/billing/{org}").status_code == 200


def test_an_org_token_of_org_a_gets_403_on_every_endpoint_of_org_b(service, admin, new_org):
    org_a, org_b = new_org(), new_org()
    token_a = mint(admin, org_a)
    b_before = admin.get(f"/v1/orgs/{org_b}").json()
    endpoints = [
        ("GET", f"/billing/{org_b}", None),
        ("GET", f"/v1/orgs/{org_b}", None),
        ("POST", f"/v1/orgs/{org_b}/credits", {"kind": "grant", "amount_micros": 1}),
        ("GET", f"/v1/orgs/{org_b}/ledger", None),
        ("GET", f"/v1/orgs/{org_b}/usage", None),
        ("PUT", f"/v1/orgs/{org_b}/plan", {"plan_id": "payg"}),
        ("PUT", f"/v1/orgs/{org_b}/tier", {"tier": "pro"}),
        ("PUT", f"/v1/orgs/{org_b}/limits", {"max_disk_mb": 1}),
        ("POST", f"/v1/orgs/{org_b}/halt", None),
        ("POST", f"/v1/orgs/{org_b}/resume", None),
        ("POST", f"/v1/orgs/{org_b}/tokens", {"ttl_s": 3600}),
        ("POST", "/v1/gate", {"org_id": org_b, "action": "create"}),
        ("POST", "/v1/leases", {"org_id": org_b, "lease_id": "x"}),
        ("POST", f"/v1/leases/{org_b}/x/renew", None),
        ("DELETE", f"/v1/leases/{org_b}/x", None),
        ("POST", "/v1/usage", {"ticks": []}),
        ("POST", "/v1/orgs", {"org_id": org_b, "email": "b@example.com"}),
    ]
    with org_client(service, token_a) as client:
        for method, path, body in endpoints:
            response = client.request(method, path, json=body)
            assert response.status_code == 403, (method, path, response.text)
            assert response.json()["error"]["code"] == "forbidden"
    assert admin.get(f"/v1/orgs/{org_b}").json() == b_before


def test_forged_tampered_and_expired_org_tokens_are_401(service, admin, new_org):
    org = new_org()
    good = mint(admin, org)
    payload, signature = good[len("mgo_"):].split(".")
    tampered = "mgo_" + payload[:-2] + ("AA" if payload[-2:] != "AA" else "BB") + "." + signature
    forged, _ = OrgTokens("some-other-secret-of-32-characters!!").mint(org, int(time.time() * 1_000_000), 3600)
    expired, _ = OrgTokens(service.settings.org_token_secret).mint(org, int(time.time() - 7200) * 1_000_000, 3600)
    for token, code in ((tampered, "unauthorized"), (forged, "unauthorized"), (expired, "token_expired"),
                        ("mgo_nonsense", "unauthorized")):
        with org_client(service, token) as client:
            response = client.get(f"/billing/{org}")
        assert response.status_code == 401, (token, response.text)
        assert response.json()["error"]["code"] == code


def test_minting_needs_a_known_org_and_a_sane_ttl(admin):
    assert admin.post("/v1/orgs/nobody_here/tokens", json={"ttl_s": 3600}).status_code == 404
    assert admin.post("/v1/orgs/nobody_here/tokens", json={"ttl_s": 5}).status_code == 422


def test_org_token_expiry_and_signature_checks_without_a_server():
    tokens = OrgTokens("x" * 32)
    token, expires_s = tokens.mint("org_1", 1_800_000_000_000_000, 60)
    assert expires_s == 1_800_000_060
    assert (tokens.verify(token, 1_800_000_059).org, tokens.verify(token, 1_800_000_059).iat) == ("org_1", 1_800_000_000_000_000)
    with pytest.raises(ApiError) as caught:
        tokens.verify(token, 1_800_000_060)
    assert caught.value.code == "token_expired"
    with pytest.raises(ApiError):
        OrgTokens("y" * 32).verify(token, 1_800_000_000)
