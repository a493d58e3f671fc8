/**
 * GateClient: gate decisions in the gateway's own process, from a live projection.
 *
 * A port of metergate_client/client.py for Node 20+ and Cloudflare Workers; it needs only
 * the platform's fetch and web streams. Two ways to keep the projection current:
 *
 * - follow(): a long-lived process (Node) follows GET /v1/gate/feed in the background,
 *   reconnecting with backoff, loads a shard's snapshot (GET /v1/gate/views?shard=)
 *   whenever the feed says that shard must be loaded, and times each shard's clock with
 *   GET /v1/gate/clock every CLOCK_PROBE_S. A shard that is down or reloading leaves every
 *   other shard's orgs decided locally.
 * - refresh(): one bounded pass, for a runtime where nothing outlives a request (Workers):
 *   from the last cursor, read the feed until every shard is proved current (loading the
 *   snapshots it asks for), time the clocks, and close the stream. See workers.ts.
 *
 * local() decides from the org's view with the same rules as the server (decision.ts) while
 * the view is current (docs/gate-protocol.md 8.6); check() falls back to the action's
 * policy: ask the server (with the same bound), fail closed, or fail open. Leases and usage
 * always go to the server; a lease answer's gate_view is applied at once.
 */

import { ACTIONS, NO_RESOURCES, checkedResources, decide, toResources, type Action, type Decision, type Resources, type ResourcesInput } from "./decision.js";
import {
  Projection, ProtocolError, parseCursor, parseFeedLine, parsePage, parseRecord, type Heartbeat, type MonoClock,
  type Position, type Resync, type ViewRecord, monoUs,
} from "./projection.js";

export type Policy = "server" | "closed" | "open";
export type Source = "local" | "server" | "policy";

/** A gate answer and where it came from. `ageS`: how old the view was when decided from it
 * (locally: in the shard's time; the server's: the age it stated plus the round trip;
 * Infinity when there was no view). `reason` is the decision's, or "unavailable" when the
 * policy decided; a refusal of the check by the server (unknown org) is its error code. */
export interface Answer {
  readonly allowed: boolean;
  readonly reason: string;
  readonly source: Source;
  readonly ageS: number;
  readonly decision: Decision | null;
}

export interface GateClientOptions {
  /** The service's base URL, e.g. "http://billing:8000". */
  readonly url: string;
  /** A service token (Authorization: Bearer). */
  readonly token: string;
  /** The staleness bound: a view older than this (in its shard's time) is not decided from. */
  readonly maxStalenessS?: number;
  /** Per action; the others get defaultPolicy. E.g. {ingest: "open", create: "closed"}. */
  readonly policies?: Partial<Record<Action, Policy>>;
  readonly defaultPolicy?: Policy;
  readonly timeoutS?: number;
  /** How often the feed proves itself current; keep it well under maxStalenessS. */
  readonly heartbeatS?: number;
  readonly pageSize?: number;
  /** Follow only orgs whose id begins with this (filtered by the server). */
  readonly prefix?: string;
  /** Another fetch (a Workers service binding's, a test's); default: the global one. */
  readonly fetch?: typeof fetch;
  /** Monotonic clock in µs (tests); default performance.now(). */
  readonly mono?: MonoClock;
}

export const CLOCK_PROBE_S = 2.0;
const BACKOFF_S = [0.1, 5.0] as const;
const WITH_VIEW = { Prefer: "return=representation" }; // a release answers 200 with the org's view, not 204

const COUNTER_NAMES = ["local", "server", "policy_open", "policy_closed", "stale", "feed_lines", "feed_errors",
  "resyncs", "reconnects", "snapshots", "snapshot_errors", "refreshes", "refresh_errors"] as const;
export type CounterName = (typeof COUNTER_NAMES)[number];

/** A read of the feed that ends once every shard is current (refresh) or never (follow). */
interface FeedRead {
  readonly untilCurrent: boolean;
  readonly signal: AbortSignal;
}

