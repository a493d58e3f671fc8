// The TypeScript client in Node against a running metergate (tests/test_typescript_client.py
// starts it): it follows the feed through a loopback TCP relay this script owns, a lease
// answer's view is applied at once, an admin halt reaches the local decision within the
// staleness bound, and with the relay gone (the server unreachable) each action's policy
// answers once the bound has passed. Env: METERGATE_URL, METERGATE_SERVICE_TOKEN,
// METERGATE_ADMIN_TOKEN, METERGATE_ORG (an org with credit and no leases). Prints one JSON
// line of what it measured; exits 1 with the reason on the first failed expectation.
import assert from "node:assert/strict";

import { GateClient } from "../../dist/index.js";
import { relayTo } from "./helpers.mjs";

const { METERGATE_URL: url, METERGATE_SERVICE_TOKEN: token, METERGATE_ADMIN_TOKEN: adminToken, METERGATE_ORG: org } = process.env;
const BOUND_S = 1.0;

async function until(what, probe, timeoutS = 10) {
  const started = performance.now();
  for (;;) {
    const found = probe();
    if (found) return { found, s: (performance.now() - started) / 1000 };
    if (performance.now() - started > timeoutS * 1000) throw new Error(`${what}: not within ${timeoutS} s`);
    await new Promise((resolve) => setTimeout(resolve, 2));
  }
}

async function admin(path) {
  const response = await fetch(`${url}${path}`, { method: "POST", headers: { Authorization: `Bearer ${adminToken}` } });
  assert.ok(response.ok, `${path}: ${response.status} ${await response.text()}`);
}

const relay = await relayTo(url);
const client = new GateClient({ url: relay.url, token, maxStalenessS: BOUND_S, heartbeatS: 0.1,
  policies: { create: "closed", ingest: "open", wake: "server" } }).follow();
const result = {};
try {
  assert.ok(await client.waitSynced(60), `not synced in 60 s: ${JSON.stringify(client.counters())}`);
  await until("the new org, locally allowed", () => client.local(org, "create")?.allowed);

  // A lease answer carries the org's view: the next local decision counts the lease at once.
  const leaseId = `ts-${Date.now()}`;
  const leased = await client.lease(org, leaseId, { memory_mb: 512 }, 60);
  assert.equal(leased.status, 201, JSON.stringify(leased));
  assert.equal(client.local(org, "create").decision.active_leases, 1, "the lease answer's view, applied at once");
  const released = await client.release(org, leaseId);
  assert.equal(released.status, 200, JSON.stringify(released));
  assert.equal(client.local(org, "create").decision.active_leases, 0, "the release answer's view, applied at once");
  const startedS = Math.floor(client.projection.shardNowUs(0) / 1e6) - 5;
  const reported = await client.report([{ tick_id: `${leaseId}-1`, org_id: org, started_at: startedS, duration_ms: 1000,
    lease_id: leaseId, memory_mb: 512, cpu_count: 1, disk_mb: 0 }]);
  assert.equal(reported.status, 200, JSON.stringify(reported));
  assert.equal(reported.accepted, 1, JSON.stringify(reported));

  // An admin halt reaches the local decision within the bound, as the server decides it.
  const halted = performance.now();
  await admin(`/v1/orgs/${org}/halt`);
  const seen = await until("the admin halt, locally", () => client.local(org, "create")?.reason === "halted");
  result.halt_to_local_s = (performance.now() - halted) / 1000;
  assert.ok(result.halt_to_local_s <= BOUND_S, `the halt took ${result.halt_to_local_s} s to reach the local decision`);
  const server = await (await fetch(`${url}/v1/gate`, { method: "POST", body: JSON.stringify({ org_id: org, action: "create" }),
    headers: { Authorization: `Bearer ${token}`, "Content-Type": "application/json" } })).json();
  const { age_ms: _age, ...serverDecision } = server;
  assert.deepEqual(client.local(org, "create").decision, serverDecision, "the local decision is the server's");
  await admin(`/v1/orgs/${org}/resume`);
  await until("the resume, locally", () => client.local(org, "create")?.allowed);
  void seen;

  // The server gone: local answers stop once the bound has passed, then each action's policy.
  // The views keep answering until their age (already some heartbeats and a shard poll old
  // at the cut) passes the bound, not longer and not much sooner.
  const ageAtCutS = client.local(org, "create").ageS;
  const gone = performance.now();
  relay.close();
  const lastLocal = { ageS: ageAtCutS };
  await until("the views to go stale", () => {
    const answer = client.local(org, "create");
    if (answer !== null) lastLocal.ageS = answer.ageS;
    return answer === null;
  }, 10);
  result.gone_to_policy_s = (performance.now() - gone) / 1000;
  result.age_at_cut_s = ageAtCutS;
  assert.ok(lastLocal.ageS <= BOUND_S, `a local answer from a view ${lastLocal.ageS} s old`);
  assert.ok(ageAtCutS + result.gone_to_policy_s >= BOUND_S - 0.05,
    `stale ${result.gone_to_policy_s} s after the cut with views ${ageAtCutS} s old then: before the bound`);
  const closed = await client.check(org, "create");
  const open = await client.check(org, "ingest");
  const asked = await client.check(org, "wake");
  assert.deepEqual([closed.source, closed.allowed], ["policy", false]);
  assert.deepEqual([open.source, open.allowed], ["policy", true]);
  assert.deepEqual([asked.source, asked.allowed, asked.reason], ["policy", false, "unavailable"], "the server is unreachable too");
  result.counters = client.counters();
  assert.ok(result.counters.feed_errors >= 1 && result.counters.policy_open >= 1 && result.counters.policy_closed >= 2,
    JSON.stringify(result.counters));
  console.log(JSON.stringify(result));
} catch (error) {
  console.error(`FAILED: ${error.stack}\ncounters: ${JSON.stringify(client.counters())}`);
  process.exitCode = 1;
} finally {
  relay.close();
  await client.close();
}
