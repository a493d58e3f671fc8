/**
 * Gate views on the wire, and a local store of them that answers gate checks.
 *
 * A port of metergate_client/projection.py; the formats and rules are docs/gate-protocol.md
 * section 8. Every org's view is published by its shard as a view record (shard, epoch, seq);
 * a record replaces the org's previous one only when (epoch, seq) is greater. A shard's views
 * are current while its feed proved, within the reader's bound of the shard's own time now,
 * that nothing newer exists, and while that time is before the record's valid_until_us. The
 * shard's time is read through a per-shard estimate of its clock from a monotonic local
 * clock, never this host's wall clock.
 */

import { parseView, isObject, type GateView } from "./decision.js";

export interface ViewRecord {
  readonly type: "view";
  readonly org_id: string;
  readonly shard: number;
  readonly epoch: number;
  readonly seq: number;
  /** In the shard's clock (µs since 1970); null: valid until the next record. */
  readonly valid_until_us: number | null;
  readonly view: GateView;
}

export interface Heartbeat {
  readonly type: "heartbeat";
  readonly cursor: string;
  readonly now_us: readonly (number | null)[];
  readonly as_of_us: readonly (number | null)[];
}

export interface Resync {
  readonly type: "resync";
  readonly reason: string;
  /** null: the cursor is not one of this server's; the stream ends, start over without one. */
  readonly shard: number | null;
  readonly epoch: number | null;
}

export type FeedLine = ViewRecord | Heartbeat | Resync;

/** (epoch, seq) in one shard's feed; null: no position yet. */
export type Position = readonly [number, number] | null;

export class ProtocolError extends Error {
  override name = "ProtocolError";
}

/** One line of GET /v1/gate/feed, checked. Integers must be safe (JavaScript numbers hold
 * them exactly only up to 2^53); unknown fields are ignored. Throws ProtocolError. */
export function parseFeedLine(text: string): FeedLine {
  const value = parseJson(text);
  switch (value["type"]) {
    case "view":
      return parseRecord(value);
    case "heartbeat":
      if (typeof value["cursor"] !== "string") throw new ProtocolError("heartbeat: no cursor");
      return { type: "heartbeat", cursor: value["cursor"], now_us: times(value["now_us"], "now_us"),
        as_of_us: times(value["as_of_us"], "as_of_us") };
    case "resync": {
      const shard = value["shard"] ?? null;
      const epoch = value["epoch"] ?? null;
      if (shard !== null && !isCount(shard)) throw new ProtocolError("resync: bad shard");
      if (epoch !== null && !isCount(epoch)) throw new ProtocolError("resync: bad epoch");
      return { type: "resync", reason: String(value["reason"] ?? ""), shard, epoch };
    }
    default:
      throw new ProtocolError(`not a feed line: ${text.slice(0, 60)}`);
  }
}

/** Where an unreadable record's valid_until_us is: 1970, so it is never current. */
export const UNREADABLE = 0;
// An unreadable record's view: a placeholder, never decided from (its record is never current).
const PLACEHOLDER: GateView = Object.freeze({
  balance_micros: 0, quota_remaining_micros: 0, included_micros: 0, active_leases: 0, max_concurrent: 0,
  max_disk_mb: 0, halted: null, suspended: true, degraded: true, overdraws: false, needs_card: false,
  machine_quotas: null, machine_in_use: null, shadow: false,
});

/** A view record (from the feed, a snapshot page or a lease answer's gate_view), checked. A
 * record whose envelope (org_id, shard, epoch, seq) does not read is a ProtocolError (a broken
 * line); one whose view or valid_until_us does not read is unreadable (docs/gate-protocol.md
 * 8.1): it keeps its place in the org's order, with valid_until_us UNREADABLE, so neither it nor
 * the org's older record is decided from, and every other org goes on. */