export class GateClient {
  readonly url: string;
  readonly maxStalenessS: number;
  readonly heartbeatS: number;
  readonly projection: Projection;
  private readonly policies: Record<Action, Policy>;
  private readonly headers: Record<string, string>;
  private readonly timeoutMs: number;
  private readonly pageSize: number;
  private readonly prefix: string;
  private readonly fetchImpl: typeof fetch;
  private readonly counts = Object.fromEntries(COUNTER_NAMES.map((name) => [name, 0])) as Record<CounterName, number>;
  private cursor: string | null = null;
  private shardCount: number | null = null;
  /** shard → the feed position its loaded snapshot holds: current only from a heartbeat past it */
  private readonly loaded = new Map<number, readonly [number, number]>();
  /** shard → the number of its latest load: a load that finishes after a newer one was asked
   * for (the shard resynced meanwhile) leaves no mark */
  private readonly generation = new Map<number, number>();
  private readonly loaders = new Map<number, Promise<void>>();
  private stopped = new AbortController();
  private following: Promise<void> | null = null;
  private clockTimer: ReturnType<typeof setInterval> | null = null;
  private syncedWaiters: (() => void)[] = [];
  private refreshing: Promise<boolean> | null = null;
  /** In a bounded pass, snapshots are loaded in line, within the pass: on Workers nothing
   * started by one request may go on into another. */
  private inline: Set<number> | null = null;
  /** The shards a bounded pass has heard "as of" from on its own stream: the pass ends only
   * when every shard has been (views merely still within the bound were proved by an
   * earlier pass, and would go on ageing). */
  private passHeard: Set<number> | null = null;

  constructor(options: GateClientOptions) {
    const unknown = Object.keys(options.policies ?? {}).filter((a) => !(ACTIONS as readonly string[]).includes(a));
    if (unknown.length > 0) throw new RangeError(`no such action: ${unknown.join(", ")}; actions are ${ACTIONS.join(", ")}`);
    this.url = options.url.replace(/\/+$/, "");
    this.maxStalenessS = options.maxStalenessS ?? 1.0;
    this.heartbeatS = options.heartbeatS ?? 0.25;
    this.timeoutMs = (options.timeoutS ?? 5.0) * 1000;
    this.pageSize = options.pageSize ?? 1000;
    this.prefix = options.prefix ?? "";
    const policy = options.defaultPolicy ?? "server";
    this.policies = Object.fromEntries(ACTIONS.map((a) => [a, options.policies?.[a] ?? policy])) as Record<Action, Policy>;
    this.headers = { Authorization: `Bearer ${options.token}` };
    // Called through a plain function: Workers' fetch throws "Illegal invocation" when called as a method.
    const fetchImpl = options.fetch ?? fetch;
    this.fetchImpl = (input, init) => fetchImpl(input, init);
    const prefix = this.prefix;
    this.projection = new Projection(prefix ? (orgId) => orgId.startsWith(prefix) : null, options.mono ?? monoUs);
  }

  // ----- gate checks ---------------------------------------------------------------------

  /** The decision from the org's current view, or null when it has none (no record, its
   * shard not proved current within maxStalenessS, or past the view's valid_until). The hot
   * path: synchronous, no I/O. Throws RangeError for an unknown action, and TypeError for
   * resources the server would refuse (made other than by toResources and out of bounds). */
  local(orgId: string, action: string, resources: Resources = NO_RESOURCES): Answer | null {
    const found = this.projection.current(orgId, this.maxStalenessS);
    if (found === null) {
      if (this.projection.get(orgId) !== undefined) this.counts.stale++;
      if (!Object.hasOwn(this.policies, action)) throw new RangeError(`no such action: ${JSON.stringify(action)}; actions are ${ACTIONS.join(", ")}`);
      return null;
    }
    const decision = decide(action, checkedResources(resources), found.record.view);
    this.counts.local++;
    return { allowed: decision.allowed, reason: decision.reason, source: "local", ageS: found.ageS, decision };
  }

