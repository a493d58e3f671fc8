// Protocol conformance of the TypeScript client in Node against a running metergate
// (tests/test_typescript_client.py starts it), the relay's and the Python client's cases:
// each kind of change, made over HTTP and never through this client, reaches the client's
// local decision (source "local") within the staleness bound, and that decision is then the
// server's. The changes: an admin halt and a resume; the org's money taken back (halted for
// balance) and a credit grant that lifts it; a tier change up (a create of 6 at the base
// tier's cap of 5 becomes allowed) and back down (denied again); leases taken by another
// gateway up to the cap (the next create is concurrency_limit) and one released (allowed).
// Each change is timed to the first local answer that shows it, from the request that made
// it (sent_to_local_s: the change's own round trip included) and from the server's answer to
// it (answer_to_local_s: it is committed then, so this is what the bound limits; often 0,
// the feed line arriving before the answer). Env: METERGATE_URL, METERGATE_SERVICE_TOKEN,
// METERGATE_ADMIN_TOKEN, METERGATE_ORG (a new prepaid org at the base tier, no leases).
// Prints one JSON line of what it measured; exits 1 with the reason on the first failure.
import assert from "node:assert/strict";

import { GateClient, NO_RESOURCES, toResources } from "../../dist/index.js";

const env = process.env;
const [url, token, adminToken, org] = [env.METERGATE_URL, env.METERGATE_SERVICE_TOKEN, env.METERGATE_ADMIN_TOKEN, env.METERGATE_ORG];
const BOUND_S = 1.0;
const BASE_CAP = 5; // config/catalog.toml [tiers] base
const PRO_CAP = 100;
const OVER_BASE = { quantity: BASE_CAP + 1 };

async function call(method, path, body, bearer = token) {
  const response = await fetch(`${url}${path}`, { method,
    headers: { Authorization: `Bearer ${bearer}`, "Content-Type": "application/json" },
    body: body === undefined ? undefined : JSON.stringify(body) });
  const text = await response.text();
  return { status: response.status, body: text ? JSON.parse(text) : null };
}

/** The server's decision now, without its age_ms. */
async function serverDecision(action, resources) {
  const { status, body } = await call("POST", "/v1/gate", { org_id: org, action, ...(resources ? { resources } : {}) });
  assert.equal(status, 200, JSON.stringify(body));
  const { age_ms: _age, ...decision } = body;
  return decision;
}

/** Polls local() until it answers (source "local") and `wanted` holds; resolves to the answer
 * and the time taken since `from` (performance.now() ms). */
async function localUntil(what, action, resources, wanted, from = performance.now()) {
  const asked = resources ? toResources(resources) : NO_RESOURCES;
  for (;;) {
    const answer = client.local(org, action, asked);
    const s = (performance.now() - from) / 1000;
    if (answer !== null && wanted(answer.decision)) {
      assert.equal(answer.source, "local");
      return { answer, s };
    }
    if (s > 10) throw new Error(`${what}: not answered locally in 10 s; last ${JSON.stringify(answer)}`);
    await new Promise((resolve) => setTimeout(resolve, 2));
  }
}

const client = new GateClient({ url, token, maxStalenessS: BOUND_S, heartbeatS: 0.1, defaultPolicy: "closed" }).follow();
const result = { bound_s: BOUND_S, sent_to_local_s: {}, answer_to_local_s: {}, age_s: {} };

/** Makes the change over HTTP, then waits for the local decision of `action` on `resources`
 * to show it; the time from the server's answer to that local answer must be within the bound,
 * and the local decision must be the server's. */
async function change(what, request, action, resources, wanted) {
  const sent = performance.now();
  const { status, body } = await request();
  assert.ok([200, 201, 204].includes(status), `${what}: ${status} ${JSON.stringify(body)}`);
  const answered = performance.now();
  const { answer, s } = await localUntil(what, action, resources, wanted, answered);
  result.answer_to_local_s[what] = Math.round(s * 1000) / 1000;
  result.sent_to_local_s[what] = Math.round(performance.now() - sent) / 1000;
  result.age_s[what] = Math.round(answer.ageS * 1000) / 1000;
  assert.ok(s <= BOUND_S, `${what}: ${s} s from the server's answer to the local decision, over the ${BOUND_S} s bound`);
  assert.ok(answer.ageS <= BOUND_S, `${what}: a local answer from a view ${answer.ageS} s old`);
  assert.deepEqual(answer.decision, await serverDecision(action, resources), `${what}: the local decision is the server's`);
  return answer.decision;
}