export function parseRecord(value: unknown): ViewRecord {
  if (!isObject(value)) throw new ProtocolError("view record: not an object");
  const { org_id: orgId, shard, epoch, seq } = value;
  if (typeof orgId !== "string") throw new ProtocolError("view record: no org_id");
  if (!isCount(shard) || !isCount(epoch) || !isCount(seq)) throw new ProtocolError(`view record of ${orgId}: bad shard, epoch or seq`);
  const validUntil = value["valid_until_us"];
  let view: GateView;
  try {
    if (validUntil !== null && !Number.isSafeInteger(validUntil)) throw new TypeError("bad valid_until_us");
    view = parseView(value["view"]);
  } catch {
    return { type: "view", org_id: orgId, shard, epoch, seq, valid_until_us: UNREADABLE, view: PLACEHOLDER };
  }
  return { type: "view", org_id: orgId, shard, epoch, seq, valid_until_us: validUntil as number | null, view };
}

export interface ViewPage {
  readonly cursor: string;
  readonly next: string | null;
  readonly views: readonly ViewRecord[];
}

/** A page of GET /v1/gate/views, checked. */
export function parsePage(text: string): ViewPage {
  const value = parseJson(text);
  const { cursor, views } = value;
  const next = value["next"] ?? null;
  if (typeof cursor !== "string" || !Array.isArray(views) || (next !== null && typeof next !== "string")) {
    throw new ProtocolError("not a page of /v1/gate/views");
  }
  return { cursor, next, views: views.map(parseRecord) };
}

export function formatCursor(positions: readonly Position[]): string {
  return positions.map((p) => (p === null ? "-" : `${p[0]}:${p[1]}`)).join(",");
}

/** ProtocolError when `text` is not a cursor, or holds a number above 2^53. */
export function parseCursor(text: string): Position[] {
  return text.split(",").map((part) => {
    if (part === "-") return null;
    const found = /^(\d{1,18}):(\d{1,18})$/.exec(part);
    const epoch = Number(found?.[1]);
    const seq = Number(found?.[2]);
    if (found === null || !Number.isSafeInteger(epoch) || !Number.isSafeInteger(seq)) {
      throw new ProtocolError(`not a cursor: ${JSON.stringify(text.slice(0, 60))}`);
    }
    return [epoch, seq] as const;
  });
}

function parseJson(text: string): Record<string, unknown> {
  let value: unknown;
  try {
    value = JSON.parse(text);
  } catch {
    throw new ProtocolError(`not JSON: ${text.slice(0, 60)}`);
  }
  if (!isObject(value)) throw new ProtocolError(`not a JSON object: ${text.slice(0, 60)}`);
  return value;
}

function times(value: unknown, name: string): (number | null)[] {
  if (!Array.isArray(value) || !value.every((t) => t === null || Number.isSafeInteger(t))) {
    throw new ProtocolError(`heartbeat: bad ${name}`);
  }
  return value as (number | null)[];
}

function isCount(value: unknown): value is number {
  return Number.isSafeInteger(value) && (value as number) >= 0;
}

function newer(a: readonly [number, number], b: readonly [number, number]): boolean {
  return a[0] > b[0] || (a[0] === b[0] && a[1] > b[1]);
}

/** Local monotonic time in µs. On Workers it advances only across I/O (the runtime freezes
 * clocks while code runs), which can only make a check read a view as younger by the CPU
 * time of the request so far. */
export type MonoClock = () => number;
export const monoUs: MonoClock = () => Math.floor(performance.now() * 1000);

/** A clock sample counts for 10 to 20 s (clocks drift, and step). */
export const CLOCK_WINDOW_US = 10_000_000;

/** The best sample of the last one or two windows (a cheap sliding extreme). */
class Best {
  private current: number | null = null;
  private previous: number | null = null;
  private sinceUs = -Infinity;

  constructor(private readonly better: (a: number, b: number) => number) {}

  add(value: number, localUs: number): void {
    if (localUs - this.sinceUs >= CLOCK_WINDOW_US) {
      this.previous = this.current;
      this.current = value;
      this.sinceUs = localUs;
    } else if (this.current === null || this.better(value, this.current) === value) {
      this.current = value;
    }
  }

