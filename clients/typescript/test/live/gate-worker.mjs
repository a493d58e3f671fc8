// A Worker that gates with isolateGate (the per-isolate projection refreshed by cursor).
// GET /check?org=ORG&action=ACTION: {answer, age_s, counters}.
import { isolateGate } from "../../dist/workers.js";

export default {
  async fetch(request, env, ctx) {
    const gate = isolateGate({ url: env.METERGATE_URL, token: env.METERGATE_SERVICE_TOKEN, maxStalenessS: 1.0,
      policies: { create: "closed" } });
    const asked = new URL(request.url).searchParams;
    const answer = await gate.check(ctx, asked.get("org"), asked.get("action") ?? "create");
    return Response.json({ answer, counters: gate.counters() });
  },
};
