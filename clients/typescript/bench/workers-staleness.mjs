// The Workers pattern's staleness against a running metergate (bench/gateways.py starts it): a
// Worker in workerd (test/live/gate-worker.mjs, gating with isolateGate, bound 1 s) is asked
// about one org every POLL_MS by this script, as traffic would; CHANGES times, after a pause of
// PAUSE_MS plus up to JITTER_MS at random (still polling; the jitter spans several of the
// isolate's refresh cycles, so a change lands anywhere in one), the org is halted or resumed
// (alternately) through the admin API, and the time from the admin answer (the change is
// committed then) to the end of the Worker's first local answer showing it is taken: an upper
// bound; the start of the request before it is the lower bound (the resolution is one poll).
// Env: METERGATE_URL, METERGATE_SERVICE_TOKEN, METERGATE_ADMIN_TOKEN, METERGATE_ORG (not halted),
// METERGATE_CHANGES (default 50), METERGATE_POLL_MS (10), METERGATE_PAUSE_MS (250), METERGATE_JITTER_MS (2000).
// Prints one JSON line (times in ms); exits 1 with the reason when a change takes over 10 s.
import { gateMiniflare } from "../test/live/helpers.mjs";


const env = process.env;
const { METERGATE_URL: url, METERGATE_SERVICE_TOKEN: token, METERGATE_ADMIN_TOKEN: adminToken, METERGATE_ORG: org } = env;
const CHANGES = Number(env.METERGATE_CHANGES ?? 50);
const POLL_MS = Number(env.METERGATE_POLL_MS ?? 10);
const PAUSE_MS = Number(env.METERGATE_PAUSE_MS ?? 250);
const JITTER_MS = Number(env.METERGATE_JITTER_MS ?? 2000);
const GIVE_UP_MS = 10_000;

const mf = await gateMiniflare(url, token);

const sleep = (ms) => new Promise((resolve) => setTimeout(resolve, ms));
const polls = { n: 0, local: 0, ageS: [] };
/** One request to the Worker: its answer, when it was sent and when its response had been read. */
async function ask() {
  const start = performance.now();
  const response = await mf.dispatchFetch(`http://worker.local/check?org=${encodeURIComponent(org)}&action=create`);
  const text = await response.text();
  if (response.status !== 200) throw new Error(`the Worker answered ${response.status}: ${text}`);
  const { answer, counters } = JSON.parse(text);
  const end = performance.now();
  polls.n += 1;
  if (answer.source === "local") {
    polls.local += 1;
    polls.ageS.push(answer.ageS);
  }
  return { answer, counters, start, end };
}

async function admin(path) {
  const response = await fetch(`${url}${path}`, { method: "POST", headers: { Authorization: `Bearer ${adminToken}` } });
  if (!response.ok) throw new Error(`${path}: ${response.status} ${await response.text()}`);
}

const pct = (values, p) => {
  const sorted = [...values].sort((a, b) => a - b);
  return sorted[Math.min(sorted.length - 1, Math.ceil(p * sorted.length) - 1)];
};
const round = (ms) => Math.round(ms * 10) / 10;

try {
  const first = await ask();
  if (first.answer.source !== "local" || first.answer.reason !== "ok") {
    throw new Error(`the isolate's first answer is not a local ok: ${JSON.stringify(first.answer)}`);
  }
  const upper = [];
  const lower = [];
  for (let change = 0; change < CHANGES; change++) {
    const resumeAt = performance.now() + PAUSE_MS + JITTER_MS * Math.random();
    while (performance.now() < resumeAt) {
      await ask();
      await sleep(POLL_MS);
    }
    const [path, reason] = change % 2 === 0 ? ["halt", "halted"] : ["resume", "ok"];
    await admin(`/v1/orgs/${encodeURIComponent(org)}/${path}`);
    const answered = performance.now();
    let before = answered;
    for (;;) {
      const { answer, start, end } = await ask();
      if (answer.source === "local" && answer.reason === reason) {
        upper.push(end - answered);
        lower.push(Math.max(0, before - answered));
        break;
      }
      before = start;
      if (end - answered > GIVE_UP_MS) throw new Error(`no local ${reason} ${GIVE_UP_MS} ms after the ${path}: ${JSON.stringify(answer)}`);
      await sleep(POLL_MS);
    }
  }
  if (CHANGES % 2 === 1) await admin(`/v1/orgs/${encodeURIComponent(org)}/resume`);
  const { counters } = await ask();
  console.log(JSON.stringify({
    changes: upper.length, poll_ms: POLL_MS, pause_ms: PAUSE_MS, jitter_ms: JITTER_MS,
    p50_ms: round(pct(upper, 0.5)), p99_ms: round(pct(upper, 0.99)), max_ms: round(Math.max(...upper)),
    lower_p50_ms: round(pct(lower, 0.5)), lower_p99_ms: round(pct(lower, 0.99)),
    each_ms: upper.map(round), lower_each_ms: lower.map(round),
    polls: polls.n, local_polls: polls.local, local_age_p99_s: pct(polls.ageS, 0.99), counters,
  }));
} catch (error) {
  console.error(`FAILED: ${error.stack}`);
  process.exitCode = 1;
} finally {
  await mf.dispose();
}