  best(): number | null {
    if (this.previous === null || this.current === null) return this.current;
    return this.better(this.current, this.previous);
  }
}

/**
 * One shard's clock as seen from here: its offset from the local monotonic clock.
 *
 * A time the shard stated, read at local time t1, can only have been late on its way:
 * offset >= stated - t1 (a lower bound; every feed line gives one). A time stated in answer
 * to a request sent at t0 was read after t0: offset <= stated - t0 (an upper bound; round
 * trips give one). The estimate is the tightest upper bound, so the shard's time is never
 * under-estimated and delay on the way counts as age; a lower bound above it means the
 * shard's clock stepped forward, and the lower one is taken.
 */
export class ShardClock {
  offsetUs: number | null = null;
  boundedAtUs: number | null = null;
  private readonly low = new Best(Math.max);
  private readonly high = new Best(Math.min);

  sample(shardUs: number, receivedUs: number): void {
    this.low.add(shardUs - receivedUs, receivedUs);
    this.estimate();
  }

  sampleRoundTrip(shardUs: number, sentUs: number, receivedUs: number): void {
    this.high.add(shardUs - sentUs, sentUs);
    this.low.add(shardUs - receivedUs, receivedUs);
    this.boundedAtUs = receivedUs;
    this.estimate();
  }

  /** Bounded from above by a round trip of the last two windows? Only then may a view of the
   * shard count as current: one-way samples cannot tell a delay that lasts from an offset. */
  bounded(nowUs: number): boolean {
    return this.boundedAtUs !== null && nowUs - this.boundedAtUs < 2 * CLOCK_WINDOW_US;
  }

  private estimate(): void {
    const low = this.low.best();
    const high = this.high.best();
    this.offsetUs = high === null ? low : low === null ? high : Math.max(low, high);
  }
}

/** A record decided from, and how old the reader's knowledge of its shard is (seconds, in
 * the shard's time). */
export interface Current {
  readonly record: ViewRecord;
  readonly ageS: number;
}

/**
 * The latest view of each org a reader knows, and how current it is per shard. Records may
 * arrive by the feed, snapshots and lease answers in any order; the newest wins.
 */
export class Projection {
  private readonly records = new Map<string, ViewRecord>();
  private readonly positionOf = new Map<number, readonly [number, number]>();
  /** shard → its time when its feed was known complete */
  private readonly heardOf = new Map<number, number>();
  private readonly clocks = new Map<number, ShardClock>();
  /** shard → [heard, clock offset] when both are known and the clock is bounded: what a check reads. */
  private readonly fresh = new Map<number, readonly [number, number]>();
  /** shard → (epoch, seq) below which no record is taken any more: set by a resync, so that a
   * late record (a lease answer in flight) cannot stand for what was missed. */
  private readonly floors = new Map<number, readonly [number, number]>();

  constructor(
    private readonly wanted: ((orgId: string) => boolean) | null = null,
    readonly mono: MonoClock = monoUs,
  ) {}

  // ----- writes ------------------------------------------------------------------------

  /** Keep the record if it is newer than the org's view; true if it was kept. */
  apply(record: ViewRecord): boolean {
    if (this.wanted !== null && !this.wanted(record.org_id)) return false;
    const at = [record.epoch, record.seq] as const;
    const known = this.records.get(record.org_id);
    if (known !== undefined && !newer(at, [known.epoch, known.seq])) return false;
    const floor = this.floors.get(record.shard);
    if (floor !== undefined && newer(floor, at)) return false;
    const position = this.positionOf.get(record.shard);
    if (position !== undefined && record.epoch < position[0]) return false; // of a shard incarnation that is gone
    this.records.set(record.org_id, record);
    return true;
  }

  /** A shard's feed through (epoch, seq), with the records it carried. */
  advance(shard: number, epoch: number, seq: number, records: readonly ViewRecord[]): void {
    const position = this.positionOf.get(shard);
    if (position !== undefined && position[0] !== epoch) this.resetRecords(shard, epoch, seq, false);
    for (const record of records) this.apply(record);
    const before = this.positionOf.get(shard);
    this.positionOf.set(shard, [epoch, Math.max(seq, before !== undefined && before[0] === epoch ? before[1] : 0)]);
  }

