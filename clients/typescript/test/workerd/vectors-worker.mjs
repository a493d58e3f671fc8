// Runs inside workerd: POST the gate vectors file to / and get back {runtime, cases, failures};
// POST the capability token vectors file to /tokens and get back the same for them.
import * as gate from "../../dist/index.js";
import { failingTokenVectors, tokenCases } from "../captoken-vectors.mjs";
import { failingReadings, failingVectors } from "../vectors.mjs";

export default {
  async fetch(request) {
    const vectors = await request.json();
    if (new URL(request.url).pathname === "/tokens") {
      const cases = tokenCases(vectors);
      const failures = await failingTokenVectors(gate, vectors, cases);
      return Response.json({ runtime: navigator.userAgent, cases: cases.length, failures });
    }
    const failures = [...failingVectors(gate, vectors.cases), ...failingReadings(gate, vectors)];
    const readings = vectors.view_readings.length + vectors.resource_readings.length;
    return Response.json({ runtime: navigator.userAgent, cases: vectors.cases.length, readings, failures });
  },
};
