"""GET /v1/orgs/{org_id}/months: free credit accounting per month, recomputed from scratch."""

from __future__ import annotations

from actors.timeutil import rfc3339_to_us
from serve_app.months import summarize
from tests.test_http_scenarios import HOUR_TICK_MICROS, SIGNUP_MICROS, hour_tick

US = 1_000_000
OCT = rfc3339_to_us("2026-10-10T00:00:00Z")
NOV = rfc3339_to_us("2026-11-10T00:00:00Z")


def test_free_credit_is_applied_first_then_the_rest_is_billable():
    entries = [("signup_grant", 5 * US, "gr_1", OCT), ("topup", 10 * US, "gr_2", OCT),
               ("usage", -3 * US, None, OCT + 1), ("grant", 1 * US, "gr_3", OCT + 2),
               ("usage", -4 * US, None, NOV), ("expiration", -1 * US, "gr_3", NOV + 1),
               ("refund", -2 * US, None, NOV + 2), ("usage", -7 * US, None, NOV + 3)]
    months = summarize(entries, {"2026-10": 7_200_000}, NOV + 4)
    assert months == [
        {"month": "2026-10", "spend_micros": 3 * US, "credits_applied_micros": 3 * US, "billable_micros": 0,
         "usage_hours": 2.0, "usage_ms": 7_200_000, "status": "closed"},
        # 2 USD of signup left + the 1 USD grant cover 3 of the 4; the grant cannot also expire.
        # Then the refund takes 2 of the 9 paid; 7 USD of usage: all billable, paid from credit.
        {"month": "2026-11", "spend_micros": 11 * US, "credits_applied_micros": 3 * US,
         "billable_micros": 8 * US, "usage_hours": 0.0, "usage_ms": 0, "status": "open"},
    ]
    assert summarize(entries, {"2026-10": 7_200_000}, NOV + 4) == months  # same rows, same numbers


def test_months_over_http_are_the_same_twice(admin, compute, new_org):
    org = new_org()
    assert admin.post(f"/v1/orgs/{org}/credits", json={"kind": "adjustment", "amount_micros": 10 * US}).status_code == 201
    compute.post("/v1/leases", json={"org_id": org, "lease_id": "m1", "ttl_s": 600})
    ticks = [hour_tick(org, f"m_{n}", "m1") for n in range(40)]  # 40 lease-hours, 6.624 USD
    assert compute.post("/v1/usage", json={"ticks": ticks}).json()["accepted"] == 40
    first = admin.get(f"/v1/orgs/{org}/months")
    assert first.status_code == 200, first.text
    assert admin.get(f"/v1/orgs/{org}/months").json() == first.json()
    (month,) = first.json()["months"]
    assert (month["spend_micros"], month["credits_applied_micros"], month["billable_micros"], month["usage_hours"],
            month["status"]) == (40 * HOUR_TICK_MICROS, SIGNUP_MICROS, 40 * HOUR_TICK_MICROS - SIGNUP_MICROS, 40.0, "open")
    assert admin.get("/v1/orgs/ghost_months/months").status_code == 404
