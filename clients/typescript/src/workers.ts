/**
 * Gating on Cloudflare Workers: a bounded per-isolate projection, refreshed by cursor.
 *
 * A Worker cannot follow the feed in the background: nothing outlives the request (and its
 * waitUntil), and an isolate may serve thousands of requests or one. So each isolate keeps
 * one GateClient in module scope (its projection, cursor and clock estimates live as long as
 * the isolate), and brings it up to date with bounded passes (GateClient.refresh(): the feed
 * from the last cursor until a heartbeat proves every shard current, then the stream closes):
 *
 * - views younger than refreshAfterS: decided locally, nothing else happens;
 * - older than refreshAfterS but within maxStalenessS: decided locally, and a pass starts
 *   in ctx.waitUntil, after the response (stale-while-revalidate);
 * - the org's shard's views older than maxStalenessS (an isolate's first request, one after
 *   a quiet spell, or that shard is down): the request waits for one pass (at most
 *   timeoutS), then decides locally, or by the action's policy when the pass could not prove
 *   the views current. Another shard past the bound only starts a pass in waitUntil.
 *
 * The staleness rule is the protocol's (docs/gate-protocol.md 8.6), unchanged: no answer is
 * `local` from a view older than maxStalenessS in its shard's time. The projection is
 * bounded by `prefix`: follow the orgs this Worker gates, not every org.
 */

import type { Action, ResourcesInput } from "./decision.js";
import { GateClient, type Answer, type GateClientOptions } from "./client.js";

/** What a Worker's fetch handler gets as its third argument (ExecutionContext). */
export interface WaitUntil {
  waitUntil(promise: Promise<unknown>): void;
}

export interface IsolateGateOptions extends GateClientOptions {
  /** Start a background pass once the views are this old (seconds); default half the bound. */
  readonly refreshAfterS?: number;
}

const isolates = new Map<string, IsolateGate>();

/** The isolate's gate for these options: made on first use, then the same one for every
 * request this isolate serves (keyed by URL, token and prefix). */
export function isolateGate(options: IsolateGateOptions): IsolateGate {
  const key = JSON.stringify([options.url, options.token, options.prefix ?? ""]);
  let gate = isolates.get(key);
  if (gate === undefined) isolates.set(key, (gate = new IsolateGate(options)));
  return gate;
}

export class IsolateGate {
  readonly client: GateClient;
  readonly refreshAfterS: number;

  constructor(options: IsolateGateOptions) {
    // A pass must end well within a request; a heartbeat every 50 ms (the server's least)
    // makes a pass last about one round trip plus 50 ms.
    this.client = new GateClient({ heartbeatS: 0.05, timeoutS: 2, ...options });
    this.refreshAfterS = options.refreshAfterS ?? this.client.maxStalenessS / 2;
  }

  /** May the org do `action` now? See the module's comment for when it waits for a pass. */
  async check(ctx: WaitUntil, orgId: string, action: Action | string, resources?: ResourcesInput | null): Promise<Answer> {
    // Waits only when the org's own shard is past the bound (an unknown org: when any is): a
    // shard that is down keeps its own orgs waiting, not the others, which a pass in
    // waitUntil keeps trying to bring back.
    if (this.client.ageS(orgId) > this.client.maxStalenessS) {
      await this.client.refresh();
    } else if (this.client.ageS() > this.refreshAfterS) {
      ctx.waitUntil(this.client.refresh());
    }
    return this.client.check(orgId, action, resources);
  }

  lease(orgId: string, leaseId: string, resources?: ResourcesInput | null, ttlS = 60) {
    return this.client.lease(orgId, leaseId, resources, ttlS);
  }

  renew(orgId: string, leaseId: string) {
    return this.client.renew(orgId, leaseId);
  }

  release(orgId: string, leaseId: string) {
    return this.client.release(orgId, leaseId);
  }

  report(ticks: readonly Record<string, unknown>[]) {
    return this.client.report(ticks);
  }

  counters() {
    return this.client.counters();
  }
}
