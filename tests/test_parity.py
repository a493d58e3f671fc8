"""The parity job: memory against the journal, with a drift injected into Postgres."""

from __future__ import annotations

import msgspec
import ray

from actors.jobs import JOBS_NAME
from actors.org import OrgSnapshot
from actors.placement import NAMESPACE

US = 1_000_000


def test_parity_finds_an_org_whose_memory_and_journal_differ(admin, compute, sql, new_org):
    clean, drifted = new_org(), new_org()
    for org in (clean, drifted):
        assert admin.post(f"/v1/orgs/{org}/credits", json={"kind": "grant", "amount_micros": US}).status_code == 201
    jobs = ray.get_actor(JOBS_NAME, namespace=NAMESPACE)
    for org in (clean, drifted):  # both in memory (a gate read keeps them there)
        compute.post("/v1/gate", json={"org_id": org, "action": "create"})
    report = ray.get(jobs.parity.remote())
    assert drifted not in report["drift"] and clean not in report["drift"]

    # Inject: the org's stored snapshot says one micro-USD more than memory holds.
    row = sql.fetch("SELECT seq, state FROM org_snapshots WHERE org_id = $1", drifted)[0]
    snap = msgspec.msgpack.decode(row["state"], type=OrgSnapshot)
    snap.grants[0].remaining_micros += 1
    sql.val("UPDATE org_snapshots SET state = $2 WHERE org_id = $1 RETURNING 1", drifted,
            msgspec.msgpack.encode(snap))
    for org in (clean, drifted):
        compute.post("/v1/gate", json={"org_id": org, "action": "create"})
    report = ray.get(jobs.parity.remote())
    assert drifted in report["drift"] and clean not in report["drift"]
    assert ray.get(jobs.ready.remote())["runs"]["parity_drift"] >= 1
