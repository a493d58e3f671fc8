// The projection's rules (docs/gate-protocol.md 8.1, 8.2, 8.6) on records and heartbeats as
// the feed writes them, with a clock the test moves.
import assert from "node:assert/strict";
import { readFileSync } from "node:fs";
import test from "node:test";

import { Projection, UNREADABLE, formatCursor, parseCursor, parseFeedLine } from "../dist/index.js";

const VECTORS = JSON.parse(readFileSync(new URL("../../vectors/gate_decisions.json", import.meta.url), "utf8"));
const VIEW = VECTORS.cases.find((c) => c.decision.reason === "ok" && c.action === "create").view;
const SHARD_OFFSET_US = 1_800_000_000_000_000; // the shard's clock, far from ours: only offsets matter

function record(orgId, { shard = 0, epoch = 1, seq = 1, validUntilUs = null, view = VIEW } = {}) {
  return parseFeedLine(JSON.stringify({ type: "view", org_id: orgId, shard, epoch, seq, valid_until_us: validUntilUs, view }));
}

/** A projection on a clock the test moves; shard 0's clock timed by a 2 ms round trip at 0. */
function timed() {
  const clock = { us: 10_000_000 };
  const projection = new Projection(null, () => clock.us);
  projection.clock(0, clock.us + SHARD_OFFSET_US + 1_000, clock.us + 2_000, clock.us);
  return { clock, projection, shardNow: () => clock.us + SHARD_OFFSET_US };
}

test("a record replaces the org's view only when its (epoch, seq) is greater", () => {
  const projection = new Projection();
  assert.equal(projection.apply(record("o", { seq: 5 })), true);
  assert.equal(projection.apply(record("o", { seq: 4 })), false);
  assert.equal(projection.apply(record("o", { seq: 5 })), false);
  assert.equal(projection.apply(record("o", { epoch: 2, seq: 1 })), true);
  assert.equal(projection.get("o").epoch, 2);
});

test("after a resync, every record of that shard is gone and a late one below the floor is refused", () => {
  const projection = new Projection();
  projection.apply(record("a", { shard: 0, seq: 3 }));
  projection.apply(record("b", { shard: 1, seq: 3 }));
  projection.reset(0, 1, 10, true);
  assert.equal(projection.get("a"), undefined);
  assert.equal(projection.get("b").seq, 3, "another shard's records stay");
  assert.equal(projection.apply(record("a", { shard: 0, seq: 9 })), false, "a reply in flight from before");
  assert.equal(projection.apply(record("a", { shard: 0, seq: 10 })), true);
});

test("a shard's feed in a new epoch drops the records of the old one", () => {
  const projection = new Projection();
  projection.advance(0, 1, 5, [record("a", { seq: 5 })]);
  projection.advance(0, 2, 1, [record("b", { epoch: 2, seq: 1 })]);
  assert.equal(projection.get("a"), undefined);
  assert.equal(projection.apply(record("a", { epoch: 1, seq: 6 })), false, "of an incarnation that is gone");
});

test("a view is current only while its shard was heard within the bound, in the shard's time", () => {
  const { clock, projection, shardNow } = timed();
  projection.apply(record("o"));
  assert.equal(projection.current("o", 1), null, "never heard");
  projection.heard(0, shardNow());
  assert.ok(projection.current("o", 1).ageS <= 0.002);
  clock.us += 900_000;
  assert.ok(projection.current("o", 1) !== null);
  clock.us += 200_000;
  assert.equal(projection.current("o", 1), null, "1.1 s old against a 1 s bound");
});

test("delay on the way counts as age: a heartbeat written 2 s ago is 2 s old when read", () => {
  const { clock, projection, shardNow } = timed();
  projection.apply(record("o"));
  clock.us += 5_000_000;
  // The line says the feed was complete as of 2 s ago and arrives only now.
  projection.clock(0, shardNow() - 2_000_000, clock.us);
  projection.heard(0, shardNow() - 2_000_000);
  assert.equal(projection.current("o", 1), null);
  assert.ok(Math.abs(projection.ageS(0) - 2) < 0.01, String(projection.ageS(0)));
});

test("a view is not current at or past its valid_until, even when just heard", () => {
  const { clock, projection, shardNow } = timed();
  projection.apply(record("o", { validUntilUs: shardNow() + 100_000 }));
  projection.heard(0, shardNow());
  assert.ok(projection.current("o", 5) !== null);
  clock.us += 100_000;
  projection.heard(0, shardNow());
  assert.equal(projection.current("o", 5), null);
});

test("one-way clock samples alone never make a shard current; a round trip older than 20 s stops it", () => {
  const clock = { us: 0 };
  const projection = new Projection(null, () => clock.us);
  projection.apply(record("o"));
  projection.clock(0, SHARD_OFFSET_US, clock.us);
  projection.heard(0, SHARD_OFFSET_US);
  assert.equal(projection.current("o", 1), null);
  projection.clock(0, SHARD_OFFSET_US + 500, clock.us + 1_000, clock.us);
  projection.heard(0, SHARD_OFFSET_US + 500);
  assert.ok(projection.current("o", 1) !== null);
  clock.us += 20_001_000; // the round trip's answer came at 1 ms
  projection.heard(0, SHARD_OFFSET_US + clock.us);
  projection.expireClocks();
  assert.equal(projection.current("o", 1), null);
});

test("cursors round-trip and refuse what is not one", () => {
  assert.deepEqual(parseCursor("3:1040,-,7:88"), [[3, 1040], null, [7, 88]]);
  assert.equal(formatCursor(parseCursor("3:1040,-,7:88")), "3:1040,-,7:88");
  assert.throws(() => parseCursor("3:"), /not a cursor/);
  assert.throws(() => parseCursor("99999999999999999:1"), /not a cursor/, "above 2^53");
});

test("feed lines are checked: an integer above 2^53 in the envelope is refused, a bad view unreadable, unknown fields ignored", () => {
  assert.throws(() => record("o", { seq: 2 ** 53 }), /bad shard, epoch or seq/);
  assert.equal(record("o", { view: { ...VIEW, max_disk_mb: 1.5 } }).valid_until_us, UNREADABLE, "a bad view: unreadable");
  const beat = parseFeedLine('{"type":"heartbeat","cursor":"1:2,-","now_us":[5,null],"as_of_us":[4,null],"new":1}');
  assert.deepEqual(beat.as_of_us, [4, null]);
  assert.equal(parseFeedLine('{"type":"resync","shard":null,"reason":"x"}').shard, null);
  assert.throws(() => parseFeedLine('{"type":"gossip"}'), /not a feed line/);
});