  /** May the org do `action` now? Locally when its view is current, else by the action's
   * policy (which may ask the server). `resources`: the HTTP body's shape. Never rejects for
   * a server that is down: the policy answers then. */
  async check(orgId: string, action: string, resources?: ResourcesInput | null): Promise<Answer> {
    const asked = toResources(resources);
    const answer = this.local(orgId, action, asked);
    if (answer !== null) return answer;
    const policy = this.policies[action as Action];
    if (policy === "server") {
      const served = await this.askServer(orgId, action, asked);
      if (served !== null) return served;
    }
    return this.byPolicy(orgId, action as Action);
  }

  private async askServer(orgId: string, action: string, resources: Resources): Promise<Answer | null> {
    const sent = this.projection.mono();
    let response: Response;
    let body: unknown;
    try {
      // The server decides from its own views only while they are within our bound.
      response = await this.request("POST", "/v1/gate", {
        ...gateBody(orgId, action, resources), max_age_ms: Math.floor(this.maxStalenessS * 1000) });
      body = await response.json().catch(() => null);
    } catch {
      return null;
    }
    if (typeof body !== "object" || body === null) return null;
    const answer = body as Record<string, unknown>;
    const refused = typeof answer["error"] === "object" && answer["error"] !== null;
    if (response.status >= 500 || response.status === 401 || !("allowed" in answer || refused)) return null;
    // Not metergate's decision (a proxy's body, another version's shape): no answer; the policy decides.
    if ("allowed" in answer && (typeof answer["allowed"] !== "boolean" || typeof answer["reason"] !== "string")) {
      return null;
    }
    const stated = answer["age_ms"];
    const ageS = (this.projection.mono() - sent) / 1e6 + (Number.isSafeInteger(stated) ? (stated as number) / 1000 : 0);
    this.counts.server++;
    if (!("allowed" in answer)) {
      const code = String((answer["error"] as { code?: unknown }).code ?? "error");
      return { allowed: false, reason: code, source: "server", ageS, decision: null };
    }
    const { age_ms: _age, ...decision } = answer as unknown as Decision & { age_ms?: number };
    return { allowed: decision.allowed, reason: decision.reason, source: "server", ageS, decision };
  }

  private byPolicy(orgId: string, action: Action): Answer {
    const record = this.projection.get(orgId);
    const ageS = record !== undefined ? this.projection.ageS(record.shard) : Infinity;
    const allowed = this.policies[action] === "open";
    this.counts[allowed ? "policy_open" : "policy_closed"]++;
    return { allowed, reason: "unavailable", source: "policy", ageS, decision: null };
  }

  // ----- leases and usage (always the server) ---------------------------------------------

  /** POST /v1/leases: the lease (201 new, 200 the same again) or the deny, as JSON with
   * "status". The org's view in the answer is applied at once. */
  async lease(orgId: string, leaseId: string, resources?: ResourcesInput | null, ttlS = 60): Promise<Record<string, unknown>> {
    const { action: _action, ...body } = gateBody(orgId, "create", toResources(resources));
    return this.leased(await this.request("POST", "/v1/leases", { ...body, lease_id: leaseId, ttl_s: ttlS }));
  }

  async renew(orgId: string, leaseId: string): Promise<Record<string, unknown>> {
    return this.leased(await this.request("POST", `/v1/leases/${encodeURIComponent(orgId)}/${encodeURIComponent(leaseId)}/renew`));
  }

  /** DELETE /v1/leases/...: {status: 200, gate_view}; the view is applied at once. */
  async release(orgId: string, leaseId: string): Promise<Record<string, unknown>> {
    return this.leased(await this.request("DELETE", `/v1/leases/${encodeURIComponent(orgId)}/${encodeURIComponent(leaseId)}`,
      undefined, WITH_VIEW));
  }

