// Local checks per second and their latency in one Node thread: GateClient.local() on a
// projection holding ORGS current views (shard 0, its clock bounded), cycling through orgs and
// two resource shapes. No server: only the hot path is timed. `node bench/local-checks.mjs`
import { readFileSync } from "node:fs";

import { GateClient, parseFeedLine, toResources } from "../dist/index.js";

const ORGS = 10_000;
const CHECKS = 5_000_000;
const SAMPLES = 200_000;
const VECTORS = JSON.parse(readFileSync(new URL("../../vectors/gate_decisions.json", import.meta.url), "utf8"));
const VIEW = VECTORS.cases.find((c) => c.decision.reason === "ok" && c.action === "create").view;

const client = new GateClient({ url: "http://127.0.0.1:1", token: "unused", maxStalenessS: 3600 });
const projection = client.projection;
const orgs = Array.from({ length: ORGS }, (_, i) => `org_${i}`);
for (const [i, org] of orgs.entries()) {
  projection.apply(parseFeedLine(JSON.stringify({ type: "view", org_id: org, shard: 0, epoch: 1, seq: i + 1,
    valid_until_us: null, view: VIEW })));
}
const now = projection.mono();
projection.clock(0, now + 1_000_000_000, now + 10, now);
projection.heard(0, now + 1_000_000_000);
const shapes = [toResources(null), toResources({ memory_mb: 4096, disk_mb: 1024, quantity: 1 })];
if (client.local(orgs[0], "create", shapes[1])?.source !== "local") throw new Error("not decided locally");

let allowed = 0;
const started = process.hrtime.bigint();
for (let i = 0; i < CHECKS; i++) allowed += client.local(orgs[i % ORGS], "create", shapes[i & 1]).allowed ? 1 : 0;
const elapsedS = Number(process.hrtime.bigint() - started) / 1e9;

const latencies = new Float64Array(SAMPLES);
for (let i = 0; i < SAMPLES; i++) {
  const t0 = process.hrtime.bigint();
  client.local(orgs[i % ORGS], "wake", shapes[i & 1]);
  latencies[i] = Number(process.hrtime.bigint() - t0) / 1000;
}
latencies.sort();
const at = (p) => latencies[Math.min(SAMPLES - 1, Math.floor(p * SAMPLES))];
console.log(JSON.stringify({ node: process.version, orgs: ORGS, checks: CHECKS, allowed,
  checks_per_s: Math.round(CHECKS / elapsedS), p50_us: at(0.5), p99_us: at(0.99), p999_us: at(0.999) }));
