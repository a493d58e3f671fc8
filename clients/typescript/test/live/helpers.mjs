// Helpers the live scripts share: a TCP relay the script can cut, and the gate Worker
// (gate-worker.mjs) started in workerd by miniflare.
import assert from "node:assert/strict";
import net from "node:net";
import { fileURLToPath } from "node:url";

/** A TCP relay to the service that close() cuts for good: every connection reset, no new one.
 * A connection that either side closes is closed on the other side too (a half-closed
 * upstream would hold the server's feed stream open, and the server caps streams per token). */
export async function relayTo(target) {
  const { hostname, port } = new URL(target);
  const sockets = new Set();
  const server = net.createServer((client) => {
    const upstream = net.connect(Number(port), hostname);
    for (const [socket, peer] of [[client, upstream], [upstream, client]]) {
      sockets.add(socket);
      socket.on("close", () => {
        sockets.delete(socket);
        peer.destroy();
      });
      socket.on("error", () => undefined);
    }
    client.pipe(upstream).pipe(client);
  });
  await new Promise((resolve) => server.listen(0, "127.0.0.1", resolve));
  return {
    url: `http://127.0.0.1:${server.address().port}`,
    close() {
      server.close();
      for (const socket of sockets) socket.destroy();
    },
  };
}

/** gate-worker.mjs in workerd, reaching metergate at `url`; ask(org, action) is one request
 * to it, resolving to {answer, counters, tookS} (tookS: the request's time, seen from Node). */
export async function gateWorker(url, token) {
  const mf = await gateMiniflare(url, token);
  return {
    async ask(org, action = "create") {
      const started = performance.now();
      const response = await mf.dispatchFetch(`http://worker.local/check?org=${encodeURIComponent(org)}&action=${action}`);
      const text = await response.text();
      assert.equal(response.status, 200, `the Worker answered ${response.status}: ${text}`);
      return { ...JSON.parse(text), tookS: (performance.now() - started) / 1000 };
    },
    dispose: () => mf.dispose(),
  };
}

/** gate-worker.mjs in workerd (Miniflare), reaching metergate at `url` with `token`. */
export async function gateMiniflare(url, token) {
  const { Miniflare } = await import("miniflare");
  const root = fileURLToPath(new URL("../..", import.meta.url));
  return new Miniflare({
    modules: true,
    scriptPath: `${root}test/live/gate-worker.mjs`,
    modulesRoot: root,
    modulesRules: [{ type: "ESModule", include: ["**/*.js", "**/*.mjs"] }],
    compatibilityDate: "2025-09-01",
    bindings: { METERGATE_URL: url, METERGATE_SERVICE_TOKEN: token },
  });
}

/** The server's own decision (POST /v1/gate) without its age. */
export async function serverDecision(url, token, org, action = "create") {
  const response = await fetch(`${url}/v1/gate`, { method: "POST", body: JSON.stringify({ org_id: org, action }),
    headers: { Authorization: `Bearer ${token}`, "Content-Type": "application/json" } });
  assert.equal(response.status, 200, `POST /v1/gate: ${response.status}`);
  const { age_ms: _age, ...decision } = await response.json();
  return decision;
}

export const sleep = (ms) => new Promise((resolve) => setTimeout(resolve, ms));
