"""The TypeScript client (clients/typescript/): built with tsc from its committed lockfile, its
Node tests (node --test), and the gate vectors run inside workerd, the Workers runtime that the
npm package miniflare ships (docs/integrate/typescript.md).

Needs Node 20+ and npm on PATH; without them every test here skips and says what is missing
(CI installs Debian's nodejs and npm: .ci/run). `npm ci` reads the registry or npm's cache.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
from pathlib import Path

import pytest

from tests.helpers import ADMIN_TOKEN, SERVICE_TOKEN, shard_pid

PACKAGE = Path(__file__).resolve().parent.parent / "clients" / "typescript"
NODE_MAJOR_MIN = 20


def _node_missing() -> str | None:
    node, npm = shutil.which("node"), shutil.which("npm")
    if node is None:
        return "Node.js is not installed (no `node` on PATH; apt-get install nodejs npm)"
    if npm is None:
        return "npm is not installed (no `npm` on PATH; apt-get install npm)"
    version = subprocess.run([node, "--version"], capture_output=True, text=True, timeout=30).stdout.strip()
    found = re.match(r"v(\d+)\.", version)
    if found is None or int(found.group(1)) < NODE_MAJOR_MIN:
        return f"Node.js {NODE_MAJOR_MIN}+ is needed for the TypeScript client's tests, found {version or 'none'}"
    return None


MISSING = _node_missing()
if MISSING is not None:
    pytest.skip(MISSING, allow_module_level=True)


def _run(args: list[str], timeout_s: float, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    done = subprocess.run(args, cwd=PACKAGE, capture_output=True, text=True, timeout=timeout_s,
                          env={**os.environ, **(env or {})})
    assert done.returncode == 0, f"{' '.join(args)} exited {done.returncode}:\n{done.stdout[-4000:]}\n{done.stderr[-4000:]}"
    return done


@pytest.fixture(scope="module")
def built() -> Path:
    """node_modules from the lockfile (install scripts off: workerd's binary comes in its own
    npm package, and npm 9 and 11 then do the same), then dist/ from tsc."""
    _run(["npm", "ci", "--no-audit", "--no-fund", "--prefer-offline", "--ignore-scripts"], timeout_s=300)
    _run([str(PACKAGE / "node_modules" / ".bin" / "tsc"), "-p", "tsconfig.json"], timeout_s=120)
    return PACKAGE


def test_node_tests_pass_the_vectors_and_the_projection_rules(built):
    tests = sorted(str(path.relative_to(built)) for path in (built / "test").glob("*.test.mjs"))
    assert tests, "no Node tests found"
    done = _run(["node", "--test", *tests], timeout_s=120)
    assert re.search(r"^# fail 0$", done.stdout, re.MULTILINE), done.stdout[-4000:]


def test_gate_vectors_pass_inside_workerd(built):
    done = _run(["node", "test/workerd/run.mjs"], timeout_s=120)
    assert "gate vectors pass" in done.stdout, done.stdout
    assert "capability token vectors pass" in done.stdout, done.stdout  # the token run happened too


# ----- against the running service ----------------------------------------------------------


def _live_env(service, org: str) -> dict[str, str]:
    return {"METERGATE_URL": service.base_url, "METERGATE_SERVICE_TOKEN": SERVICE_TOKEN,
            "METERGATE_ADMIN_TOKEN": ADMIN_TOKEN, "METERGATE_ORG": org}


def _measured(done: subprocess.CompletedProcess) -> dict:
    return json.loads(done.stdout.strip().splitlines()[-1])


def test_in_node_a_halt_reaches_the_local_decision_within_the_bound_and_the_server_gone_leads_to_the_policy(
        built, service, new_org):
    """test/live/node-live.mjs: the client follows the feed through a relay the script cuts; a
    lease and a release answer's views apply at once, a usage report is accepted, the halt is
    local within 1 s and agrees with the server, and once the relay is gone create (closed) is
    denied, ingest (open) allowed and wake (server) denied as unavailable, never before the bound."""
    done = _run(["node", "test/live/node-live.mjs"], timeout_s=120, env=_live_env(service, new_org()))
    measured = _measured(done)
    assert measured["halt_to_local_s"] <= 1.0
    assert measured["age_at_cut_s"] + measured["gone_to_policy_s"] >= 0.95


def test_in_node_each_kind_of_change_made_elsewhere_reaches_the_local_decision_within_the_bound(
        built, service, new_org):
    """test/live/node-conformance.mjs, the relay's and the Python client's conformance cases: an
    admin halt, a resume, the org's money taken back (halted for balance), a credit grant, a tier
    change up and back down (a create of 6 against caps of 100 and 5), and another gateway's
    leases up to the cap and one released, each made over HTTP and not through the client, each
    answered `local` within the 1 s bound of the server's answer, and then as the server decides."""
    done = _run(["node", "test/live/node-conformance.mjs"], timeout_s=180, env=_live_env(service, new_org()))
    measured = _measured(done)
    print("node conformance:", measured)
    took = measured["answer_to_local_s"]
    assert len(took) == 12, took  # halt, resume, debit, grant, tier up, tier down, 5 leases, a release
    assert max(took.values()) <= 1.0 and max(measured["age_s"].values()) <= 1.0, measured
    assert measured["counters"]["server"] == 0, measured["counters"]


