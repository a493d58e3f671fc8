"""GET /v1/orgs/{org_id}/months: free credit accounting per month, recomputed from scratch.

Every expected number is worked out by hand or read from Postgres with SQL; none comes from
the code under test.
"""

from __future__ import annotations

from datetime import timezone

import pytest

from actors.timeutil import US_PER_S, rfc3339_to_us, us_to_rfc3339
from actors.months import summarize
from tests.helpers import HOUR_TICK_MICROS, SIGNUP_MICROS, advance, clock_us, hour_tick

US = 1_000_000
OCT = rfc3339_to_us("2026-10-10T00:00:00Z")
NOV = rfc3339_to_us("2026-11-10T00:00:00Z")
MS_PER_HOUR = 3_600_000


def assert_consistent(months: list[dict]) -> None:
    """What holds for any month, whatever the ledger."""
    for month in months:
        assert month["spend_micros"] == (month["credits_applied_micros"] + month["imported_applied_micros"]
                                         + month["billable_micros"]), month
        assert min(month["credits_applied_micros"], month["imported_applied_micros"], month["billable_micros"]) >= 0
        assert month["usage_hours"] == round(month["usage_ms"] / MS_PER_HOUR, 3), month
    assert [m["month"] for m in months] == sorted({m["month"] for m in months})  # one row a month, in order


def test_free_credit_is_applied_first_then_the_rest_is_billable():
    entries = [("signup_grant", 5 * US, "gr_1", OCT), ("topup", 10 * US, "gr_2", OCT),
               ("usage", -3 * US, None, OCT + 1), ("grant", 1 * US, "gr_3", OCT + 2),
               ("usage", -4 * US, None, NOV), ("expiration", -1 * US, "gr_3", NOV + 1),
               ("refund", -2 * US, None, NOV + 2), ("usage", -7 * US, None, NOV + 3)]
    months = summarize(list(entries), {"2026-10": 7_200_000}, NOV + 4)
    assert months == [
        {"month": "2026-10", "spend_micros": 3 * US, "credits_applied_micros": 3 * US,
         "imported_applied_micros": 0, "billable_micros": 0,
         "usage_hours": 2.0, "usage_ms": 7_200_000, "status": "closed"},
        # 2 USD of signup left + the 1 USD grant cover 3 of the 4; the grant cannot also expire.
        # Then the refund takes 2 of the 9 paid; 7 USD of usage: all billable, paid from credit.
        {"month": "2026-11", "spend_micros": 11 * US, "credits_applied_micros": 3 * US,
         "imported_applied_micros": 0, "billable_micros": 8 * US, "usage_hours": 0.0, "usage_ms": 0, "status": "open"},
    ]
    assert_consistent(months)
    # Free credit granted: 5 + 1 USD, of which none expired unused: at most 6 USD can be applied.
    assert sum(m["credits_applied_micros"] for m in months) <= 6 * US


def test_a_grant_covers_only_usage_after_it_and_an_expired_grant_covers_nothing():
    entries = [("topup", 10 * US, "gr_1", OCT),
               ("usage", -2 * US, None, OCT + 1),        # no free credit yet: 2 billable
               ("grant", 3 * US, "gr_2", OCT + 2),
               ("usage", -1 * US, None, OCT + 3),        # 1 from the grant
               ("expiration", -2 * US, "gr_2", OCT + 4),  # the grant's unused 2 lapse
               ("usage", -4 * US, None, OCT + 5)]        # no free credit left: 4 billable
    months = summarize(entries, {}, OCT + 6)
    assert months == [{"month": "2026-10", "spend_micros": 7 * US, "credits_applied_micros": 1 * US,
                       "imported_applied_micros": 0, "billable_micros": 6 * US, "usage_hours": 0.0, "usage_ms": 0, "status": "open"}]
    assert_consistent(months)


def test_imported_credit_is_neither_free_credit_nor_money_paid_and_the_usage_it_covers_is_its_own_line():
    """Billing-rules 2.11: what an import brought over (here a 2 USD promotional grant that lapses
    in November and 6 USD of balance) covers usage after free credit, as its own line; usage
    past it is billable; its expiry and an imported debt take from it."""
    entries = [("signup_grant", 1 * US, "gr_1", OCT), ("import", 2 * US, "gr_2", OCT, 0, NOV + 1),
               ("import", 6 * US, "gr_3", OCT, 0, None), ("usage", -4 * US, None, OCT + 1),
               ("topup", 10 * US, "gr_4", OCT + 2), ("expiration", -1 * US, "gr_2", NOV + 1, 0, NOV + 1),
               ("usage", -5 * US, None, NOV + 2)]
    months = summarize(entries, {}, NOV + 3)
    assert [(m["month"], m["spend_micros"], m["credits_applied_micros"], m["imported_applied_micros"],
             m["billable_micros"]) for m in months] == [
        ("2026-10", 4 * US, 1 * US, 3 * US, 0),  # the signup credit first, then 3 of the 8 imported
        ("2026-11", 5 * US, 0, 4 * US, 1 * US)]  # 5 imported were left; the grant's 1 lapsed: 4, then paid
    assert_consistent(months)
    # An imported debt takes paid credit first, then imported; never counted as money paid.
    debt = summarize([("import", 3 * US, "gr_1", OCT, 0, None), ("import", -1 * US, None, OCT),
                      ("usage", -3 * US, None, OCT + 1)], {}, OCT + 2)
    assert (debt[0]["imported_applied_micros"], debt[0]["billable_micros"]) == (2 * US, 1 * US)


