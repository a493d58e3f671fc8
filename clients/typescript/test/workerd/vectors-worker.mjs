// Runs inside workerd: POST the vectors file, get back {runtime, cases, failures}.
import * as gate from "../../dist/index.js";
import { failingReadings, failingVectors } from "../vectors.mjs";

export default {
  async fetch(request) {
    const vectors = await request.json();
    const failures = [...failingVectors(gate, vectors.cases), ...failingReadings(gate, vectors)];
    const readings = vectors.view_readings.length + vectors.resource_readings.length;
    return Response.json({ runtime: navigator.userAgent, cases: vectors.cases.length, readings, failures });
  },
};
