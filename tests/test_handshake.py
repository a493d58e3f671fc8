"""The version handshake: a part of another wire version is never talked to.

On the running test service, shard 1 is replaced (drained first, as an upgrade's stop-backend
does) by a shard that reports another wire version: METERGATE_TEST_WIRE_VERSION, read by the
shard at its start, as a shard of an older deploy would differ. The ingress must refuse to
route to it (503 `shard_version_mismatch`), a start that finds it running must stop with a
clear message, and once a shard of this version replaces it again nothing is lost.
"""

from __future__ import annotations

import asyncio
import uuid

import asyncpg
import pytest
import ray

from actors.placement import NAMESPACE, shard_name
from config.version import WIRE_VERSION, incompatibility, this_version
from serve_app import launch
from tests.helpers import Sql, assert_error, database_url_named, wait_for

SHARD = 1
OTHER_WIRE = WIRE_VERSION + 1


def _execute(url: str, statement: str) -> None:
    async def go() -> None:
        conn = await asyncpg.connect(url)
        try:
            await conn.execute(statement)
        finally:
            await conn.close()

    asyncio.run(go())


def _replace_shard(settings) -> None:
    """Drain shard SHARD (every org with a journal tail snapshots), stop it, and start one with
    `settings` in its place (what a start finds missing, it starts)."""
    handle = ray.get_actor(shard_name(SHARD), namespace=NAMESPACE)
    ray.get(handle.drain.remote(), timeout=60)
    ray.kill(handle, no_restart=True)

    def gone() -> bool:
        try:
            ray.get_actor(shard_name(SHARD), namespace=NAMESPACE)
        except ValueError:
            return True
        return False

    wait_for("the old shard to be gone", gone)
    try:
        launch.start_shards(settings)
    except launch.VersionMismatch:
        pass  # a start of `settings` refuses this code's other shard; the one it started runs


def test_versions_agree_with_themselves_and_not_across_wire_or_schema():
    ours = this_version()
    assert incompatibility(ours, ours) is None
    assert incompatibility({**ours, "release": "0.0.1"}, ours) is None  # a release alone may roll
    assert "another wire version" in incompatibility({**ours, "wire": OTHER_WIRE}, ours)
    assert "another schema" in incompatibility({**ours, "schema": ours["schema"] - 1}, ours)
    assert "from before version reports" in incompatibility(None, ours)


def test_a_shard_of_another_wire_version_is_refused_by_the_ingress_and_by_a_start(service, admin, compute,
                                                                                  org_id_on, new_org):
    org = new_org(org_id=org_id_on(SHARD))
    other_shard_org = new_org(org_id=org_id_on(0))
    granted = admin.post(f"/v1/orgs/{org}/credits", json={"kind": "grant", "amount_micros": 7_000_000},
                         headers={"Idempotency-Key": f"handshake-{org}"})
    assert granted.status_code == 201, granted.text
    balance = admin.get(f"/v1/orgs/{org}").json()["balance_micros"]
    assert compute.post("/v1/gate", json={"org_id": org, "action": "create"}).status_code == 200

    _replace_shard(service.settings.model_copy(update={"test_wire_version": OTHER_WIRE}))
    try:
        report = ray.get(ray.get_actor(shard_name(SHARD), namespace=NAMESPACE).ready.remote(), timeout=60)
        assert report["version"]["wire"] == OTHER_WIRE

        # The ingress: once it notices the new shard (its feed, or its first call), every
        # request for the shard's orgs is refused, with the reason; none reaches the shard.
        gate = wait_for("the ingress to refuse the shard", lambda: (
            lambda r: r if r.json().get("error", {}).get("code") == "shard_version_mismatch" else None)(
                compute.post("/v1/gate", json={"org_id": org, "action": "create"})), timeout_s=30)
        assert_error(gate, 503, "shard_version_mismatch", mentions=f"wire {OTHER_WIRE}")
        assert gate.headers["Retry-After"]
        assert f"billing shard {SHARD} is refused" in gate.json()["error"]["message"]
        credit = admin.post(f"/v1/orgs/{org}/credits", json={"kind": "grant", "amount_micros": 1_000_000},
                            headers={"Idempotency-Key": f"handshake-refused-{org}"})
        assert_error(credit, 503, "shard_version_mismatch", mentions="mixing metergate versions")
        assert_error(admin.get(f"/v1/orgs/{org}"), 503, "shard_version_mismatch")
        assert admin.get("/readyz").status_code == 503
        # The other shard's orgs are served as before.
        assert compute.post("/v1/gate", json={"org_id": other_shard_org, "action": "create"}).status_code == 200

        # A start (or deploy) that finds it running stops, saying which part and what to do.
        try:
            launch.start_shards(service.settings)
        except launch.VersionMismatch as exc:
            message = str(exc)
        else:
            raise AssertionError("a start with a shard of another wire version running did not refuse")
        assert f"{shard_name(SHARD)}: it runs metergate" in message
        assert f"wire {OTHER_WIRE}" in message and f"wire {WIRE_VERSION}" in message
        assert "stop-backend" in message and "\n" not in message
        # A deploy (start_backend) asks before it migrates: no schema is migrated under them.
        fresh = f"metergate_handshake_{uuid.uuid4().hex[:8]}"
        _execute(service.settings.database_url, f'CREATE DATABASE "{fresh}"')
        try:
            fresh_url = database_url_named(service.settings.database_url, fresh)
            with pytest.raises(launch.VersionMismatch):
                launch.start_backend(service.settings.model_copy(update={"database_url": fresh_url}))
            assert Sql(fresh_url).val("SELECT to_regclass('schema_migrations') IS NULL")
        finally:
            _execute(service.settings.database_url, f'DROP DATABASE IF EXISTS "{fresh}" WITH (FORCE)')
    finally:
        _replace_shard(service.settings)  # a shard of this version again, drained handover

    # The ingress looks the name up again, agrees with the new shard, and nothing was lost.
    wait_for("the ingress to route to the new shard", lambda: compute.post(
        "/v1/gate", json={"org_id": org, "action": "create"}).status_code == 200, timeout_s=30)
    assert admin.get(f"/v1/orgs/{org}").json()["balance_micros"] == balance
    assert admin.post(f"/v1/orgs/{org}/credits", json={"kind": "grant", "amount_micros": 1_000_000},
                      headers={"Idempotency-Key": f"handshake-after-{org}"}).status_code == 201
    assert admin.get(f"/v1/orgs/{org}").json()["balance_micros"] == balance + 1_000_000
    assert wait_for("/readyz", lambda: admin.get("/readyz").status_code == 200, timeout_s=30)