@pytest.mark.time_travel  # moves the shared clock a minute at a time: one usage ledger row per minute
def test_months_over_http_match_the_ledger_read_with_sql(admin, compute, sql, new_org):
    org = new_org()  # 5 USD of signup credit: free
    paid = admin.post(f"/v1/orgs/{org}/credits", json={"kind": "adjustment", "amount_micros": 10 * US})
    assert paid.status_code == 201, paid.text
    compute.post("/v1/leases", json={"org_id": org, "lease_id": "m1", "ttl_s": 86_400})

    def usage(prefix: str, hours: int) -> None:
        at = us_to_rfc3339(clock_us(admin) // US_PER_S * US_PER_S)  # service time: the month the ledger sees
        ticks = [hour_tick(org, f"{prefix}_{n}", "m1") | {"started_at": at} for n in range(hours)]
        assert compute.post("/v1/usage", json={"ticks": ticks}).json()["accepted"] == hours
        advance(admin, 61)  # the next usage lands in another minute: another ledger row

    usage("a", 20)  # 3.312 USD: all from the signup credit
    usage("b", 20)  # 3.312 USD: 1.688 from what is left of it, 1.624 billable
    assert admin.post(f"/v1/orgs/{org}/credits", json={"kind": "grant", "amount_micros": 1 * US}).status_code == 201
    usage("c", 5)   # 0.828 USD: from the 1 USD grant, which came after the first two

    response = admin.get(f"/v1/orgs/{org}/months")
    assert response.status_code == 200, response.text
    assert admin.get(f"/v1/orgs/{org}/months").json() == response.json()  # recomputed, the same
    months = response.json()["months"]
    assert_consistent(months)

    # Independently of the code under test: the ledger as Postgres holds it.
    rows = sql.fetch("SELECT kind, amount_micros, created_at FROM ledger WHERE org_id = $1"
                     " ORDER BY created_at, entry_id", org)
    assert [r["kind"] for r in rows] == ["signup_grant", "adjustment", "usage", "usage", "grant", "usage"]
    assert [r["amount_micros"] for r in rows] == [
        SIGNUP_MICROS, 10 * US, -20 * HOUR_TICK_MICROS, -20 * HOUR_TICK_MICROS, 1 * US, -5 * HOUR_TICK_MICROS]

    def month(row) -> str:
        return row["created_at"].astimezone(timezone.utc).strftime("%Y-%m")

    spend_by_month: dict[str, int] = {}
    for row in rows:
        if row["kind"] == "usage":
            spend_by_month[month(row)] = spend_by_month.get(month(row), 0) - row["amount_micros"]
    assert {m["month"]: m["spend_micros"] for m in months if m["spend_micros"]} == spend_by_month
    assert {month(r) for r in rows} <= {m["month"] for m in months}
    ticks_ms = sql.val("SELECT sum(duration_ms)::int8 FROM usage_rollups WHERE org_id = $1", org)

    # Worked out by hand: 45 lease-hours; the 5 USD signup credit covers the first 5 USD of the
    # 40 hours before the grant, the 1 USD grant all of the 5 hours after it.
    totals = {key: sum(m[key] for m in months) for key in
              ("spend_micros", "credits_applied_micros", "billable_micros", "usage_ms")}
    assert totals == {"spend_micros": 45 * HOUR_TICK_MICROS,
                      "credits_applied_micros": SIGNUP_MICROS + 5 * HOUR_TICK_MICROS,
                      "billable_micros": 40 * HOUR_TICK_MICROS - SIGNUP_MICROS,
                      "usage_ms": 45 * MS_PER_HOUR}
    assert ticks_ms == 45 * MS_PER_HOUR
    free_granted = sum(r["amount_micros"] for r in rows if r["kind"] in ("signup_grant", "grant"))
    assert totals["credits_applied_micros"] <= free_granted

    current = us_to_rfc3339(clock_us(admin))[:7]
    assert [m["status"] for m in months] == ["open" if m["month"] >= current else "closed" for m in months]
    assert admin.get("/v1/orgs/ghost_months/months").status_code == 404


def test_months_kept_with_their_carry_then_the_rest_equal_all_months_from_scratch():
    """The months a read finds over are kept with what they hand on; the next read goes on
    from there (the current month only, not the whole history), and must find what a read of
    everything finds: an expiring grant credited before the cut still lapses from its pool."""
    from actors.months import Carry, month_of, summarize_months

    DEC = rfc3339_to_us("2026-12-10T00:00:00Z")
    entries = [("signup_grant", 5 * US, "gr_1", OCT, 0, None), ("grant", 4 * US, "gr_2", OCT + 1, 0, DEC),
               ("topup", 10 * US, "gr_3", OCT + 2, 0, None), ("usage", -3 * US, None, OCT + 3, 0, None),
               ("usage", -2 * US, None, NOV, 0, None), ("refund", -1 * US, None, NOV + 1, 0, None),
               ("expiration", -2 * US, "gr_2", DEC, 0, DEC), ("usage", -6 * US, None, DEC + 1, 0, None),
               ("usage", -1 * US, None, DEC + 2, 500, None)]
    usage_ms = {"2026-10": 3_600_000, "2026-12": 7_200_000}
    whole, _ = summarize_months(entries, usage_ms, DEC + 3)
    cut = rfc3339_to_us("2026-12-01T00:00:00Z")
    before, ends = summarize_months([e for e in entries if e[3] < cut], {"2026-10": 3_600_000}, DEC + 3)
    carry = Carry.from_json(ends["2026-11"].to_json())  # through JSON, as kept in Postgres
    after, _ = summarize_months([e for e in entries if e[3] >= cut], {"2026-12": 7_200_000}, DEC + 3, carry)
    assert before + after == whole
    assert [m["month"] for m in whole] == ["2026-10", "2026-11", "2026-12"] and month_of(DEC) == "2026-12"
    assert carry.pool_of == {"gr_2": "free"}  # only grants that may still expire are carried
    assert_consistent(whole)
