"""The parity job: memory against the journal, with a drift injected into Postgres.

The service passivates idle orgs after a second, and parity only checks orgs in memory: each
round touches the orgs (a state read loads them and keeps them there) right before the run, and
is kept only if both were still in memory after it and nothing entered or left memory during
it. Then every org in memory was checked, and the report must say so: a round proves
something only if both orgs were checked.
"""

from __future__ import annotations

import msgspec
import ray

from actors.jobs import JOBS_NAME
from actors.org import OrgSnapshot
from actors.placement import NAMESPACE, shard_name
from tests.helpers import wait_for

US = 1_000_000
WAIT_S = 60


def test_parity_finds_an_org_whose_memory_and_journal_differ(service, admin, compute, sql, org_id_on, new_org):
    clean, drifted = new_org(org_id=org_id_on(0, "clean")), new_org(org_id=org_id_on(1, "drifted"))
    shard_of = {clean: 0, drifted: 1}
    for org in (clean, drifted):
        assert admin.post(f"/v1/orgs/{org}/credits", json={"kind": "grant", "amount_micros": US}).status_code == 201
    jobs = ray.get_actor(JOBS_NAME, namespace=NAMESPACE)
    shards = [ray.get_actor(shard_name(k), namespace=NAMESPACE) for k in range(service.settings.shards)]

    def touch() -> None:  # a state read is answered by the shard (a gate check, by the ingress's views)
        for org in (clean, drifted):
            assert admin.get(f"/v1/orgs/{org}").status_code == 200

    def in_memory() -> bool:
        return all(ray.get(shards[shard_of[org]].loaded.remote([org])) == [True] for org in (clean, drifted))

    def loaded_counts() -> list[int]:
        return [ray.get(shard.stats.remote())["loaded_orgs"] for shard in shards]

    def parity_round(before_run=lambda: True) -> tuple[dict, list[int]]:
        """A parity run with both orgs in memory throughout; its report and the orgs in memory."""
        def attempt():
            touch()
            if not before_run():
                return None
            counts = loaded_counts()
            report = ray.get(jobs.parity.remote())
            if report is None or not in_memory() or loaded_counts() != counts:
                return None  # another runner had the lock, or memory changed meanwhile: again
            return report, counts

        return wait_for("a parity run with both orgs in memory", attempt, WAIT_S)

    def assert_both_checked(report: dict, counts: list[int]) -> None:
        for org, shard in shard_of.items():
            checked = report["shards"][shard]["checked"]
            assert checked >= 1 and checked == counts[shard], (
                f"shard {shard} had {counts[shard]} orgs in memory, {org} among them, "
                f"but parity checked {checked}: {report}")
        assert report["checked"] == sum(r["checked"] for r in report["shards"].values()), report

    # Both orgs compacted to a snapshot first: no later snapshot of memory can undo the injection.
    wait_for("both orgs' journals to be compacted", lambda: sql.val(
        "SELECT count(*) FROM org_journal WHERE org_id = ANY($1)", [clean, drifted]) == 0, WAIT_S)

    report, counts = parity_round()
    assert_both_checked(report, counts)
    assert clean not in report["drift"] and drifted not in report["drift"], report

    def inject() -> bool:
        """The drifted org's stored snapshot says one micro-USD more than memory holds."""
        row = sql.fetch("SELECT seq, state FROM org_snapshots WHERE org_id = $1", drifted)[0]
        snap = msgspec.msgpack.decode(row["state"], type=OrgSnapshot)
        snap.grants[0].remaining_micros += 1
        sql.val("UPDATE org_snapshots SET state = $2 WHERE org_id = $1 RETURNING 1", drifted,
                msgspec.msgpack.encode(snap))
        return in_memory()  # memory was loaded before the injection: a reload would carry the drift

    report, counts = parity_round(before_run=inject)
    assert_both_checked(report, counts)
    assert drifted in report["drift"] and clean not in report["drift"], report
    assert drifted in report["shards"][1]["drift"], report
    assert ray.get(jobs.ready.remote())["runs"]["parity_drift"] >= 1
