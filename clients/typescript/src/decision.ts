/**
 * The gate: may an org do an action now? A pure function of the few facts it reads.
 *
 * A port of `decide()` in metergate_client/decision.py, the one the server and the Python
 * client run; docs/gate-protocol.md (sections 2 to 6) states the rules without Python, and
 * clients/vectors/gate_decisions.json pins them down case by case. This file must answer
 * every vector exactly (test/vectors.test.mjs in Node, test/workerd/ in workerd).
 */

export const ACTIONS = ["create", "wake", "ingest", "purchase"] as const;
export type Action = (typeof ACTIONS)[number];

export type Reason =
  | "ok"
  | "insufficient_balance"
  | "halted"
  | "suspended"
  | "quota_exceeded"
  | "no_payment_method"
  | "concurrency_limit"
  | "resource_limit"
  | "degraded";

/** The HTTP status each reason stands for (docs/gate-protocol.md section 6). */
export const STATUS_BY_REASON: Readonly<Record<Reason, number>> = Object.freeze({
  ok: 200,
  suspended: 402,
  degraded: 402,
  halted: 402,
  no_payment_method: 402,
  quota_exceeded: 402,
  insufficient_balance: 402,
  resource_limit: 403,
  concurrency_limit: 429,
});

export type HaltCause = "balance" | "admin";
export type MachineCounts = Readonly<Record<string, Readonly<Record<string, number>>>>;

/** What the gate reads of an org, as of one instant (docs/gate-protocol.md section 2). */
export interface GateView {
  readonly balance_micros: number;
  readonly quota_remaining_micros: number;
  readonly included_micros: number;
  readonly active_leases: number;
  readonly max_concurrent: number;
  readonly max_disk_mb: number;
  readonly halted: HaltCause | null;
  readonly suspended: boolean;
  readonly degraded: boolean;
  readonly overdraws: boolean;
  readonly needs_card: boolean;
  readonly machine_quotas: MachineCounts | null;
  readonly machine_in_use: MachineCounts | null;
  /** Billed in shadow (billing-rules 2.12): every check is allowed, with would_allow/would_reason. */
  readonly shadow: boolean;
}

/** The resources of a check, every field with its default applied (section 3.2). */
export interface Resources {
  readonly memory_mb: number;
  readonly cpu_count: number;
  readonly disk_mb: number;
  readonly machine_type: string | null;
  readonly region: string | null;
  readonly quantity: number;
}

/** The body's `resources`: every field optional, as POST /v1/gate takes it. */
export type ResourcesInput = Partial<Resources>;

export interface Decision {
  readonly allowed: boolean;
  readonly reason: Reason;
  readonly status: number;
  readonly balance_micros: number;
  readonly active_leases: number;
  readonly max_concurrent: number;
  readonly limit?: number;
  readonly requested?: number;
  readonly in_use?: number;
  readonly resource?: string;
  /** A shadow view's decision only (section 4, step 0): what an enforced org would get. */
  readonly would_allow?: boolean;
  readonly would_reason?: Reason;
}

export const NO_RESOURCES: Resources = Object.freeze({
  memory_mb: 0, cpu_count: 0, disk_mb: 0, machine_type: null, region: null, quantity: 1,
});

const RESOURCE_FIELDS = Object.keys(NO_RESOURCES) as (keyof Resources)[];
// The bounds of docs/gate-protocol.md 3.2 (the server refuses a body past them with 422).
const RESOURCE_BOUNDS: Readonly<Record<string, readonly [number, number]>> = Object.freeze({
  memory_mb: [0, 2 ** 40], cpu_count: [0, 1024], disk_mb: [0, 2 ** 40], quantity: [1, 10_000],
});
// A name: 1 to 64 characters (code points), none of them a control character or a lone
// surrogate (no UTF-8 body can carry one; with the u flag a well-formed pair is one code point).
const CONTROL = /[\u0000-\u001f\u007f\ud800-\udfff]/u;
// Every Resources toResources returned: frozen and checked, so local() need not check again.
const CHECKED = new WeakSet<object>();

/** Resources from the HTTP body's shape (absent fields take their defaults; the names may also
 * be null). Anything the server would refuse (an unknown field, a wrong type, a value out of
 * bounds: docs/gate-protocol.md 3.2) is a TypeError saying what was expected. */
