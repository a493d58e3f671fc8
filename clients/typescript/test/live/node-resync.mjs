// The TypeScript client in Node while a shard is killed (tests/test_typescript_client.py kills
// it): the other shard's org is answered locally throughout, the killed shard's org comes back
// through a resync of that shard alone, and a credit made after the restart reaches the local
// decision as the server decides it. Env: METERGATE_URL, METERGATE_SERVICE_TOKEN,
// METERGATE_ADMIN_TOKEN, METERGATE_ORG (on the shard killed), METERGATE_OTHER_ORG (on another).
// Protocol with the test: prints "ready" once both orgs are local, then waits for a line on
// stdin (the shard was killed); prints one JSON line of what it counted; exits 1 on failure.
import assert from "node:assert/strict";
import { createInterface } from "node:readline";

import { GateClient } from "../../dist/index.js";

const env = process.env;
const [url, token, org, other] = [env.METERGATE_URL, env.METERGATE_SERVICE_TOKEN, env.METERGATE_ORG, env.METERGATE_OTHER_ORG];
const sleep = (ms) => new Promise((resolve) => setTimeout(resolve, ms));

const client = new GateClient({ url, token, maxStalenessS: 1.0, heartbeatS: 0.1, defaultPolicy: "closed" }).follow();
const result = { other_local: 0, other_not_local: 0 };
try {
  assert.ok(await client.waitSynced(60), JSON.stringify(client.counters()));
  for (let i = 0; client.local(org, "create") === null || client.local(other, "create") === null; i++) {
    assert.ok(i < 5000, "both orgs local within 10 s");
    await sleep(2);
  }
  const resyncsBefore = client.counters().resyncs;
  console.log("ready");
  await new Promise((resolve) => createInterface({ input: process.stdin }).once("line", resolve));

  // Until the killed shard's org is local again after a resync, the other org must stay local.
  const killed = performance.now();
  let seenGone = false;
  for (;;) {
    if (client.local(other, "create") !== null) result.other_local++;
    else result.other_not_local++;
    const back = client.local(org, "create");
    seenGone ||= back === null;
    if (seenGone && back !== null && client.counters().resyncs > resyncsBefore) break;
    assert.ok(performance.now() - killed < 90_000, `the killed shard's org not local again in 90 s: ${JSON.stringify(client.counters())}`);
    await sleep(5);
  }
  result.back_local_s = (performance.now() - killed) / 1000;

  // A credit after the restart: seen locally with the server's balance, and the same decision.
  let credited;
  for (;;) {
    const response = await fetch(`${url}/v1/orgs/${org}/credits`, { method: "POST",
      headers: { Authorization: `Bearer ${env.METERGATE_ADMIN_TOKEN}`, "Content-Type": "application/json" },
      body: JSON.stringify({ kind: "grant", amount_micros: 3_000_000 }) });
    if (response.status === 201) {
      credited = await response.json();
      break;
    }
    assert.ok(performance.now() - killed < 90_000, `no credit: ${response.status}`);
    await sleep(200);
  }
  for (let i = 0; client.local(org, "create")?.decision.balance_micros !== credited.balance_micros; i++) {
    assert.ok(i < 2000, "the credit locally within 10 s");
    await sleep(5);
  }
  const server = await (await fetch(`${url}/v1/gate`, { method: "POST", body: JSON.stringify({ org_id: org, action: "create" }),
    headers: { Authorization: `Bearer ${token}`, "Content-Type": "application/json" } })).json();
  const { age_ms: _age, ...serverDecision } = server;
  assert.deepEqual(client.local(org, "create").decision, serverDecision);
  result.counters = client.counters();
  console.log(JSON.stringify(result));
} catch (error) {
  console.error(`FAILED: ${error.stack}\ncounters: ${JSON.stringify(client.counters())}`);
  process.exitCode = 1;
} finally {
  await client.close();
}