  /** POST /v1/usage: {status, accepted, duplicates, rejected} once the ticks are durable. */
  async report(ticks: readonly Record<string, unknown>[]): Promise<Record<string, unknown>> {
    return jsonOf(await this.request("POST", "/v1/usage", { ticks }));
  }

  private async leased(response: Response): Promise<Record<string, unknown>> {
    const body = await jsonOf(response);
    if (body["gate_view"] !== undefined && body["gate_view"] !== null) {
      try {
        this.projection.apply(parseRecord(body["gate_view"]));
      } catch (error) {
        if (!(error instanceof ProtocolError)) throw error;
      }
    }
    return body;
  }

  // ----- counters -------------------------------------------------------------------------

  /** How many checks were answered locally, by the server and by policy (and why), and how
   * the feed went: lines, errors, resyncs, reconnects, snapshots, refreshes; `views` held. */
  counters(): Record<CounterName | "views", number> {
    return { ...this.counts, views: this.projection.size };
  }

  // ----- following the feed (a long-lived process) ------------------------------------------

  /** Start following the feed and timing the clocks in the background (Node). */
  follow(): this {
    if (this.following !== null) return this;
    const probe = () => void this.probeClocks().then(() => this.projection.expireClocks());
    probe();
    this.clockTimer = setInterval(probe, CLOCK_PROBE_S * 1000);
    unref(this.clockTimer);
    this.following = this.followLoop();
    return this;
  }

  /** Until every shard's views are loaded and current, or timeoutS passed (false). */
  async waitSynced(timeoutS = 30): Promise<boolean> {
    if (this.allCurrent()) return true;
    return new Promise<boolean>((resolve) => {
      const timer = setTimeout(() => resolve(false), timeoutS * 1000);
      this.syncedWaiters.push(() => {
        clearTimeout(timer);
        resolve(true);
      });
    });
  }

  async close(): Promise<void> {
    this.stopped.abort();
    if (this.clockTimer !== null) clearInterval(this.clockTimer);
    await Promise.allSettled([this.following, ...this.loaders.values()]);
  }

  private async followLoop(): Promise<void> {
    let backoffS: number = BACKOFF_S[0];
    while (!this.stopped.signal.aborted) {
      const feedLines = this.counts.feed_lines;
      try {
        await this.readFeed({ untilCurrent: false, signal: this.stopped.signal });
        backoffS = BACKOFF_S[0]; // the cursor was not one of this server's: start over at once
        continue;
      } catch {
        if (this.stopped.signal.aborted) break;
        if (this.counts.feed_lines !== feedLines) backoffS = BACKOFF_S[0]; // it worked before it broke
        this.counts.feed_errors++;
      }
      this.counts.reconnects++;
      await sleep(backoffS * 1000, this.stopped.signal);
      backoffS = Math.min(backoffS * 2, BACKOFF_S[1]);
    }
  }

  // ----- one bounded pass (Workers) ----------------------------------------------------------

  /** Bring every shard's views up to date once: the feed from the last cursor until a
   * heartbeat proves every shard current (snapshots loaded as it asks), the clocks timed by
   * a round trip, then the stream closed. True when every shard is current; false when the
   * server could not prove it within timeoutS. Concurrent calls share one pass. */
  refresh(): Promise<boolean> {
    if (this.refreshing === null) {
      this.refreshing = this.refreshOnce().finally(() => {
        this.refreshing = null;
      });
    }
    return this.refreshing;
  }

  private async refreshOnce(): Promise<boolean> {
    if (this.following !== null) throw new Error("refresh() is for a client that does not follow()");
    this.counts.refreshes++;
    // Only signals made in this pass: on Workers an AbortSignal made in one request (close()'s)
    // cannot be used in another's fetch.
    const signal = AbortSignal.timeout(this.timeoutMs);
    this.inline = new Set();
    this.passHeard = new Set();
    try {
      await Promise.all([this.probeClocks(signal), this.readFeed({ untilCurrent: true, signal })]);
      if (this.passHeard.size === this.shardCount && this.allCurrent()) return true;
    } catch {
      // counted below: the pass could not prove every shard current
    } finally {
      this.inline = null;
      this.passHeard = null;
    }
    this.counts.refresh_errors++;
    return false;
  }

