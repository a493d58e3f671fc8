// Runs inside workerd: POST the vectors file, get back {runtime, cases, failures}.
import * as gate from "../../dist/index.js";
import { failingVectors } from "../vectors.mjs";

export default {
  async fetch(request) {
    const vectors = await request.json();
    const failures = failingVectors(gate, vectors.cases);
    return Response.json({ runtime: navigator.userAgent, cases: vectors.cases.length, failures });
  },
};
