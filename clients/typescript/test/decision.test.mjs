import assert from "node:assert/strict";
import { readFileSync } from "node:fs";
import test from "node:test";

import * as gate from "../dist/index.js";
import { failingReadings, failingVectors } from "./vectors.mjs";

const VECTORS_PATH = new URL("../../vectors/gate_decisions.json", import.meta.url);
const VECTORS = JSON.parse(readFileSync(VECTORS_PATH, "utf8"));

test("the port answers every gate vector exactly", () => {
  assert.ok(VECTORS.cases.length >= 100, "the vectors file holds its cases");
  const failures = failingVectors(gate, VECTORS.cases);
  assert.deepEqual(failures.slice(0, 5), [], `${failures.length} of ${VECTORS.cases.length} vectors fail`);
});

test("the port reads every view and resources reading as the protocol says", () => {
  assert.ok(VECTORS.view_readings.length >= 20 && VECTORS.resource_readings.length >= 20, "the readings are there");
  const failures = failingReadings(gate, VECTORS);
  assert.deepEqual(failures.slice(0, 5), [], `${failures.length} readings fail`);
});

test("an unreadable record takes the org's place in order: neither it nor the older record is decided from", () => {
  const client = new gate.GateClient({ url: "http://127.0.0.1:1", token: "unused", maxStalenessS: 3600 });
  const projection = client.projection;
  const record = (seq, view) => gate.parseRecord({ type: "view", org_id: "org_1", shard: 0, epoch: 1, seq,
    valid_until_us: null, view });
  projection.apply(record(1, HEALTHY));
  const now = projection.mono();
  projection.clock(0, now + 1_000_000_000, now + 10, now);
  projection.heard(0, now + 1_000_000_000);
  assert.equal(client.local("org_1", "create", gate.NO_RESOURCES)?.source, "local");
  projection.apply(record(2, { ...HEALTHY, halted: "fraud" }));
  assert.equal(client.local("org_1", "create", gate.NO_RESOURCES), null);
  projection.apply(record(1, HEALTHY));
  assert.equal(client.local("org_1", "create", gate.NO_RESOURCES), null);
  projection.apply(record(3, HEALTHY));
  assert.equal(client.local("org_1", "create", gate.NO_RESOURCES)?.source, "local");
});

test("local() never decides from resources the server would refuse, however they were made", () => {
  const client = new gate.GateClient({ url: "http://127.0.0.1:1", token: "unused", maxStalenessS: 3600 });
  const projection = client.projection;
  projection.apply(gate.parseRecord({ type: "view", org_id: "org_1", shard: 0, epoch: 1, seq: 1, valid_until_us: null,
    view: { ...HEALTHY, active_leases: 5, max_concurrent: 5 } }));
  const now = projection.mono();
  projection.clock(0, now + 1_000_000_000, now + 10, now);
  projection.heard(0, now + 1_000_000_000);
  const made = gate.toResources({ quantity: 1 });
  assert.ok(Object.isFrozen(made), "toResources's answer cannot be changed afterwards");
  assert.equal(client.local("org_1", "create", made)?.reason, "concurrency_limit");
  // By hand, not through toResources: a negative quantity would slip under the cap.
  assert.throws(() => client.local("org_1", "create", { ...gate.NO_RESOURCES, quantity: -5 }), TypeError);
  assert.throws(() => client.local("org_1", "create", { ...gate.NO_RESOURCES, region: "us\ud800" }), TypeError);
  assert.equal(client.local("org_1", "create", { ...gate.NO_RESOURCES, quantity: 1 })?.reason, "concurrency_limit");
  assert.equal(gate.toResources({ region: "\u{1F600}".repeat(64) }).region.length, 128, "a pair is one character");
});

test("the vectors reach every reason, so a port that never answers one of them fails", () => {
  const reasons = new Set(VECTORS.cases.map((c) => c.decision.reason));
  assert.deepEqual([...reasons].sort(), Object.keys(gate.STATUS_BY_REASON).sort());
});