export function toResources(input: ResourcesInput | null | undefined): Resources {
  if (input === null || input === undefined || input === NO_RESOURCES) return NO_RESOURCES;
  if (typeof input !== "object" || Array.isArray(input)) {
    throw new TypeError(`resources must be an object with the HTTP body's field names (${RESOURCE_FIELDS.join(", ")}), not ${Array.isArray(input) ? "an array" : typeof input}`);
  }
  const out: Record<string, unknown> = { ...NO_RESOURCES };
  for (const [name, value] of Object.entries(input)) {
    if (!Object.prototype.hasOwnProperty.call(NO_RESOURCES, name)) {
      throw new TypeError(`resources: no field ${JSON.stringify(name)} (fields: ${RESOURCE_FIELDS.join(", ")})`);
    }
    if (value === undefined) continue;
    const bounds = RESOURCE_BOUNDS[name];
    if (bounds !== undefined) {
      if (!Number.isSafeInteger(value) || (value as number) < bounds[0] || (value as number) > bounds[1]) {
        throw new TypeError(`resources.${name} must be an integer from ${bounds[0]} to ${bounds[1]}, not ${JSON.stringify(value)}`);
      }
    } else if (value !== null && !isName(value)) {
      throw new TypeError(`resources.${name} must be null or 1 to 64 characters without control characters, not ${JSON.stringify(value)}`);
    }
    out[name] = value;
  }
  const resources = Object.freeze(out) as unknown as Resources;
  CHECKED.add(resources);
  return resources;
}

/** `resources` if toResources made it (or it is NO_RESOURCES), else checked by toResources:
 * a local decision is never made from resources the server would refuse. */
export function checkedResources(resources: Resources): Resources {
  return resources === NO_RESOURCES || CHECKED.has(resources) ? resources : toResources(resources);
}

function isName(value: unknown): boolean {
  if (typeof value !== "string" || value.length === 0 || CONTROL.test(value)) return false;
  if (value.length <= 64) return true;
  let points = 0;
  for (const _ of value) if (++points > 64) return false;
  return true;
}

/** The decision for `action`. Throws a RangeError for an action that is not one of ACTIONS
 * (after the suspension check, as decide() does: a port never allows an unknown action). */
export function decide(action: string, resources: Resources, view: GateView): Decision {
  const reason = reasonFor(action, resources, view);
  if (view.shadow) {  // allowed, whatever the rules say (docs/gate-protocol.md section 4, step 0)
    return {
      allowed: true, reason: "ok", status: STATUS_BY_REASON.ok, balance_micros: view.balance_micros,
      active_leases: view.active_leases, max_concurrent: view.max_concurrent,
      would_allow: reason === "ok", would_reason: reason,
    };
  }
  const base = {
    allowed: reason === "ok",
    reason,
    status: STATUS_BY_REASON[reason],
    balance_micros: view.balance_micros,
    active_leases: view.active_leases,
    max_concurrent: view.max_concurrent,
  };
  if (reason !== "resource_limit") return base;
  const deny = resourceDeny(resources, view);
  if (deny === null) throw new Error("assertion: resource_limit without a broken limit");
  return { ...base, ...deny };
}

function reasonFor(action: string, resources: Resources, view: GateView): Reason {
  if (view.suspended) return "suspended";
  if (action === "purchase") return view.degraded ? "degraded" : "ok";
  if (action !== "create" && action !== "wake" && action !== "ingest") {
    throw new RangeError(`no such action: ${JSON.stringify(action)}; actions are ${ACTIONS.join(", ")}`);
  }
  const halted = view.halted;
  if (halted === "admin") return "halted";
  // A balance halt is lifted by the next mutation once money or new quota exists; a
  // read-only gate must not deny in the meantime (e.g. right after a period starts).
  // Both terms are safe integers, so the rounded double sum has the exact sum's sign.
  const funded = view.balance_micros + view.quota_remaining_micros > 0;
  if (!funded) {
    if (halted === "balance") return action === "create" && view.needs_card ? "no_payment_method" : "halted";
    if (!view.overdraws) {
      if (action === "create" && view.needs_card) return "no_payment_method";
      return view.included_micros > 0 ? "quota_exceeded" : "insufficient_balance";
    }
  }
  if (action === "ingest") return "ok";
  if (resourceDeny(resources, view) !== null) return "resource_limit";
  if (exceeds(view.active_leases, resources.quantity, view.max_concurrent)) return "concurrency_limit";
  return "ok";
}

interface ResourceDeny {
  limit: number;
  requested: number;
  in_use?: number;
  resource: string;
}

