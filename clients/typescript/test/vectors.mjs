// Runs the gate vectors (clients/vectors/gate_decisions.json) against a port of decide().
// Shared by the Node test and the worker that runs them inside workerd: it imports nothing,
// so both runtimes execute the same comparison.

/** Every case whose decision differs from the expected one, as {name, expected, got}. A case
 * the port throws on counts as a failure with the error's message. */
export function failingVectors(gate, cases) {
  const failures = [];
  for (const item of cases) {
    let got;
    try {
      got = gate.decide(item.action, gate.toResources(item.resources), gate.parseView(item.view));
    } catch (error) {
      got = { error: String(error) };
    }
    if (!sameJson(got, item.decision)) failures.push({ name: item.name, expected: item.decision, got });
  }
  return failures;
}

/** Every view_readings and resource_readings case (docs/gate-protocol.md 7) the port reads
 * otherwise: a view inside a record through parseRecord (read null: the record is unreadable),
 * a body's resources through toResources (read null: it throws). As {name, expected, got}. */
export function failingReadings(gate, vectors) {
  const failures = [];
  for (const item of vectors.view_readings) {
    let got;
    try {
      const record = gate.parseRecord({ type: "view", org_id: "org_1", shard: 0, epoch: 1, seq: 1,
        valid_until_us: null, view: item.view });
      got = record.valid_until_us === gate.UNREADABLE ? null : record.view;
    } catch (error) {
      got = { error: String(error) };
    }
    if (!sameJson(got, item.read)) failures.push({ name: `view: ${item.name}`, expected: item.read, got });
  }
  for (const item of vectors.resource_readings) {
    let got;
    try {
      got = gate.toResources(item.resources);
    } catch (error) {
      got = error instanceof TypeError ? null : { error: String(error) };
    }
    if (!sameJson(got, item.read)) failures.push({ name: `resources: ${item.name}`, expected: item.read, got });
  }
  return failures;
}

// Same keys (none missing, none extra), same values: what the protocol asks of a port (section 7).
export function sameJson(a, b) {
  return JSON.stringify(canonical(a)) === JSON.stringify(canonical(b));
}

function canonical(value) {
  if (Array.isArray(value)) return value.map(canonical);
  if (value === null || typeof value !== "object") return value;
  return Object.fromEntries(Object.keys(value).sort().map((key) => [key, canonical(value[key])]));
}