  /** The shard restarted or the reader lost its place: forget its views of older epochs, or
   * with `every` all of them (a resync: what was missed is unknown, and a record kept could
   * win over the snapshot's). */
  reset(shard: number, epoch: number, seq: number, every = false): void {
    this.resetRecords(shard, epoch, seq, every);
    this.forgetHeard(shard);
  }

  private resetRecords(shard: number, epoch: number, seq: number, every: boolean): void {
    for (const [orgId, record] of this.records) {
      if (record.shard === shard && (every || record.epoch < epoch)) this.records.delete(orgId);
    }
    this.positionOf.set(shard, [epoch, seq]);
    if (every) this.floors.set(shard, [epoch, seq]);
  }

  /** The shard stated its time `shardUs`, read here at `receivedUs` (monotonic), in answer to
   * a request sent at `sentUs` (null: not an answer, a one-way sample). */
  clock(shard: number, shardUs: number, receivedUs: number, sentUs: number | null = null): void {
    let known = this.clocks.get(shard);
    if (known === undefined) this.clocks.set(shard, (known = new ShardClock()));
    if (sentUs === null) known.sample(shardUs, receivedUs);
    else known.sampleRoundTrip(shardUs, sentUs, receivedUs);
    this.refresh(shard);
  }

  /** Every change of `shard` up to its time `asOfUs` has been applied. */
  heard(shard: number, asOfUs: number): void {
    if (asOfUs > (this.heardOf.get(shard) ?? -1)) {
      this.heardOf.set(shard, asOfUs);
      this.refresh(shard);
    }
  }

  forgetHeard(shard: number): void {
    this.heardOf.delete(shard);
    this.fresh.delete(shard);
  }

  /** Shards whose clock no round trip bounded lately are not current until one does. */
  expireClocks(): void {
    for (const shard of [...this.fresh.keys()]) this.refresh(shard);
  }

  private refresh(shard: number): void {
    const heard = this.heardOf.get(shard);
    const known = this.clocks.get(shard);
    if (heard !== undefined && known !== undefined && known.offsetUs !== null && known.bounded(this.mono())) {
      this.fresh.set(shard, [heard, known.offsetUs]);
    } else {
      this.fresh.delete(shard);
    }
  }

  // ----- reads -------------------------------------------------------------------------

  get(orgId: string): ViewRecord | undefined {
    return this.records.get(orgId);
  }

  get size(): number {
    return this.records.size;
  }

  positions(): ReadonlyMap<number, readonly [number, number]> {
    return this.positionOf;
  }

  /** The shard's time now as estimated here (null: it never stated one). */
  shardNowUs(shard: number): number | null {
    const offset = this.clocks.get(shard)?.offsetUs ?? null;
    return offset === null ? null : this.mono() + offset;
  }

  /** How old this reader's knowledge of the shard's views is, in seconds of the shard's time
   * (Infinity: never heard, or its clock not bounded lately). */
  ageS(shard: number): number {
    const fresh = this.fresh.get(shard);
    if (fresh === undefined) return Infinity;
    return Math.max(0, (this.mono() + fresh[1] - fresh[0]) / 1e6);
  }

  /** The org's record and its age, if its shard was heard within maxAgeS and the record is
   * valid at the shard's time now; else null. */
  current(orgId: string, maxAgeS: number): Current | null {
    const record = this.records.get(orgId);
    if (record === undefined) return null;
    const fresh = this.fresh.get(record.shard);
    if (fresh === undefined) return null;
    const now = this.mono() + fresh[1];
    const ageS = (now - fresh[0]) / 1e6;
    const until = record.valid_until_us;
    if (ageS > maxAgeS || (until !== null && now >= until)) return null;
    return { record, ageS: Math.max(0, ageS) };
  }
}