def test_in_workerd_the_isolate_projection_answers_locally_and_each_change_arrives_within_the_bound(
        built, service, new_org):
    """test/live/workerd-live.mjs: a Worker in workerd gating with isolateGate; halts and
    resumes reach its local decision within 1 s (the pattern's staleness, printed), no local
    answer is older than the bound, and after a quiet spell the first request waits for a pass."""
    done = _run(["node", "test/live/workerd-live.mjs"], timeout_s=120, env=_live_env(service, new_org()))
    measured = _measured(done)
    print("workers pattern:", measured)
    assert measured["change_to_local_s"]["max"] <= 1.0


def test_in_node_a_killed_shard_resyncs_alone_while_the_other_shards_org_stays_local(
        built, service, new_org, org_id_on):
    """test/live/node-resync.mjs: shard 0 killed with SIGKILL while the client counts its
    answers; every answer about the org on shard 1 stays local, the org on shard 0 comes back
    local after a resync, and a credit made after the restart is decided locally as the server
    decides it."""
    env = {**os.environ, **_live_env(service, new_org(org_id=org_id_on(0))), "METERGATE_OTHER_ORG": new_org(
        org_id=org_id_on(1))}
    script = subprocess.Popen(["node", "test/live/node-resync.mjs"], cwd=PACKAGE, env=env, text=True,
                              stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        ready = script.stdout.readline().strip()
        assert ready == "ready", f"{ready}\n{script.stderr.read() if script.poll() is not None else ''}"
        os.kill(shard_pid(0), signal.SIGKILL)
        script.stdin.write("killed\n")
        script.stdin.flush()
        out, err = script.communicate(timeout=150)
    finally:
        if script.poll() is None:
            script.kill()
    assert script.returncode == 0, err[-4000:]
    measured = json.loads(out.strip().splitlines()[-1])
    print("shard killed:", measured)
    assert measured["other_not_local"] == 0 and measured["other_local"] > 0, measured
    assert measured["counters"]["resyncs"] >= 3, measured  # one per shard at the start, then the killed one


def test_in_workerd_the_server_cut_off_leads_to_each_actions_policy_once_the_bound_has_passed(
        built, service, new_org):
    """test/live/workerd-cut.mjs: the Worker (isolateGate in workerd) reaches the service through
    a relay the script cuts; local answers go on only from views within the bound, then create
    (closed) and wake and ingest (server, unreachable) are denied by policy as unavailable, never
    before the views' age passed the bound and never local again."""
    done = _run(["node", "test/live/workerd-cut.mjs"], timeout_s=120, env=_live_env(service, new_org()))
    measured = _measured(done)
    print("workers pattern, server cut off:", measured)
    assert measured["age_at_cut_s"] + measured["gone_to_policy_s"] >= 0.95, measured
    assert measured["policy_answers"] >= 3, measured


def test_in_workerd_a_killed_shard_resyncs_while_the_other_shards_org_stays_local(built, service, new_org, org_id_on):
    """test/live/workerd-resync.mjs: shard 0 killed with SIGKILL while a Worker (isolateGate in
    workerd) is asked about an org on each shard in turn; every answer about the org on shard 1
    stays local, shard 1 is proved current as of after the kill while shard 0 is down, the org
    on shard 0 is local again after the isolate's pass resynced that shard
    and loaded its snapshot, and a credit made after the restart reaches the Worker's local
    decision within the bound, as the server decides it."""
    env = {**os.environ, **_live_env(service, new_org(org_id=org_id_on(0))), "METERGATE_OTHER_ORG": new_org(
        org_id=org_id_on(1))}
    script = subprocess.Popen(["node", "test/live/workerd-resync.mjs"], cwd=PACKAGE, env=env, text=True,
                              stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        ready = script.stdout.readline().strip()
        assert ready == "ready", f"{ready}\n{script.stderr.read() if script.poll() is not None else ''}"
        os.kill(shard_pid(0), signal.SIGKILL)
        script.stdin.write("killed\n")
        script.stdin.flush()
        out, err = script.communicate(timeout=150)
    finally:
        if script.poll() is None:
            script.kill()
    assert script.returncode == 0, err[-4000:]
    measured = json.loads(out.strip().splitlines()[-1])
    print("workers pattern, shard killed:", measured)
    assert measured["other_not_local"] == 0 and measured["other_local"] > 0, measured
    assert measured["other_proved_while_down"] > 0, measured  # shard 1 proved current as of after the kill
    # A request about the healthy shard's org never waits for a pass while shard 0 is down.
    assert measured["request_s"]["other_max"] < 0.5, measured
    assert measured["counters"]["resyncs"] > measured["before"]["resyncs"], measured
    assert measured["counters"]["snapshots"] > measured["before"]["snapshots"], measured
    assert measured["credit_to_local_s"] <= 1.0, measured
