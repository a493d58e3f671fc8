// The Workers pattern in workerd against a running metergate (tests/test_typescript_client.py
// starts it): a Worker (gate-worker.mjs) gates with isolateGate; this script asks it about an
// org every 20 ms, halts and resumes the org through the admin API, and measures how long each
// change takes to reach the Worker's local decision (the pattern's staleness). Expected: within
// the bound (1 s) every time; no local answer older than the bound; after a quiet spell the
// first request waits for one pass and answers locally. Env as node-live.mjs. Prints one JSON
// line; exits 1 with the reason on the first failed expectation.
import assert from "node:assert/strict";
import { gateMiniflare } from "./helpers.mjs";


const { METERGATE_URL: url, METERGATE_SERVICE_TOKEN: token, METERGATE_ADMIN_TOKEN: adminToken, METERGATE_ORG: org } = process.env;
const BOUND_S = 1.0;
const ROUNDS = Number(process.env.METERGATE_ROUNDS ?? 4);

const mf = await gateMiniflare(url, token);

const answers = [];
async function ask(action = "create") {
  const response = await mf.dispatchFetch(`http://worker.local/check?org=${encodeURIComponent(org)}&action=${action}`);
  const text = await response.text();
  assert.equal(response.status, 200, `the Worker answered ${response.status}: ${text}`);
  const body = JSON.parse(text);
  answers.push({ ...body.answer, at: Math.round(performance.now()), counters: body.counters });
  return body;
}

async function admin(path) {
  const response = await fetch(`${url}${path}`, { method: "POST", headers: { Authorization: `Bearer ${adminToken}` } });
  assert.ok(response.ok, `${path}: ${response.status} ${await response.text()}`);
}

/** Seconds from now until the Worker answers locally with `reason` (the answer's own time
 * counted: the change was visible at its end at the latest); fails past 10 s. */
async function localWithin(reason) {
  const started = performance.now();
  for (;;) {
    const { answer } = await ask();
    if (answer.source === "local" && answer.reason === reason) return (performance.now() - started) / 1000;
    assert.ok(performance.now() - started < 10_000, `no local ${reason} in 10 s: ${JSON.stringify(answer)}`);
    await new Promise((resolve) => setTimeout(resolve, 20));
  }
}

const percentile = (values, p) => [...values].sort((a, b) => a - b)[Math.min(values.length - 1, Math.ceil(p * values.length) - 1)];

const result = {};
try {
  const first = await ask();
  assert.equal(first.answer.source, "local", `the isolate's first request waits for one pass: ${JSON.stringify(first)}`);
  assert.equal(first.answer.allowed, true);
  assert.ok(first.counters.snapshots >= 2, JSON.stringify(first.counters));

  const staleness = [];
  for (let round = 0; round < ROUNDS; round++) {
    // From the admin answer (the change is committed then) to the Worker's first local answer with it.
    await admin(`/v1/orgs/${org}/halt`);
    staleness.push(await localWithin("halted"));
    await admin(`/v1/orgs/${org}/resume`);
    staleness.push(await localWithin("ok"));
  }
  result.change_to_local_s = { n: staleness.length, p50: percentile(staleness, 0.5), max: Math.max(...staleness),
    each: staleness.map((s) => Math.round(s * 1000) / 1000) };
  assert.ok(result.change_to_local_s.max <= BOUND_S, `a change took ${result.change_to_local_s.max} s to reach the Worker`);

  await new Promise((resolve) => setTimeout(resolve, (BOUND_S + 0.3) * 1000));
  const refreshes = (await ask()).counters.refreshes;
  const afterQuiet = answers.at(-1);
  assert.equal(afterQuiet.source, "local", `after a quiet spell: ${JSON.stringify(afterQuiet)}`);
  assert.ok(afterQuiet.ageS < BOUND_S, JSON.stringify(afterQuiet));

  const local = answers.filter((a) => a.source === "local");
  assert.ok(local.every((a) => a.ageS <= BOUND_S), "a local answer from a view older than the bound");
  result.local_age_s = { n: local.length, p50: percentile(local.map((a) => a.ageS), 0.5),
    p99: percentile(local.map((a) => a.ageS), 0.99) };
  result.answers = answers.length;
  result.refreshes = refreshes;
  console.log(JSON.stringify(result));
} catch (error) {
  console.error(`FAILED: ${error.stack}`);
  const trace = answers.slice(-70).map(({ at, source, reason, ageS, counters }) =>
    `${at} ${source} ${reason} ${ageS} r=${counters.refreshes} e=${counters.refresh_errors} s=${counters.snapshots} rs=${counters.resyncs}`);
  console.error(trace.join("\n"));
  process.exitCode = 1;
} finally {
  await mf.dispose();
}
