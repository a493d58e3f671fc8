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

// Same keys (none missing, none extra), same values: what the protocol asks of a port (section 7).
function sameJson(a, b) {
  return JSON.stringify(canonical(a)) === JSON.stringify(canonical(b));
}

function canonical(value) {
  if (Array.isArray(value)) return value.map(canonical);
  if (value === null || typeof value !== "object") return value;
  return Object.fromEntries(Object.keys(value).sort().map((key) => [key, canonical(value[key])]));
}