const admin = (method, path, body) => () => call(method, `/v1/orgs/${org}${path}`, body, adminToken);
const allowed = (d) => d.allowed && d.reason === "ok";
const otherLeases = [];
const takeLease = (leaseId) => () => call("POST", "/v1/leases", { org_id: org, lease_id: leaseId, ttl_s: 600 });

try {
  assert.ok(await client.waitSynced(60), `not synced in 60 s: ${JSON.stringify(client.counters())}`);
  const { answer: first } = await localUntil("the new org", "create", null, allowed);
  assert.deepEqual(first.decision, await serverDecision("create"), "the new org: the local decision is the server's");
  assert.equal(first.decision.max_concurrent, BASE_CAP, JSON.stringify(first.decision));
  const balance = first.decision.balance_micros;
  assert.ok(balance > 0, `a new org has its signup credit: ${balance}`);

  // An admin halt, and the resume.
  await change("admin halt", admin("POST", "/halt"), "create", null, (d) => d.reason === "halted");
  await change("resume", admin("POST", "/resume"), "create", null, allowed);

  // Credit: all of it taken back (the org is halted for balance and denied), then a grant.
  const broke = await change("money taken back", admin("POST", "/credits", { kind: "adjustment", amount_micros: -balance }),
    "create", null, (d) => !d.allowed && d.balance_micros === 0);
  assert.ok(["no_payment_method", "insufficient_balance", "halted"].includes(broke.reason), JSON.stringify(broke));
  const { answer: brokeWake } = await localUntil("wake with no money", "wake", null, () => true);
  assert.deepEqual([brokeWake.allowed, brokeWake.reason], [false, "halted"], "halted for balance");
  await change("credit grant", admin("POST", "/credits", { kind: "grant", amount_micros: 2_000_000 }), "create", null,
    (d) => allowed(d) && d.balance_micros === 2_000_000);
  const { answer: paidWake } = await localUntil("wake after the grant", "wake", null, () => true);
  assert.equal(paidWake.allowed, true, JSON.stringify(paidWake));

  // A tier change: a create of 6 is over the base tier's cap; the pro tier allows it; back down denies it.
  const { answer: over } = await localUntil("a create of 6 at the base tier", "create", OVER_BASE, () => true);
  assert.deepEqual([over.allowed, over.reason], [false, "concurrency_limit"], JSON.stringify(over));
  await change("tier up (base to pro)", admin("PUT", "/tier", { tier: "pro" }), "create", OVER_BASE,
    (d) => allowed(d) && d.max_concurrent === PRO_CAP);
  await change("tier down (pro to base)", admin("PUT", "/tier", { tier: "base" }), "create", OVER_BASE,
    (d) => d.reason === "concurrency_limit" && d.max_concurrent === BASE_CAP);

  // Another gateway's leases (POST /v1/leases, not this client): each raises active_leases;
  // at the cap this client's create is denied, and after one is released it is allowed again.
  for (let n = 1; n <= BASE_CAP; n++) {
    const leaseId = `other-gw-${n}`;
    otherLeases.push(leaseId);
    const atCap = n === BASE_CAP;
    await change(`another gateway's lease ${n}`, takeLease(leaseId), "create", null,
      (d) => d.active_leases === n && (atCap ? d.reason === "concurrency_limit" : allowed(d)));
  }
  const released = otherLeases.pop();
  await change("another gateway's release", () => call("DELETE", `/v1/leases/${org}/${released}`), "create", null,
    (d) => allowed(d) && d.active_leases === BASE_CAP - 1);

  result.max_sent_to_local_s = Math.max(...Object.values(result.sent_to_local_s));
  result.max_answer_to_local_s = Math.max(...Object.values(result.answer_to_local_s));
  result.counters = client.counters();
  assert.equal(result.counters.server, 0, "every answer here was local");
  console.log(JSON.stringify(result));
} catch (error) {
  console.error(`FAILED: ${error.stack}\nso far: ${JSON.stringify(result)}\ncounters: ${JSON.stringify(client.counters())}`);
  process.exitCode = 1;
} finally {
  for (const leaseId of otherLeases) await call("DELETE", `/v1/leases/${org}/${leaseId}`).catch(() => undefined);
  await client.close();
}
