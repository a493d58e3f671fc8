// The Workers pattern in workerd with the server gone (tests/test_typescript_client.py starts
// metergate): a Worker (gate-worker.mjs: isolateGate, bound 1 s, create "closed", the other
// actions "server") reaches metergate through a loopback TCP relay this script owns and cuts.
// Expected: before the cut, local answers; after it, local answers only while the views'
// age (some of it already spent at the cut) is within the bound, never older, then each
// action's policy: create denied at once (closed), wake and ingest denied as unavailable (the
// server they ask cannot be reached), and never local again. Env as node-live.mjs. Prints one
// JSON line; exits 1 with the reason on the first failed expectation. METERGATE_TRACE=FILE
// writes every answer there (action, source, age, request time, counters).
import assert from "node:assert/strict";
import { writeFileSync } from "node:fs";

import { gateWorker, relayTo, sleep } from "./helpers.mjs";

const { METERGATE_URL: url, METERGATE_SERVICE_TOKEN: token, METERGATE_ORG: org } = process.env;
const BOUND_S = 1.0;

const relay = await relayTo(url);
const worker = await gateWorker(relay.url, token);
const answers = [];
async function ask(action = "create") {
  const body = await worker.ask(org, action);
  answers.push({ ...body.answer, action, at: Math.round(performance.now()), tookS: body.tookS, counters: body.counters });
  return body;
}

const result = {};
try {
  const first = await ask();
  assert.deepEqual([first.answer.source, first.answer.allowed], ["local", true], JSON.stringify(first));
  // A while of requests every 20 ms: the isolate refreshes in waitUntil as the views age,
  // more passes than the server's feed streams per token in the tests (8): each pass's stream
  // must be closed at the server.
  for (const until = performance.now() + 6000; performance.now() < until;) {
    const { answer } = await ask();
    assert.equal(answer.source, "local", `before the cut: ${JSON.stringify(answer)}`);
    await sleep(20);
  }

  const atCut = (await ask()).answer;
  assert.equal(atCut.source, "local", JSON.stringify(atCut));
  result.age_at_cut_s = atCut.ageS;
  const beforeCut = answers.at(-1).counters;
  result.passes_before_cut = beforeCut.refreshes;
  assert.equal(beforeCut.refresh_errors, 0, `a pass failed before the cut: ${JSON.stringify(beforeCut)}`);
  assert.ok(beforeCut.refreshes > 8, JSON.stringify(beforeCut));
  const gone = performance.now();
  relay.close();

  // Until the first answer by policy: each local one from a view within the bound.
  for (;;) {
    const asked = performance.now();
    const { answer } = await ask();
    if (answer.source === "local") {
      assert.ok(answer.ageS <= BOUND_S, `a local answer from a view ${answer.ageS} s old`);
      assert.ok(performance.now() - gone < 10_000, `still local 10 s after the cut: ${JSON.stringify(answer)}`);
      await sleep(20);
      continue;
    }
    // When that request was sent: the decision came after it.
    result.gone_to_policy_s = (asked - gone) / 1000;
    result.first_policy = answer;
    break;
  }
  result.local_after_cut = answers.filter((a) => a.at >= gone && a.source === "local").length;
  assert.ok(result.age_at_cut_s + result.gone_to_policy_s >= BOUND_S - 0.05,
    `policy ${result.gone_to_policy_s} s after the cut with views ${result.age_at_cut_s} s old then: before the bound`);
  assert.deepEqual([result.first_policy.allowed, result.first_policy.reason], [false, "unavailable"]);

  // Then every action by its policy, for a while: never local again.
  const taken = [];
  for (const until = performance.now() + 1000; performance.now() < until;) {
    for (const action of ["create", "wake", "ingest"]) {
      const { answer } = await ask(action);
      assert.deepEqual([answer.source, answer.allowed, answer.reason], ["policy", false, "unavailable"],
        `${action} with the server gone: ${JSON.stringify(answer)}`);
      taken.push(answers.at(-1).tookS);
    }
    await sleep(20);
  }
  result.policy_answers = taken.length;
  result.policy_request_s = { max: Math.max(...taken) };
  result.counters = answers.at(-1).counters;
  assert.ok(result.counters.policy_closed >= taken.length + 1, JSON.stringify(result.counters));
  assert.ok(result.counters.refresh_errors > 0, JSON.stringify(result.counters));
  result.answers = answers.length;
  console.log(JSON.stringify(result));
} catch (error) {
  console.error(`FAILED: ${error.stack}`);
  const trace = answers.slice(-40).map(({ at, action, source, reason, ageS, tookS, counters }) =>
    `${at} ${action} ${source} ${reason} ${ageS} took=${tookS.toFixed(3)} r=${counters.refreshes} e=${counters.refresh_errors}`);
  console.error(trace.join("\n"));
  process.exitCode = 1;
} finally {
  if (process.env.METERGATE_TRACE) writeFileSync(process.env.METERGATE_TRACE, answers.map(({ at, action, source, reason, ageS, tookS, counters: c }) =>
    `${at} ${action} ${source} ${reason} ${ageS} took=${tookS.toFixed(3)} r=${c.refreshes} e=${c.refresh_errors} lines=${c.feed_lines}`).join("\n") + "\n");
  relay.close();
  await worker.dispose();
}
