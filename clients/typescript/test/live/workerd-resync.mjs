// The Workers pattern in workerd while a shard is killed (tests/test_typescript_client.py kills
// it): a Worker (gate-worker.mjs: isolateGate, bound 1 s) is asked about an org on the killed
// shard and one on another shard, in turn. Every answer about the other shard's org stays
// local; the killed shard's org comes back local after the isolate's pass resyncs that shard
// (its resyncs and snapshots counters go up); a credit granted after the restart reaches the
// Worker's local decision within the bound, as the server decides it. Env: METERGATE_URL,
// METERGATE_SERVICE_TOKEN, METERGATE_ADMIN_TOKEN, METERGATE_ORG (on the shard killed),
// METERGATE_OTHER_ORG (on another). Protocol with the test as node-resync.mjs: "ready" once
// both orgs are local, then a line on stdin (the shard was killed); prints one JSON line of
// what it counted and measured; exits 1 on failure. METERGATE_TRACE=FILE writes every answer
// after the kill there (org, source, age, request time, counters).
import assert from "node:assert/strict";
import { writeFileSync } from "node:fs";
import { createInterface } from "node:readline";

import { gateWorker, serverDecision, sleep } from "./helpers.mjs";

const env = process.env;
const [url, token, org, other] = [env.METERGATE_URL, env.METERGATE_SERVICE_TOKEN, env.METERGATE_ORG, env.METERGATE_OTHER_ORG];
const BOUND_S = 1.0;

const worker = await gateWorker(url, token);
const trace = [];
async function ask(orgId) {
  const sent = performance.now();
  const body = await worker.ask(orgId);
  trace.push({ org: orgId === org ? "killed" : "other", sent, at: Math.round(performance.now()), ...body.answer,
    tookS: body.tookS, counters: body.counters });
  return body;
}

const result = { other_local: 0, other_not_local: 0, killed_local: 0, killed_not_local: 0 };
try {
  const started = performance.now();
  let before;
  for (;;) {
    const [a, b] = [await ask(org), await ask(other)];
    if (a.answer.source === "local" && b.answer.source === "local") {
      before = b.counters;
      break;
    }
    assert.ok(performance.now() - started < 10_000, "both orgs local within 10 s");
    await sleep(20);
  }
  console.log("ready");
  await new Promise((resolve) => createInterface({ input: process.stdin }).once("line", resolve));

  // Until the killed shard's org is local again after a resync, the other org must stay local.
  const killed = performance.now();
  const otherTook = [];
  const killedTook = [];
  // Shard 1 proved current while shard 0 is down (before its resync): an answer about the other
  // org from a view complete as of a time after the kill (younger than the time since the kill,
  // counted from when the request was sent; ages are never under-estimated). Both orgs are
  // local throughout in most runs (a request that finds the views past the bound waits for the
  // isolate's pass, which outlasts the restart), so this is what tells the shards apart.
  result.other_proved_while_down = 0;
  for (;;) {
    const { answer: elsewhere } = await ask(other);
    otherTook.push(trace.at(-1).tookS);
    if (elsewhere.source === "local") result.other_local++;
    else result.other_not_local++;
    assert.ok(elsewhere.source === "local", `the other shard's org: ${JSON.stringify(elsewhere)}`);
    const { sent, counters: now } = trace.at(-1);
    if (now.resyncs === before.resyncs && elsewhere.ageS < (sent - killed) / 1000) result.other_proved_while_down++;
    const { answer: back, counters } = await ask(org);
    killedTook.push(trace.at(-1).tookS);
    if (back.source === "local") {
      result.killed_local++;
      assert.ok(back.ageS <= BOUND_S, JSON.stringify(back));
      if (counters.resyncs > before.resyncs && counters.snapshots > before.snapshots) break;
    } else {
      result.killed_not_local++;
      assert.deepEqual([back.source, back.allowed, back.reason], ["policy", false, "unavailable"], JSON.stringify(back));
    }
    assert.ok(performance.now() - killed < 60_000, `the killed shard's org not local after a resync in 60 s: ${JSON.stringify(counters)}`);
    await sleep(20);
  }
  result.back_local_s = (performance.now() - killed) / 1000;
  assert.ok(result.other_proved_while_down > 0, "the other shard was not proved current while the killed one was down");
  // A request waits for a pass only while its org's own shard is past the bound (workers.ts).
  result.request_s = { other_max: Math.max(...otherTook), killed_max: Math.max(...killedTook) };
  const outage = trace.filter((a) => a.at >= killed);
  for (const which of ["killed", "other"]) {
    const ages = outage.filter((a) => a.org === which && a.source === "local").map((a) => a.ageS);
    result[`${which}_max_age_s`] = Math.max(...ages);
  }
  result.refreshes_in_outage = outage.at(-1).counters.refreshes - before.refreshes;
  if (env.METERGATE_TRACE) writeFileSync(env.METERGATE_TRACE, outage.map(({ org: which, at, source, ageS, tookS, counters: c }) =>
    `${at} ${which} ${source} ${ageS} took=${tookS.toFixed(3)} r=${c.refreshes} e=${c.refresh_errors} s=${c.snapshots} rs=${c.resyncs}`).join("\n") + "\n");

  // A credit after the restart: local within the bound of the server's answer, as the server decides.
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
  const granted = performance.now();
  for (;;) {
    const { answer } = await ask(org);
    if (answer.source === "local" && answer.decision.balance_micros === credited.balance_micros) break;
    assert.ok(performance.now() - granted < 10_000, `the credit not local in 10 s: ${JSON.stringify(answer)}`);
    await sleep(20);
  }
  result.credit_to_local_s = (performance.now() - granted) / 1000;
  assert.ok(result.credit_to_local_s <= BOUND_S, `the credit took ${result.credit_to_local_s} s to reach the Worker`);
  assert.deepEqual(trace.at(-1).decision, await serverDecision(url, token, org), "the local decision is the server's");
  result.counters = trace.at(-1).counters;
  result.before = { resyncs: before.resyncs, snapshots: before.snapshots };
  console.log(JSON.stringify(result));
} catch (error) {
  console.error(`FAILED: ${error.stack}`);
  console.error(trace.slice(-60).map(({ org: which, at, source, reason, ageS, tookS, counters: c }) =>
    `${at} ${which} ${source} ${reason} ${ageS} took=${tookS.toFixed(3)} r=${c.refreshes} e=${c.refresh_errors} s=${c.snapshots} rs=${c.resyncs}`).join("\n"));
  process.exitCode = 1;
} finally {
  await worker.dispose();
}
