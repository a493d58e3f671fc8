"""Usage parity against the platform's own numbers (issue 22 part 3; docs/operations/parity.md):
the platform posts its usage per org and UTC hour, metergate compares it with the ticks it
metered and reports each org-hour, through the API, the CLI and a metric. Real service: ticks
go through POST /v1/usage and the shards' group commit into usage_rollups.

The expected numbers are computed here from the ticks sent (memory_mb x duration_ms, ...),
never read back from metergate."""

from __future__ import annotations

import json
import re
import uuid

import httpx
import pytest

from actors.timeutil import rfc3339_to_us, us_to_rfc3339
from tests.helpers import wait_for
from tests.test_cli import cli, ok, ok_json, one_error_line

HOUR_US = 3_600_000_000
MINUTE_US = 60_000_000
GAUGE = re.compile(r'^(ray_metergate_usage_parity_(?:outside_tolerance|org_hours))\{([^}]*)\}\s+(\S+)$', re.M)


def whole_hours_ago(admin, hours: int) -> int:
    """The start of the UTC hour `hours` before the service's current one (its test clock)."""
    now_us = admin.get("/v1/test-clock").json()["now_us"]
    return now_us // HOUR_US * HOUR_US - hours * HOUR_US


def tick(org_id: str, started_us: int, duration_ms: int, memory_mb: int, cpu_count: int, disk_mb: int = 0,
         units: dict | None = None, lease_id: str = "sbx_1") -> dict:
    body = {"tick_id": f"pu-{uuid.uuid4().hex}", "org_id": org_id, "lease_id": lease_id,
            "started_at": us_to_rfc3339(started_us), "duration_ms": duration_ms, "memory_mb": memory_mb,
            "cpu_count": cpu_count, "disk_mb": disk_mb}
    return {**body, "units": units} if units else body


def meter(compute, ticks: list[dict]) -> None:
    answer = compute.post("/v1/usage", json={"ticks": ticks})
    assert answer.json() == {"accepted": len(ticks), "duplicates": 0, "rejected": []}, answer.text