const HEALTHY = VECTORS.cases.find((c) => c.decision.reason === "ok" && c.action === "create").view;

test("an unknown action is refused, never allowed", () => {
  assert.throws(() => gate.decide("delete", gate.NO_RESOURCES, HEALTHY), RangeError);
});

test("resources in another shape are a TypeError that names the fields", () => {
  assert.throws(() => gate.toResources([1]), /HTTP body's field names/);
  assert.throws(() => gate.toResources({ disk: 1 }), /no field "disk".*disk_mb/);
  assert.throws(() => gate.toResources({ disk_mb: "1" }), /must be an integer/);
  assert.throws(() => gate.toResources({ region: 5 }), /must be null or 1 to 64 characters/);
  assert.deepEqual(gate.toResources({ region: null, quantity: 3 }), { ...gate.NO_RESOURCES, quantity: 3 });
});

test("a view with an integer JavaScript cannot hold exactly is refused, not decided from", () => {
  assert.throws(() => gate.parseView({ ...HEALTHY, balance_micros: 2 ** 53 }), /safe integer/);
  assert.throws(() => gate.parseView({ ...HEALTHY, halted: "maybe" }), /halted/);
  assert.throws(() => gate.parseView({ ...HEALTHY, suspended: undefined }), /suspended/);
  assert.equal(gate.parseView({ ...HEALTHY, added_later: 1 }).balance_micros, HEALTHY.balance_micros);
});

test("a region named like an Object property is no machine quota", () => {
  const view = { ...HEALTHY, machine_quotas: { r: { t: 1 } }, machine_in_use: null };
  const decision = gate.decide("create", gate.toResources({ region: "constructor", machine_type: "name" }), view);
  assert.equal(decision.reason, "ok");
});

test("limits near 2^53 compare exactly", () => {
  const big = Number.MAX_SAFE_INTEGER;
  const view = { ...HEALTHY, active_leases: big, max_concurrent: big };
  assert.equal(gate.decide("create", gate.toResources({ quantity: 1 }), view).reason, "concurrency_limit");
  // decide() holds for any integers (the bounds are the edge's): quantity 0 fits exactly
  assert.equal(gate.decide("create", { ...gate.NO_RESOURCES, quantity: 0 }, view).reason, "ok");
});

test("a shadow org with no money is allowed locally, with what an enforced one would get", () => {
  const client = new gate.GateClient({ url: "http://127.0.0.1:1", token: "unused", maxStalenessS: 3600 });
  const projection = client.projection;
  const broke = { ...HEALTHY, balance_micros: 0, quota_remaining_micros: 0, needs_card: true };
  projection.apply(gate.parseRecord({ type: "view", org_id: "org_s", shard: 0, epoch: 1, seq: 1, valid_until_us: null,
    view: { ...broke, shadow: true } }));
  projection.apply(gate.parseRecord({ type: "view", org_id: "org_e", shard: 0, epoch: 1, seq: 1, valid_until_us: null,
    view: broke }));
  const now = projection.mono();
  projection.clock(0, now + 1_000_000_000, now + 10, now);
  projection.heard(0, now + 1_000_000_000);
  const shadow = client.local("org_s", "create", gate.NO_RESOURCES);
  assert.equal(shadow?.source, "local");
  assert.equal(shadow.allowed, true);
  assert.equal(shadow.reason, "ok");
  assert.equal(shadow.decision.would_allow, false);
  assert.equal(shadow.decision.would_reason, "no_payment_method");
  const enforced = client.local("org_e", "create", gate.NO_RESOURCES);
  assert.equal(enforced.allowed, false);
  assert.equal(enforced.reason, "no_payment_method");
  assert.equal("would_allow" in enforced.decision, false);
  assert.equal(gate.parseView(broke).shadow, false, "an absent shadow reads as false");
  assert.throws(() => gate.parseView({ ...HEALTHY, shadow: null }), /shadow/);
});