  // ----- the feed ------------------------------------------------------------------------------

  /** Read the feed from the cursor until it breaks (throws), the signal aborts, the server
   * says the cursor is not one of its own (the cursor is dropped), or, untilCurrent, every
   * shard is current. */
  private async readFeed(read: FeedRead): Promise<void> {
    const params = new URLSearchParams({ heartbeat_s: String(this.heartbeatS) });
    if (this.cursor !== null) params.set("after", this.cursor);
    if (this.prefix) params.set("prefix", this.prefix);
    const quiet = new AbortController(); // no line for 4 heartbeats: the stream is dead
    const signal = anySignal([read.signal, quiet.signal]);
    let timer = setTimeout(() => quiet.abort(), Math.max(this.heartbeatS * 4000, this.timeoutMs));
    try {
      const response = await this.fetchImpl(`${this.url}/v1/gate/feed?${params}`, { headers: this.headers, signal });
      if (!response.ok || response.body === null) throw new ProtocolError(`the feed answered ${response.status}`);
      const silenceMs = Math.max(this.heartbeatS * 4000, 1000);
      for await (const line of lines(response.body, signal)) {
        clearTimeout(timer);
        timer = setTimeout(() => quiet.abort(), silenceMs);
        if (line === "") continue;
        const message = parseFeedLine(line);
        this.counts.feed_lines++;
        if (message.type === "view") {
          this.projection.advance(message.shard, message.epoch, message.seq, [message]);
        } else if (message.type === "heartbeat") {
          this.heartbeat(message, this.projection.mono());
          if (read.untilCurrent && this.passHeard?.size === this.shardCount && this.allCurrent()) return;
        } else if (message.shard === null) { // a resync of the whole stream
          this.counts.resyncs++;
          this.cursor = null;
          return;
        } else {
          this.resync(message);
        }
        if (this.inline !== null && this.inline.size > 0) await this.loadInline(signal);
      }
      if (!read.signal.aborted) throw new ProtocolError("the feed ended");
    } finally {
      clearTimeout(timer);
    }
  }

  /** Each shard's clock, and each loaded shard proved current as of the time it states. A
   * shard without a snapshot (a resumed stream after this client lost it) is loaded. */
  private heartbeat(beat: Heartbeat, receivedUs: number): void {
    const positions = parseCursor(beat.cursor);
    this.shardCount = positions.length;
    positions.forEach((position, shard) => {
      const shardNow = beat.now_us[shard] ?? null;
      const asOf = beat.as_of_us[shard] ?? null;
      if (shardNow !== null) this.projection.clock(shard, shardNow, receivedUs);
      const loaded = this.loaded.get(shard);
      if (asOf !== null && covers(position, loaded)) {
        this.projection.heard(shard, asOf);
        this.passHeard?.add(shard);
      } else if (position !== null && !this.loaders.has(shard) && (loaded === undefined || position[0] !== loaded[0])) {
        // None loaded (a resumed stream), or of an incarnation the feed is past. (A shard
        // with no position yet gets its own resync line.)
        this.load(shard);
      }
    });
    this.cursor = beat.cursor;
    if (this.allCurrent()) for (const wake of this.syncedWaiters.splice(0)) wake();
  }

  /** How old the views are, in seconds of their shard's time: the org's shard's when `orgId`
   * names an org with a record, else the least current shard's (Infinity: a shard never
   * proved current, or the shards not known yet). */
  ageS(orgId?: string): number {
    if (this.shardCount === null) return Infinity;
    const record = orgId === undefined ? undefined : this.projection.get(orgId);
    if (record !== undefined) return this.projection.ageS(record.shard);
    let oldest = 0;
    for (let shard = 0; shard < this.shardCount; shard++) oldest = Math.max(oldest, this.projection.ageS(shard));
    return oldest;
  }

