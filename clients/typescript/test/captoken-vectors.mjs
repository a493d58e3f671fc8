// Runs the capability token vectors (clients/vectors/capability_tokens.json) against the port
// of the Verifier (src/captoken.ts). Shared by the Node test and the worker that runs them
// inside workerd, so both runtimes execute the same comparison.
import { sameJson } from "./vectors.mjs";

/** The file's cases, and a few made from them that the file does not have yet, answered as
 * the Python verifier answers them: a signature with bytes after its 64 (workerd's verify()
 * throws on one where Node's answers false), and another spelling of a signature. */
export function tokenCases(vectors) {
  const lease = vectors.cases.find((c) => c.name === "a lease's token, asked for less");
  const alphabet = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_";
  const respelled = lease.token.slice(0, -1) + alphabet[alphabet.indexOf(lease.token.at(-1)) ^ 1];
  const made = [
    ["a signature of 65 bytes", `${lease.token}A`, { refusal: "bad_signature" }],
    ["a signature of 66 bytes", `${lease.token}AA`, { refusal: "bad_signature" }],
    ["the signature's last character spelled another way", respelled, { refusal: "malformed" }],
  ];
  return [...vectors.cases, ...made.map(([name, token, expect]) => ({ ...lease, name, token, expect }))];
}

/** Every case whose answer differs from the expected one, as {name, expected, got}: a fresh
 * verifier per case, at the file's now_s and leeway_s, as tests/test_capability_vectors.py
 * runs them. An error other than a CapabilityError counts as a failure with its message. */
export async function failingTokenVectors(gate, vectors, cases = tokenCases(vectors)) {
  const failures = [];
  for (const item of cases) {
    const verifier = await gate.Verifier.fromKeySet(vectors.key_set,
      { leewayS: vectors.leeway_s, clock: () => vectors.now_s });
    const got = await judged(gate, verifier, item);
    if (!sameJson(got, item.expect)) failures.push({ name: item.name, expected: item.expect, got });
  }
  return failures;
}

/** What the verifier answers for a case, in the vectors' terms. */
export async function judged(gate, verifier, item) {
  try {
    const capability = await verifier.verify(item.token,
      { orgId: item.org_id, action: item.action, resources: item.requires });
    return { claims: asPython(capability.claims), kid: capability.kid };
  } catch (error) {
    return error instanceof gate.CapabilityError ? { refusal: error.refusal } : { error: String(error) };
  }
}

// The claims as the vectors write them (Python's msgspec.to_builtins with omit_defaults): a
// null lease_id, tier or plan is left out, and so is each grant field at its default, and the
// grant itself when every field is.
const GRANT_DEFAULTS = { memory_mb: 0, cpu_count: 0, disk_mb: 0, machine_type: null, region: null, quantity: 1 };

function asPython(claims) {
  const out = { org_id: claims.org_id, action: claims.action, iat: claims.iat, exp: claims.exp };
  const grant = Object.fromEntries(Object.entries(claims.resources).filter(([name, value]) => GRANT_DEFAULTS[name] !== value));
  if (Object.keys(grant).length > 0) out.resources = grant;
  for (const name of ["lease_id", "tier", "plan"]) if (claims[name] !== null) out[name] = claims[name];
  return out;
}
