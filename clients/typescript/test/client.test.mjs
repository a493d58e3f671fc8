// GateClient with no server to reach (a closed port): each action's policy answers, never a
// rejection, and a bounded pass says it could not prove the views current.
import assert from "node:assert/strict";
import net from "node:net";
import test from "node:test";

import { GateClient } from "../dist/index.js";

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