  private allCurrent(): boolean {
    if (this.shardCount === null) return false;
    for (let shard = 0; shard < this.shardCount; shard++) {
      if (this.projection.ageS(shard) > this.maxStalenessS) return false;
    }
    return true;
  }

  /** The shard's views must be loaded again; the stream goes on with its new records. */
  private resync(message: Resync): void {
    const shard = message.shard as number;
    this.counts.resyncs++;
    if (message.epoch !== null) {
      // Every record of the shard goes: what was missed is unknown, and a record kept could
      // win over the snapshot's.
      this.projection.reset(shard, message.epoch, 0, true);
    } else {
      this.projection.forgetHeard(shard);
    }
    this.load(shard); // also when a load is on the way: it may be of what is gone
  }

  /** Load the shard's views (again) without holding up the feed or any other shard. A newer
   * load makes an older one's result void; until one is done the shard has no loaded
   * snapshot, so no heartbeat makes it current. */
  private load(shard: number): void {
    this.generation.set(shard, (this.generation.get(shard) ?? 0) + 1);
    this.loaded.delete(shard);
    if (this.inline !== null) {
      this.inline.add(shard);
      return;
    }
    if (this.loaders.has(shard)) return;
    const loader = this.loadShard(shard).finally(() => this.loaders.delete(shard));
    this.loaders.set(shard, loader);
  }

  /** The snapshots a bounded pass was asked for, one after the other; a failure fails the pass. */
  private async loadInline(signal: AbortSignal): Promise<void> {
    const inline = this.inline as Set<number>;
    for (const shard of [...inline]) {
      inline.delete(shard);
      const generation = this.generation.get(shard);
      const position = await this.loadSnapshot(shard, generation, signal);
      if (position === null) continue;
      this.counts.snapshots++;
      if (this.generation.get(shard) === generation) this.loaded.set(shard, position);
    }
  }

  private async loadShard(shard: number): Promise<void> {
    let backoffS: number = BACKOFF_S[0];
    while (!this.stopped.signal.aborted) {
      const generation = this.generation.get(shard);
      let position: readonly [number, number] | null;
      try {
        position = await this.loadSnapshot(shard, generation);
      } catch {
        if (this.stopped.signal.aborted) return;
        this.counts.snapshot_errors++;
        await sleep(backoffS * 1000, this.stopped.signal);
        backoffS = Math.min(backoffS * 2, BACKOFF_S[1]);
        continue;
      }
      if (position === null) continue; // superseded: load again
      this.counts.snapshots++;
      if (this.generation.get(shard) === generation) {
        this.loaded.set(shard, position);
        return;
      }
    }
  }

  /** One shard's views into the projection, page by page; the feed position they hold, or
   * null when a newer load was asked for meanwhile. */
  private async loadSnapshot(shard: number, generation: number | undefined,
    signal: AbortSignal = this.stopped.signal): Promise<readonly [number, number] | null> {
    let page: string | null = null;
    let cursor: string | null = null;
    for (;;) {
      if (signal.aborted || this.generation.get(shard) !== generation) return null;
      const params = new URLSearchParams({ shard: String(shard), limit: String(this.pageSize) });
      if (page !== null) params.set("page", page);
      if (this.prefix) params.set("prefix", this.prefix);
      const response = await this.fetchImpl(`${this.url}/v1/gate/views?${params}`, {
        headers: this.headers, signal: anySignal([AbortSignal.timeout(this.timeoutMs), signal]) });
      if (!response.ok) throw new ProtocolError(`shard ${shard}'s views answered ${response.status}`);
      const body = parsePage(await response.text());
      cursor ??= body.cursor;
      for (const record of body.views) this.projection.apply(record);
      if (body.next === null) break;
      page = body.next;
    }
    const [position] = parseCursor(cursor);
    if (position === null || position === undefined) throw new ProtocolError(`shard ${shard}'s snapshot has no position`);
    return position;
  }

