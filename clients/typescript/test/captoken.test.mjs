import assert from "node:assert/strict";
import { readFileSync } from "node:fs";
import test from "node:test";

import * as gate from "../dist/index.js";
import { failingTokenVectors, judged, tokenCases } from "./captoken-vectors.mjs";

const VECTORS = JSON.parse(readFileSync(new URL("../../vectors/capability_tokens.json", import.meta.url), "utf8"));
const NOW_S = VECTORS.now_s;
const named = (name) => VECTORS.cases.find((c) => c.name === name);
const verifierAt = (clock, options = {}) => gate.Verifier.fromKeySet(VECTORS.key_set,
  { leewayS: VECTORS.leeway_s, clock, ...options });

test("the verifier answers every capability token vector as written", async () => {
  assert.ok(VECTORS.cases.length >= 30, "the vectors file holds its cases");
  const failures = await failingTokenVectors(gate, VECTORS, VECTORS.cases);
  assert.deepEqual(failures.slice(0, 5), [], `${failures.length} of ${VECTORS.cases.length} token vectors fail`);
});

test("a signature with bytes after its 64, or spelled another way, is refused as in Python", async () => {
  const made = tokenCases(VECTORS).slice(VECTORS.cases.length);
  assert.equal(made.length, 3);
  const failures = await failingTokenVectors(gate, VECTORS, made);
  assert.deepEqual(failures, []);
});

test("the vectors reach every refusal, so a port that never answers one of them fails", () => {
  const refused = new Set(VECTORS.cases.map((c) => c.expect.refusal));
  assert.deepEqual(Object.values(gate.Refusal).filter((r) => !refused.has(r)), []);
  assert.ok(VECTORS.cases.some((c) => "claims" in c.expect));
});

test("a remembered token is still refused once it expires, for another org or for more than it grants", async () => {
  const valid = named("a lease's token, asked for less");
  let nowS = NOW_S;
  const verifier = await verifierAt(() => nowS);
  assert.ok("claims" in await judged(gate, verifier, valid));
  assert.equal(verifier.rememberedTokens, 1);
  assert.deepEqual(await judged(gate, verifier, { ...valid, org_id: "org_2" }), { refusal: "wrong_org" });
  assert.deepEqual(await judged(gate, verifier, { ...valid, requires: { memory_mb: 8192 } }), { refusal: "exceeds_grant" });
  nowS = valid.expect.claims.exp + VECTORS.leeway_s;
  assert.deepEqual(await judged(gate, verifier, valid), { refusal: "expired" });
});

test("a key dropped from the key set voids the tokens it signed, even remembered", async () => {
  const previous = named("signed with the previous key, still published");
  const verifier = await verifierAt(() => NOW_S);
  assert.ok("claims" in await judged(gate, verifier, previous));
  await verifier.setKeys({ keys: VECTORS.key_set.keys.filter((k) => k.kid !== previous.expect.kid) });
  assert.deepEqual(verifier.keyIds, VECTORS.key_set.keys.map((k) => k.kid).filter((k) => k !== previous.expect.kid));
  assert.deepEqual(await judged(gate, verifier, previous), { refusal: "unknown_key" });
});

test("the cache of checked signatures stays within its size", async () => {
  const verifier = await verifierAt(() => NOW_S, { cacheSize: 2 });
  for (const item of VECTORS.cases.filter((c) => "claims" in c.expect)) {
    assert.ok("claims" in await judged(gate, verifier, item), item.name);
  }
  assert.ok(verifier.rememberedTokens <= 2 && verifier.rememberedTokens > 0, `${verifier.rememberedTokens} remembered`);
});

test("each token has one spelling: the 15 other spellings of its signature's last character are refused", async () => {
  const token = named("a lease's token, asked for less").token;
  const verifier = await verifierAt(() => NOW_S, { cacheSize: 0 });
  const alphabet = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_";
  const last = alphabet.indexOf(token.at(-1));
  const answers = { malformed: 0, ok: 0 };
  for (let low = 0; low < 16; low++) { // 86 characters carry 516 bits, 4 more than 64 bytes
    const spelled = token.slice(0, -1) + alphabet[(last & ~15) | low];
    const got = await judged(gate, verifier, { token: spelled, org_id: "org_1", action: "create", requires: null });
    answers[got.refusal ?? "ok"] += 1;
  }
  assert.deepEqual(answers, { malformed: 15, ok: 1 });
});

test("resources in another shape than a create's are a TypeError, never compared as they are", async () => {
  const valid = named("a lease's token, asked for less");
  const verifier = await verifierAt(() => NOW_S);
  const asking = (resources) => verifier.verify(valid.token, { orgId: "org_1", action: "create", resources });
  await assert.rejects(asking({ memory_mb: "99999" }), TypeError);
  await assert.rejects(asking({ memory: 99999 }), TypeError);
  assert.equal((await asking({ memory_mb: 4096, quantity: 1 })).claims.lease_id, "lease_1");
});

test("a key set with a wrong kid or another curve is refused", async () => {
  const key = VECTORS.key_set.keys[0];
  await assert.rejects(gate.Verifier.fromKeySet({ keys: [{ ...key, kid: "someone-else" }] }), /not the key's own/);
  await assert.rejects(gate.Verifier.fromKeySet({ keys: [{ ...key, crv: "X25519" }] }), /not an Ed25519/);
  await assert.rejects(gate.Verifier.fromKeySet({ keys: [{ ...key, alg: null }] }), /not an Ed25519/);
  await assert.rejects(gate.Verifier.fromKeySet({ keys: [{ ...key, x: key.x.slice(0, -3) }] }), /not 32 bytes/);
});