def expected(ticks: list[dict]) -> dict[tuple[str, str], dict]:
    """What the platform would post for these ticks: per org and the hour each tick started in."""
    hours: dict[tuple[str, str], dict] = {}
    for t in ticks:
        started_us = rfc3339_to_us(t["started_at"])
        key = (t["org_id"], us_to_rfc3339(started_us // HOUR_US * HOUR_US))
        row = hours.setdefault(key, {"org_id": key[0], "hour": key[1], "memory_mb_ms": 0, "cpu_ms": 0,
                                     "disk_mb_ms": 0, "units": {}})
        row["memory_mb_ms"] += t["memory_mb"] * t["duration_ms"]
        row["cpu_ms"] += t["cpu_count"] * t["duration_ms"]
        row["disk_mb_ms"] += t["disk_mb"] * t["duration_ms"]
        for name, count in (t.get("units") or {}).items():
            row["units"][name] = row["units"].get(name, 0) + count
    return hours


def report(admin, from_us: int, to_us: int, org_id: str | None, **params) -> dict:
    params = {"from": us_to_rfc3339(from_us), "to": us_to_rfc3339(to_us), **params}
    answer = admin.get("/v1/parity/usage", params=params if org_id is None else {**params, "org_id": org_id})
    assert answer.status_code == 200, answer.text
    return answer.json()


def same(ours: int) -> dict:
    return {"ours": ours, "theirs": ours, "difference": 0, "ratio": "1.000000", "within_tolerance": True}


def test_ticks_that_match_the_posted_usage_report_no_difference_in_any_form(admin, compute, new_org):
    org_a, org_b = new_org(), new_org()
    h1 = whole_hours_ago(admin, 3)
    h2 = h1 + HOUR_US
    ticks = [tick(org_a, h1 + 5 * MINUTE_US, 3_600_000, 4096, 2),  # an hour-long tick: all of it in h1
             tick(org_a, h1 + 59 * MINUTE_US, 60_000, 512, 1, 1024, lease_id="sbx_2"),
             tick(org_a, h2, 1_500, 300, 3),
             tick(org_b, h1 + 30 * MINUTE_US, 90_000, 2048, 4, 10, {"ingest_bytes": 12_345})]
    meter(compute, ticks)
    posted = expected(ticks)
    assert len(posted) == 3
    a1, a2, b1 = (posted[(org, us_to_rfc3339(hour))] for org, hour in ((org_a, h1), (org_a, h2), (org_b, h1)))
    # org_a's h2 in GiB-s and vCPU-s, as decimal strings: 300 MB x 1.5 s = 0.439453125 GiB-s exactly.
    a2_decimal = {"org_id": org_a, "hour": int(h2 // 1_000_000), "memory_gib_s": "0.439453125",
                  "cpu_vcpu_s": "4.5", "disk_gib_s": "0"}
    assert a2 == {**a2, "memory_mb_ms": 450_000, "cpu_ms": 4_500, "disk_mb_ms": 0}
    stored = admin.post("/v1/parity/usage", json={"usage": [a1, a2_decimal, b1]})
    assert stored.status_code == 200, stored.text
    assert stored.json() == {"stored": 3, "created": 3, "replaced": 0, "replaced_org_hours": []}

    for org_id, rows in ((org_a, [a1, a2]), (org_b, [b1])):
        found = report(admin, h1, h2 + HOUR_US, org_id)
        assert (found["checked"], found["outside_tolerance"], found["only_metergate"], found["only_platform"]) == \
            (len(rows), 0, 0, 0)
        assert found["org_hours"] == [
            {"org_id": org_id, "hour": row["hour"], "only": None, "memory_mb_ms": same(row["memory_mb_ms"]),
             "cpu_ms": same(row["cpu_ms"]), "disk_mb_ms": same(row["disk_mb_ms"]),
             "units": {name: same(count) for name, count in row["units"].items()}, "within_tolerance": True}
            for row in rows]
    # A zero tolerance too: equal is equal.
    assert report(admin, h1, h2 + HOUR_US, org_b, tolerance_ppm=0)["outside_tolerance"] == 0


def test_a_one_percent_shortfall_is_reported_for_that_org_and_hour_only(admin, compute, new_org):
    org_a, org_b = new_org(), new_org()
    h1 = whole_hours_ago(admin, 5)
    h2 = h1 + HOUR_US
    ticks = [tick(org, hour + 10 * MINUTE_US, 600_000, 3960, 2) for org in (org_a, org_b) for hour in (h1, h2)]
    meter(compute, ticks)
    posted = expected(ticks)
    short = posted[(org_b, us_to_rfc3339(h2))]
    short["memory_mb_ms"] = 4000 * 600_000  # the platform saw 4,000 MB: metergate metered 99 % of it
    assert admin.post("/v1/parity/usage", json={"usage": list(posted.values())}).status_code == 200

    assert report(admin, h1, h2 + HOUR_US, org_a)["outside_tolerance"] == 0
    found = report(admin, h1, h2 + HOUR_US, org_b)
    assert (found["checked"], found["outside_tolerance"]) == (2, 1)
    first, second = found["org_hours"]
    assert first["hour"] == us_to_rfc3339(h1) and first["within_tolerance"] is True
    assert second["hour"] == us_to_rfc3339(h2) and second["within_tolerance"] is False
    assert second["memory_mb_ms"] == {"ours": 3960 * 600_000, "theirs": 4000 * 600_000,
                                      "difference": -40 * 600_000, "ratio": "0.990000", "within_tolerance": False}
    assert second["cpu_ms"] == same(2 * 600_000) and second["disk_mb_ms"] == same(0)

    # The tolerance is decided in integers: 1 % exactly is within 10,000 ppm, not within 9,999.
    assert report(admin, h1, h2 + HOUR_US, org_b, tolerance_ppm=10_000)["outside_tolerance"] == 0
    assert report(admin, h1, h2 + HOUR_US, org_b, tolerance_ppm=9_999)["outside_tolerance"] == 1
    # Both orgs in one report (other tests' orgs may share these hours): only org_b's h2 is out.
    everyone = report(admin, h1, h2 + HOUR_US, None)
    mine = [(r["org_id"], r["hour"], r["within_tolerance"]) for r in everyone["org_hours"]
            if r["org_id"] in (org_a, org_b)]
    assert sorted(mine) == sorted([(org_a, us_to_rfc3339(h1), True), (org_a, us_to_rfc3339(h2), True),
                                   (org_b, us_to_rfc3339(h1), True), (org_b, us_to_rfc3339(h2), False)])


def test_hours_only_one_side_has_are_reported_and_a_repost_replaces_and_says_so(admin, compute, sql, new_org):
    org = new_org()
    h1 = whole_hours_ago(admin, 7)
    h2 = h1 + HOUR_US
    meter(compute, [tick(org, h1 + MINUTE_US, 1_000, 100, 1)])
    first = {"org_id": org, "hour": us_to_rfc3339(h2), "memory_mb_ms": 7, "units": {"ingest_bytes": 3}}
    assert admin.post("/v1/parity/usage", json={"usage": [first]}).json()["created"] == 1

    found = report(admin, h1, h2 + HOUR_US, org)
    assert (found["checked"], found["outside_tolerance"], found["only_metergate"], found["only_platform"]) == \
        (2, 2, 1, 1)
    ours_only, theirs_only = found["org_hours"]
    assert ours_only["only"] == "metergate" and ours_only["memory_mb_ms"] == {
        "ours": 100_000, "theirs": 0, "difference": 100_000, "ratio": None, "within_tolerance": False}
    assert theirs_only["only"] == "platform" and theirs_only["units"] == {"ingest_bytes": {
        "ours": 0, "theirs": 3, "difference": -3, "ratio": "0.000000", "within_tolerance": False}}

    again = admin.post("/v1/parity/usage", json={"usage": [{"org_id": org, "hour": us_to_rfc3339(h1),
                                                             "memory_mb_ms": 100_000, "cpu_ms": 1_000},
                                                            {**first, "memory_mb_ms": 0, "units": {}}]})
    assert again.json() == {"stored": 2, "created": 1, "replaced": 1,
                            "replaced_org_hours": [{"org_id": org, "hour": us_to_rfc3339(h2)}]}
    assert sql.val("SELECT count(*) FROM usage_parity_posted WHERE org_id = $1", org) == 2
    found = report(admin, h1, h2 + HOUR_US, org)
    # h2: nothing metered and, now, nothing posted: 0 against 0 is within.
    assert (found["outside_tolerance"], found["only_metergate"], found["only_platform"]) == (0, 0, 1)


GOOD = {"org_id": "org_parity_x", "hour": "2026-01-01T10:00:00Z", "memory_mb_ms": 1}


@pytest.mark.parametrize("usage, field", [
    ([{**GOOD, "hour": "2026-01-01T10:30:00Z"}], "usage.0.hour"),
    ([{**GOOD, "hour": "yesterday"}], "usage.0.hour"),
    ([GOOD, {**GOOD, "memory_mb_ms": -1}], "usage.1.memory_mb_ms"),
    ([{**GOOD, "memory_gib_s": "1"}], "usage.0.memory_gib_s"),  # both forms of one quantity
    ([{**GOOD, "memory_mb_ms": None, "disk_gib_s": "0.0001"}], "usage.0.disk_gib_s"),  # not whole MB·ms
    ([{**GOOD, "cpu_vcpu_s": "1e3"}], "usage.0.cpu_vcpu_s"),
    ([{**GOOD, "cpu_ms": 1.5}], "usage.0.cpu_ms"),
    ([GOOD, {**GOOD, "hour": 1767261600}], "usage.1.hour"),  # the same org and hour twice
    ([{**GOOD, "org_id": "no spaces"}], "usage.0.org_id"),
    ([{**GOOD, "units": {"ingest_bytes": 10**19}}], "usage.0.units.ingest_bytes"),
    ([{**GOOD, "gpu_ms": 1}], "usage.0.gpu_ms"),
    ([], "usage"),
    ([GOOD] * 201, "usage"),
])
def test_a_bad_post_is_a_422_naming_the_field_and_stores_nothing(admin, sql, usage, field):
    before = sql.val("SELECT count(*) FROM usage_parity_posted WHERE org_id = 'org_parity_x'")
    answer = admin.post("/v1/parity/usage", json={"usage": usage})
    assert answer.status_code == 422, answer.text
    assert answer.json()["error"]["code"] == "invalid_request"
    assert answer.json()["error"]["field"] == field, answer.json()
    assert sql.val("SELECT count(*) FROM usage_parity_posted WHERE org_id = 'org_parity_x'") == before


def test_bad_reports_and_callers_are_refused(admin, compute):
    hour = "2026-01-01T10:00:00Z"
    for params, field in (({"from": hour}, "to"), ({"from": "2026-01-01T10:00:01Z", "to": hour}, "from"),
                          ({"from": hour, "to": hour}, "to"), ({"from": hour, "to": "2026-02-01T11:00:00Z"}, "to"),
                          ({"from": hour, "to": "nope"}, "to"),
                          ({"from": hour, "to": "2026-01-01T11:00:00Z", "tolerance_ppm": 1_000_001}, "tolerance_ppm"),
                          ({"from": hour, "to": "2026-01-01T11:00:00Z", "org_id": "a b"}, "org_id")):
        answer = admin.get("/v1/parity/usage", params=params)
        assert answer.status_code == 422, (params, answer.text)
        assert answer.json()["error"]["field"] == field, (params, answer.json())
    assert admin.post("/v1/parity/usage", content=b'{"usage": [').status_code == 400
    assert compute.post("/v1/parity/usage", json={"usage": [GOOD]}).status_code == 403  # the service token
    assert compute.get("/v1/parity/usage", params={"from": hour, "to": "2026-01-01T11:00:00Z"}).status_code == 403


def test_the_last_report_sets_the_gauges_of_org_hours_and_those_outside(admin, compute, service, new_org):
    org = new_org()
    h1 = whole_hours_ago(admin, 12)
    ticks = [tick(org, h1 + k * HOUR_US, 1_000, 10 + k, 1) for k in range(3)]
    meter(compute, ticks)
    posted = list(expected(ticks).values())
    posted[0]["cpu_ms"] += 1
    posted[2]["cpu_ms"] += 1
    admin.post("/v1/parity/usage", json={"usage": posted}).raise_for_status()
    assert report(admin, h1, h1 + 3 * HOUR_US, org)["outside_tolerance"] == 2
    # The gauges are the last report over every org (one org's report leaves them alone:
    # tests/test_parity_usage_bounds.py); other tests' orgs may share these hours.
    every = report(admin, h1, h1 + 3 * HOUR_US, None)
    assert every["checked"] >= 3 and every["outside_tolerance"] >= 2
    want = {"ray_metergate_usage_parity_org_hours": float(every["checked"]),
            "ray_metergate_usage_parity_outside_tolerance": float(every["outside_tolerance"])}

    def gauges_of_one_replica():
        text = httpx.get(service.metrics_url, timeout=10).text
        by_worker: dict[str, dict[str, float]] = {}
        for name, labels, value in GAUGE.findall(text):
            worker = re.search(r'WorkerId="([^"]*)"', labels)
            by_worker.setdefault(worker.group(1) if worker else "", {})[name] = float(value)
        return [g for g in by_worker.values() if g == want]

    wait_for("the usage parity gauges of the last report", gauges_of_one_replica, 60)


def test_the_cli_posts_a_file_and_reports_exiting_3_when_an_org_hour_is_outside(admin, compute, service, new_org,
                                                                                tmp_path):
    org = new_org()
    h1 = whole_hours_ago(admin, 9)
    ticks = [tick(org, h1 + k * HOUR_US + MINUTE_US, 60_000, 1024, 1) for k in range(2)]
    meter(compute, ticks)
    lines = list(expected(ticks).values())
    file = tmp_path / "platform.jsonl"
    file.write_text("\n".join(json.dumps(line) for line in lines) + "\n\n")
    posted = ok(cli(service, "parity", "usage", "post", str(file)))
    assert f"posted 2 org-hours from {file}: 2 new, 0 replaced" in posted
    window = ["--from", us_to_rfc3339(h1), "--to", str((h1 + 2 * HOUR_US) // 1_000_000), "--org", org]
    shown = ok_json(cli(service, "parity", "usage", *window, "--json"))
    assert shown == report(admin, h1, h1 + 2 * HOUR_US, org) and shown["outside_tolerance"] == 0
    assert "2 org-hours compared, 0 outside 100 ppm" in ok(cli(service, "parity", "usage", *window))

    lines[1]["memory_mb_ms"] = lines[1]["memory_mb_ms"] * 100 // 99  # the platform saw ~1 % more
    file.write_text("\n".join(json.dumps(line) for line in lines))
    assert json.loads(ok(cli(service, "parity", "usage", "post", str(file), "--json")))["replaced"] == 2
    outside = cli(service, "parity", "usage", *window)
    assert outside.returncode == 3 and outside.stderr == "", (outside.stdout, outside.stderr)
    assert "OUTSIDE" in outside.stdout and "0.990000" in outside.stdout and "1 outside 100 ppm" in outside.stdout
    assert cli(service, "parity", "usage", *window, "--tolerance-ppm", "20000").returncode == 0

    file.write_text(json.dumps(lines[0]) + "\nnot json\n")
    assert one_error_line(cli(service, "parity", "usage", "post", str(file))) == \
        f"error: {file}:2: not a JSON object; nothing was posted"
    file.write_text(json.dumps(lines[0]) + "\n" + json.dumps({**lines[1], "hour": "2026-01-01T10:05:00Z"}) + "\n")
    refused = one_error_line(cli(service, "parity", "usage", "post", str(file)))
    assert refused.startswith("error: invalid_request: line 2: hour: must be the start of a UTC hour"), refused
    assert one_error_line(cli(service, "parity", "usage", "--org", org), exit_code=2) == \
        "error: --from and --to are required for a report (see metergate parity usage --help)"