  /** A timed GET /v1/gate/clock: bounds each shard's clock from above (see ShardClock). */
  private async probeClocks(signal: AbortSignal = this.stopped.signal): Promise<void> {
    const sent = this.projection.mono();
    let stated: unknown;
    try {
      const response = await this.fetchImpl(`${this.url}/v1/gate/clock`, {
        headers: this.headers, signal: anySignal([AbortSignal.timeout(this.timeoutMs), signal]) });
      if (!response.ok) return;
      stated = ((await response.json()) as { now_us?: unknown }).now_us;
    } catch {
      return;
    }
    const received = this.projection.mono();
    if (!Array.isArray(stated)) return;
    stated.forEach((shardUs, shard) => {
      if (Number.isSafeInteger(shardUs)) this.projection.clock(shard, shardUs as number, received, sent);
    });
  }

  private request(method: string, path: string, body?: unknown, headers?: Record<string, string>): Promise<Response> {
    return this.fetchImpl(`${this.url}${path}`, {
      method,
      headers: { ...this.headers, ...(body !== undefined ? { "Content-Type": "application/json" } : {}), ...headers },
      ...(body !== undefined ? { body: JSON.stringify(body) } : {}),
      signal: AbortSignal.timeout(this.timeoutMs),
    });
  }
}

function covers(position: Position | undefined, loaded: readonly [number, number] | undefined): boolean {
  return position !== null && position !== undefined && loaded !== undefined && position[0] === loaded[0] && position[1] >= loaded[1];
}

function gateBody(orgId: string, action: string, resources: Resources): Record<string, unknown> {
  const body: Record<string, unknown> = { org_id: orgId, action };
  if (resources !== NO_RESOURCES) body["resources"] = resources;
  return body;
}

async function jsonOf(response: Response): Promise<Record<string, unknown>> {
  const text = await response.text();
  let body: unknown = null;
  try {
    body = text ? JSON.parse(text) : {};
  } catch {
    body = null;
  }
  return typeof body === "object" && body !== null && !Array.isArray(body)
    ? { status: response.status, ...(body as Record<string, unknown>) }
    : { status: response.status };
}

/** The stream's lines (UTF-8, "\n"-separated), ending when it ends or the signal aborts. */
async function* lines(body: ReadableStream<Uint8Array>, signal: AbortSignal): AsyncGenerator<string> {
  const reader = body.getReader();
  const decoder = new TextDecoder();
  const cancel = () => void reader.cancel().catch(() => undefined);
  signal.addEventListener("abort", cancel, { once: true });
  let rest = "";
  try {
    for (;;) {
      const { done, value } = await reader.read();
      if (done || signal.aborted) break;
      rest += decoder.decode(value, { stream: true });
      let at: number;
      while ((at = rest.indexOf("\n")) >= 0) {
        yield rest.slice(0, at);
        rest = rest.slice(at + 1);
      }
    }
  } finally {
    signal.removeEventListener("abort", cancel);
    cancel();
  }
}

function anySignal(signals: AbortSignal[]): AbortSignal {
  const any = (AbortSignal as unknown as { any?: (s: AbortSignal[]) => AbortSignal }).any;
  if (any !== undefined) return any.call(AbortSignal, signals);
  const controller = new AbortController();
  for (const signal of signals) {
    if (signal.aborted) controller.abort();
    else signal.addEventListener("abort", () => controller.abort(), { once: true });
  }
  return controller.signal;
}

function sleep(ms: number, signal: AbortSignal): Promise<void> {
  return new Promise((resolve) => {
    if (signal.aborted) return resolve();
    const timer = setTimeout(done, ms);
    unref(timer);
    signal.addEventListener("abort", done, { once: true });
    function done() {
      clearTimeout(timer);
      signal.removeEventListener("abort", done);
      resolve();
    }
  });
}

function unref(timer: unknown): void {
  const maybe = timer as { unref?: () => void };
  if (typeof maybe.unref === "function") maybe.unref();
}
