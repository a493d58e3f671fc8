// GateClient with no server to reach (a closed port): each action's policy answers, never a
// rejection, and a bounded pass says it could not prove the views current.
import assert from "node:assert/strict";
import net from "node:net";
import test from "node:test";

import { GateClient } from "../dist/index.js";
import { IsolateGate } from "../dist/workers.js";

async function closedPort() {
  const server = net.createServer();
  await new Promise((resolve) => server.listen(0, "127.0.0.1", resolve));
  const { port } = server.address();
  await new Promise((resolve) => server.close(resolve));
  return `http://127.0.0.1:${port}`;
}

test("with the server unreachable, each action's policy answers and is counted", async () => {
  const client = new GateClient({ url: await closedPort(), token: "t", timeoutS: 1,
    policies: { create: "closed", ingest: "open" } });
  assert.deepEqual(await client.check("org_1", "create"),
    { allowed: false, reason: "unavailable", source: "policy", ageS: Infinity, decision: null });
  assert.equal((await client.check("org_1", "ingest")).allowed, true);
  const asked = await client.check("org_1", "wake"); // "server" by default: no answer, so denied
  assert.deepEqual([asked.source, asked.allowed, asked.reason], ["policy", false, "unavailable"]);
  const counts = client.counters();
  assert.deepEqual([counts.policy_open, counts.policy_closed, counts.server, counts.local], [1, 2, 0, 0]);
});

test("a bounded pass against no server fails, counted, without throwing", async () => {
  const client = new GateClient({ url: await closedPort(), token: "t", timeoutS: 1 });
  assert.equal(await client.refresh(), false);
  assert.equal(client.counters().refresh_errors, 1);
  assert.equal(client.ageS(), Infinity);
});

test("unknown actions and resources of another shape are refused, not answered", async () => {
  assert.throws(() => new GateClient({ url: "http://x", token: "t", policies: { delete: "open" } }), /no such action/);
  const client = new GateClient({ url: "http://127.0.0.1:1", token: "t", defaultPolicy: "open" });
  await assert.rejects(client.check("org_1", "delete"), RangeError);
  await assert.rejects(client.check("org_1", "create", { memory: 1 }), /no field "memory"/);
});

test("names every object inherits are not actions", async () => {
  const client = new GateClient({ url: "http://127.0.0.1:1", token: "t", defaultPolicy: "open" });
  for (const name of ["constructor", "toString", "__proto__", "hasOwnProperty"]) {
    await assert.rejects(client.check("org_1", name), RangeError, name);
  }
});

test("a server answer whose allowed is not a boolean is no answer: the policy decides", async () => {
  const http = await import("node:http");
  const server = http.createServer((_, response) => {
    response.writeHead(200, { "content-type": "application/json" });
    response.end(JSON.stringify({ allowed: "false", reason: "ok", status: 200 }));
  });
  await new Promise((resolve) => server.listen(0, "127.0.0.1", resolve));
  try {
    const client = new GateClient({ url: `http://127.0.0.1:${server.address().port}`, token: "t", timeoutS: 2,
      policies: { create: "server" } });
    const answer = await client.check("org_1", "create");
    assert.deepEqual([answer.allowed, answer.source], [false, "policy"]);
    assert.equal(client.counters().server, 0);
  } finally {
    server.closeAllConnections?.();
    await new Promise((resolve) => server.close(resolve));
  }
});

test("a Worker's check waits for a pass only when its org's own shard is past the bound", async () => {
  // Every request of a pass hangs until the pass's own timeout: a check that waits for a pass
  // takes that long; one that starts it in waitUntil answers at once.
  let fetches = 0;
  const hang = (_input, init) => {
    fetches++;
    return new Promise((_resolve, reject) => init.signal.addEventListener("abort", () => reject(new Error("aborted"))));
  };
  const gate = new IsolateGate({ url: "http://127.0.0.1:1", token: "unused", maxStalenessS: 1, timeoutS: 0.4, fetch: hang });
  const projection = gate.client.projection;
  gate.client["shardCount"] = 2;
  const view = { balance_micros: 5_000_000, quota_remaining_micros: 0, included_micros: 0, active_leases: 0,
    max_concurrent: 5, max_disk_mb: 20_480, halted: null, suspended: false, degraded: false, overdraws: false,
    needs_card: false, machine_quotas: null, machine_in_use: null };
  for (const [org, shard] of [["org_down", 0], ["org_up", 1]]) {
    projection.apply({ type: "view", org_id: org, shard, epoch: 1, seq: 1, valid_until_us: null, view });
  }
  const now = projection.mono();
  for (const shard of [0, 1]) projection.clock(shard, now, now, now);
  projection.heard(1, now);             // shard 1 proved current now
  projection.heard(0, now - 5_000_000); // shard 0 last heard 5 s ago: down
  const pending = [];
  const ctx = { waitUntil: (promise) => pending.push(promise) };
  const alive = setInterval(() => undefined, 50); // a pass's timeout timer does not hold the loop open
  try {
    const started = performance.now();
    const up = await gate.check(ctx, "org_up", "create");
    assert.equal(up.source, "local");
    assert.ok(performance.now() - started < 200, `the healthy shard's org waited ${performance.now() - started} ms`);
    assert.equal(pending.length, 1, "a pass for the other shard starts in waitUntil");
    await Promise.allSettled(pending);
    const waited = performance.now();
    const down = await gate.check(ctx, "org_down", "create");
    assert.notEqual(down.source, "local");
    assert.ok(performance.now() - waited >= 300, "the down shard's org waits for its pass");
    assert.ok(fetches >= 2);
  } finally {
    clearInterval(alive);
  }
});
