// The gate vectors inside the real Workers runtime: Miniflare starts workerd (the binary its
// npm package ships) with the built client and test/vectors.mjs as ES modules, and the
// worker decides every case; then the capability token vectors (test/captoken-vectors.mjs),
// verified with workerd's own WebCrypto Ed25519. Exit code 0 when every case passes, 1 with
// the failures listed.
import { readFileSync } from "node:fs";
import { fileURLToPath } from "node:url";

import { Miniflare } from "miniflare";

import { tokenCases } from "../captoken-vectors.mjs";

const root = fileURLToPath(new URL("../..", import.meta.url));
const vectorsText = readFileSync(new URL("../../../vectors/gate_decisions.json", import.meta.url), "utf8");
const tokensText = readFileSync(new URL("../../../vectors/capability_tokens.json", import.meta.url), "utf8");

const mf = new Miniflare({
  modules: true,
  scriptPath: `${root}test/workerd/vectors-worker.mjs`,
  modulesRoot: root,
  modulesRules: [{ type: "ESModule", include: ["**/*.js", "**/*.mjs"] }],
  compatibilityDate: "2025-09-01",
});
try {
  const response = await mf.dispatchFetch("http://vectors.local/", { method: "POST", body: vectorsText });
  const result = await response.json();
  if (!String(result.runtime).includes("Cloudflare-Workers")) {
    throw new Error(`not the Workers runtime: navigator.userAgent is ${result.runtime}`);
  }
  const vectors = JSON.parse(vectorsText);
  const total = vectors.cases.length;
  const readings = vectors.view_readings.length + vectors.resource_readings.length;
  if (result.cases !== total) throw new Error(`workerd ran ${result.cases} of ${total} vectors`);
  if (result.readings !== readings) throw new Error(`workerd ran ${result.readings} of ${readings} readings`);
  if (result.failures.length > 0) {
    console.error(`workerd: ${result.failures.length} of ${total} gate vectors and ${readings} readings fail; the first:`);
    console.error(JSON.stringify(result.failures.slice(0, 3), null, 1));
    process.exitCode = 1;
  } else {
    console.log(`workerd (${result.runtime}): all ${total} gate vectors pass, and all ${readings} readings`);
  }
  const tokens = await (await mf.dispatchFetch("http://vectors.local/tokens", { method: "POST", body: tokensText })).json();
  const tokenVectors = JSON.parse(tokensText);
  const tokenTotal = tokenCases(tokenVectors).length;
  const inFile = tokenVectors.cases.length;
  if (tokens.cases !== tokenTotal) throw new Error(`workerd ran ${tokens.cases} of ${tokenTotal} token vectors`);
  if (tokens.failures.length > 0) {
    console.error(`workerd: ${tokens.failures.length} of ${tokenTotal} capability token vectors fail; the first:`);
    console.error(JSON.stringify(tokens.failures.slice(0, 3), null, 1));
    process.exitCode = 1;
  } else {
    console.log(`workerd (${tokens.runtime}): all ${inFile} capability token vectors pass, and ${tokenTotal - inFile} made from them`);
  }
} finally {
  await mf.dispose();
}