function resourceDeny(resources: Resources, view: GateView): ResourceDeny | null {
  if (resources.disk_mb > view.max_disk_mb) {
    return { limit: view.max_disk_mb, requested: resources.disk_mb, resource: "disk_mb" };
  }
  const quotas = view.machine_quotas;
  const region = resources.region;
  const machineType = resources.machine_type;
  // An empty map has no limit to look up; no region or type (null, or "" as decide() reads
  // it; the HTTP edge refuses "" anyway): no machine quota applies.
  if (quotas === null || !region || !machineType) return null;
  const limit = own(own(quotas, region), machineType);
  if (limit === undefined) return null;
  const inUse = own(own(view.machine_in_use, region), machineType) ?? 0;
  if (!exceeds(inUse, resources.quantity, limit)) return null;
  return { limit, requested: inUse + resources.quantity, in_use: inUse, resource: `machine_type:${region}/${machineType}` };
}

/** a + b > limit, exactly also where a + b passes 2^53 (every input is a safe integer). */
function exceeds(a: number, b: number, limit: number): boolean {
  const sum = a + b;
  if (Number.isSafeInteger(sum)) return sum > limit;
  return BigInt(a) + BigInt(b) > BigInt(limit);
}

// Own properties only: a region named "constructor" or "__proto__" must not find Object's.
function own<T>(map: Readonly<Record<string, T>> | null | undefined, key: string): T | undefined {
  if (map === null || map === undefined) return undefined;
  return Object.prototype.hasOwnProperty.call(map, key) ? map[key] : undefined;
}

/** A view as a record carries it, checked: every field of section 2 present with its JSON
 * type (an absent machine_quotas or machine_in_use reads as null, an absent shadow as false), integers safe (a larger one
 * cannot be held exactly by a JavaScript number, so such a view is refused rather than decided
 * from). Unknown fields are dropped. Throws a TypeError: the record is then unreadable (8.1). */
export function parseView(value: unknown): GateView {
  if (!isObject(value)) throw new TypeError("view: not an object");
  for (const name of INTEGER_VIEW_FIELDS) {
    if (!Number.isSafeInteger(value[name])) throw new TypeError(`view.${name}: not a safe integer`);
  }
  for (const name of BOOLEAN_VIEW_FIELDS) {
    if (typeof value[name] !== "boolean") throw new TypeError(`view.${name}: not a boolean`);
  }
  const halted = value["halted"];
  if (halted !== null && halted !== "balance" && halted !== "admin") throw new TypeError("view.halted: not null, \"balance\" or \"admin\"");
  const quotas = value["machine_quotas"] ?? null;
  const inUse = value["machine_in_use"] ?? null;
  checkMachineCounts(quotas, "machine_quotas");
  checkMachineCounts(inUse, "machine_in_use");
  const shadow = value["shadow"] === undefined ? false : value["shadow"];  // absent: an older server's view
  if (typeof shadow !== "boolean") throw new TypeError("view.shadow: not a boolean");
  return {
    balance_micros: value["balance_micros"] as number, quota_remaining_micros: value["quota_remaining_micros"] as number,
    included_micros: value["included_micros"] as number, active_leases: value["active_leases"] as number,
    max_concurrent: value["max_concurrent"] as number, max_disk_mb: value["max_disk_mb"] as number,
    halted: halted as HaltCause | null, suspended: value["suspended"] as boolean, degraded: value["degraded"] as boolean,
    overdraws: value["overdraws"] as boolean, needs_card: value["needs_card"] as boolean,
    machine_quotas: quotas as MachineCounts | null, machine_in_use: inUse as MachineCounts | null, shadow,
  };
}

const INTEGER_VIEW_FIELDS = ["balance_micros", "quota_remaining_micros", "included_micros", "active_leases",
  "max_concurrent", "max_disk_mb"] as const;
const BOOLEAN_VIEW_FIELDS = ["suspended", "degraded", "overdraws", "needs_card"] as const;

function checkMachineCounts(value: unknown, name: string): void {
  if (value === null) return;
  if (!isObject(value)) throw new TypeError(`view.${name}: not an object or null`);
  for (const [region, types] of Object.entries(value)) {
    if (!isObject(types)) throw new TypeError(`view.${name}.${region}: not an object`);
    for (const [machineType, count] of Object.entries(types)) {
      if (!Number.isSafeInteger(count)) throw new TypeError(`view.${name}.${region}.${machineType}: not a safe integer`);
    }
  }
}

export function isObject(value: unknown): value is Record<string, unknown> {
  return typeof value === "object" && value !== null && !Array.isArray(value);
}
