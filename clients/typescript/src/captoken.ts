/**
 * Capability tokens: what a compute cell checks, offline, before it creates anything.
 *
 * A port of the Verifier in metergate_client/captoken.py (signing stays in the service) for
 * Node 20+ and Cloudflare Workers, on WebCrypto's Ed25519 and nothing else. A token is
 * `<header>.<claims>.<signature>`, each part unpadded base64url (the JWS compact form with
 * EdDSA, RFC 8037); the format, the refusals and the key set are in
 * docs/integrate/capability-tokens.md, and clients/vectors/capability_tokens.json pins the
 * verdicts down case by case (test/captoken.test.mjs in Node, test/workerd/ in workerd).
 *
 * WebCrypto only answers promises, so a Verifier is made with `await Verifier.fromKeySet()`
 * and verify() is async. Like the Python one it remembers the tokens whose signature it
 * checked (at most cacheSize, each until its expiry): a token seen before costs a Map lookup,
 * and expiry, org, action and resources are still checked on every call.
 *
 * Where a JavaScript number cannot follow Python: an integer claim past 2^53 is refused as
 * malformed, and an integer claim written 1.0 reads as 1 where msgspec refuses it. The
 * service writes neither; a forger's token is refused either way (bad_signature here).
 */

import { NO_RESOURCES, isObject, toResources, type Resources, type ResourcesInput } from "./decision.js";

export const ALGORITHM = "EdDSA";
export const TOKEN_TYPE = "mgcap+jwt";
export const MAX_TOKEN_BYTES = 4_096; // a real token is ~400 bytes: anything longer is refused before decoding
export const SIGNATURE_BYTES = 64;
export const KEY_BYTES = 32;
export const DEFAULT_CACHE_SIZE = 100_000; // verified tokens remembered
export const LEEWAY_S = 5; // the cell's clock may be this far behind or ahead of the service's

/** Why a token was refused: one value per thing that can be wrong with it (the Python values). */
export const Refusal = Object.freeze({
  MALFORMED: "malformed", // not three base64url parts of JSON with the claims of a token
  TRUNCATED: "truncated", // a part or part of the signature is missing
  BAD_ALGORITHM: "bad_algorithm", // the header names another algorithm (or type)
  UNKNOWN_KEY: "unknown_key", // signed with a key id the key set does not publish
  BAD_SIGNATURE: "bad_signature", // forged, or changed after signing
  EXPIRED: "expired", // past its `exp`
  NOT_YET_VALID: "not_yet_valid", // issued later than now: a clock far off, or a forgery
  WRONG_ORG: "wrong_org", // valid, for another org
  WRONG_ACTION: "wrong_action", // valid, for another action
  EXCEEDS_GRANT: "exceeds_grant", // valid, for fewer resources than asked
} as const);
export type Refusal = (typeof Refusal)[keyof typeof Refusal];

/** A refused token; `refusal` says why, the message says it for people. */
export class CapabilityError extends Error {
  override readonly name = "CapabilityError";
  readonly refusal: Refusal;

  constructor(refusal: Refusal, message: string) {
    super(`${refusal}: ${message}`);
    this.refusal = refusal;
  }
}

/** What a token says. `resources` is the grant with every default applied; claims this
 * version does not know are dropped (a later service may add some: the signature covers them). */
export interface Claims {
  readonly org_id: string;
  readonly action: string; // "create" for a lease; a gate check's own action
  readonly iat: number; // epoch s
  readonly exp: number; // epoch s
  readonly resources: Resources;
  readonly lease_id: string | null; // a lease's; none for a gate check's token
  readonly tier: string | null; // the org's tier and plan when the lease was granted
  readonly plan: string | null;
}

const COUNTED = ["memory_mb", "cpu_count", "disk_mb", "quantity"] as const;
const NAMED = ["machine_type", "region"] as const;

/** A token that verified: its claims and the key that signed it. */
export class Capability {
  constructor(readonly claims: Claims, readonly kid: string) {
    Object.freeze(this);
  }

  /** Throw EXCEEDS_GRANT unless `resources` fit in what the token grants: no more memory,
   * CPUs, disk or quantity, and the same machine type and region where one is asked for.
   * Resources no create could carry (a string for a number, an unknown field) are a TypeError
   * from toResources: compared as they are, "8192" > 4096 would be JavaScript's guess. */
  requires(resources: ResourcesInput | null | undefined): void {
    const asked = toResources(resources);
    const granted = this.claims.resources;
    for (const name of COUNTED) {
      if (asked[name] > granted[name]) {
        throw new CapabilityError(Refusal.EXCEEDS_GRANT, `${name} ${asked[name]} asked, ${granted[name]} granted`);
      }
    }
    for (const name of NAMED) {
      if (asked[name] !== null && asked[name] !== granted[name]) {
        throw new CapabilityError(Refusal.EXCEEDS_GRANT,
          `${name} ${JSON.stringify(asked[name])} asked, ${JSON.stringify(granted[name])} granted`);
      }
    }
  }
}

export interface VerifierOptions {
  readonly cacheSize?: number;
  readonly leewayS?: number;
  /** Epoch seconds now; default the system clock. */
  readonly clock?: () => number;
}

/** What verify() is asked: an absent or null org, action or resources is not checked. */
export interface VerifyRequest {
  readonly orgId?: string | null;
  readonly action?: string | null;
  /** What the create asks for (the HTTP body's field names), checked with requires(). */
  readonly resources?: ResourcesInput | null;
  /** Epoch seconds to judge expiry at; default the verifier's clock. */
  readonly nowS?: number;
}

/**
 * Checks tokens offline against a key set (the service's published keys):
 *
 *     const verifier = await Verifier.fromKeySet(await (await fetch(`${billing}/.well-known/metergate-keys`)).json());
 *     const capability = await verifier.verify(token, { orgId: "org_1", action: "create", resources: { memory_mb: 4096 } });
 *
 * Every refusal is a CapabilityError naming why; a key set in another shape is a TypeError.
 */
export class Verifier {
  private keys: Map<string, CryptoKey>;
  private cache = new Map<string, Capability>(); // token → what it said, signature checked
  private readonly cacheSize: number;
  private readonly leewayS: number;
  private readonly clock: () => number;

  private constructor(keys: Map<string, CryptoKey>, options: VerifierOptions) {
    const cacheSize = options.cacheSize ?? DEFAULT_CACHE_SIZE;
    const leewayS = options.leewayS ?? LEEWAY_S;
    if (!Number.isSafeInteger(cacheSize) || cacheSize < 0) throw new RangeError(`cacheSize ${cacheSize}: not an integer >= 0`);
    if (!Number.isFinite(leewayS) || leewayS < 0) throw new RangeError(`leewayS ${leewayS}: not a number >= 0`);
    this.keys = keys;
    this.cacheSize = cacheSize;
    this.leewayS = leewayS;
    this.clock = options.clock ?? (() => Date.now() / 1000);
  }

  /** A verifier holding the keys of a published key set ({"keys": [jwk, ...]}). */
  static async fromKeySet(keySet: unknown, options: VerifierOptions = {}): Promise<Verifier> {
    return new Verifier(await keysOf(keySet), options);
  }

  get keyIds(): string[] {
    return [...this.keys.keys()].sort();
  }

  /** How many verified tokens are remembered (at most cacheSize). */
  get rememberedTokens(): number {
    return this.cache.size;
  }

  /** Take a new key set (after a rotation): tokens remembered under a key it drops are
   * forgotten, and refused from now on. */
  async setKeys(keySet: unknown): Promise<void> {
    const keys = await keysOf(keySet);
    this.keys = keys;
    this.cache = new Map([...this.cache].filter(([, capability]) => keys.has(capability.kid)));
  }

  /** The token's capability, if its signature is one of the keys', it is in force now, and
   * (when named) for the org and action and granting the resources; else CapabilityError. */
  async verify(token: string, request: VerifyRequest = {}): Promise<Capability> {
    const nowS = request.nowS ?? this.clock();
    const capability = this.cache.get(token) ?? await this.checked(token, nowS);
    const claims = capability.claims;
    if (claims.exp + this.leewayS <= nowS) throw new CapabilityError(Refusal.EXPIRED, `expired at ${claims.exp}`);
    if (claims.iat - this.leewayS > nowS) {
      throw new CapabilityError(Refusal.NOT_YET_VALID, `issued at ${claims.iat}, after now`);
    }
    const { orgId, action, resources } = request;
    if (orgId != null && claims.org_id !== orgId) {
      throw new CapabilityError(Refusal.WRONG_ORG, `for org ${JSON.stringify(claims.org_id)}, not ${JSON.stringify(orgId)}`);
    }
    if (action != null && claims.action !== action) {
      throw new CapabilityError(Refusal.WRONG_ACTION, `for ${JSON.stringify(claims.action)}, not ${JSON.stringify(action)}`);
    }
    if (resources != null) capability.requires(resources);
    return capability;
  }

  private async checked(token: unknown, nowS: number): Promise<Capability> {
    if (typeof token !== "string" || token.length === 0) throw new CapabilityError(Refusal.MALFORMED, "no token");
    if (longerThan(token, MAX_TOKEN_BYTES)) {
      throw new CapabilityError(Refusal.MALFORMED, `longer than ${MAX_TOKEN_BYTES} characters`);
    }
    const parts = token.split(".");
    if (parts.length < 3 || parts[2] === "") throw new CapabilityError(Refusal.TRUNCATED, `${parts.length} of 3 parts`);
    if (parts.length > 3) throw new CapabilityError(Refusal.MALFORMED, `${parts.length} parts, not 3`);
    const [headerB64, claimsB64, signatureB64] = parts as [string, string, string];
    if (!longerThan(signatureB64, SIGNATURE_CHARS - 1)) { // cut short, before its spelling is checked
      throw new CapabilityError(Refusal.TRUNCATED, `a signature of ${signatureB64.length} characters`);
    }
    let header: Header, claims: Claims, signature: Uint8Array<ArrayBuffer>;
    try {
      header = readHeader(readJson(unb64(headerB64)));
      claims = readClaims(readJson(unb64(claimsB64)));
      signature = unb64(signatureB64);
    } catch (error) {
      if (!(error instanceof TypeError || error instanceof SyntaxError)) throw error;
      throw new CapabilityError(Refusal.MALFORMED, `cannot be read (${error.message})`);
    }
    if (header.alg !== ALGORITHM || header.typ !== TOKEN_TYPE) {
      throw new CapabilityError(Refusal.BAD_ALGORITHM,
        `alg ${JSON.stringify(header.alg)} typ ${JSON.stringify(header.typ)}, not "${ALGORITHM}" "${TOKEN_TYPE}"`);
    }
    if (signature.length < SIGNATURE_BYTES) {
      throw new CapabilityError(Refusal.TRUNCATED, `a signature of ${signature.length} of ${SIGNATURE_BYTES} bytes`);
    }
    const key = this.keys.get(header.kid);
    if (key === undefined) throw new CapabilityError(Refusal.UNKNOWN_KEY, `key ${JSON.stringify(header.kid)} is not in the key set`);
    // A longer signature is no Ed25519 signature: Node's verify() answers false, workerd's throws.
    const signed = signature.length === SIGNATURE_BYTES
      && await crypto.subtle.verify("Ed25519", key, signature, ASCII.encode(`${headerB64}.${claimsB64}`));
    if (!signed) throw new CapabilityError(Refusal.BAD_SIGNATURE, `not signed by key ${JSON.stringify(header.kid)}`);
    // setKeys() may have dropped the key while the signature was checked: refused as after it.
    if (!this.keys.has(header.kid)) throw new CapabilityError(Refusal.UNKNOWN_KEY, `key ${JSON.stringify(header.kid)} left the key set`);
    const capability = new Capability(claims, header.kid);
    this.remember(token, capability, nowS);
    return capability;
  }

  private remember(token: string, capability: Capability, nowS: number): void {
    if (this.cacheSize === 0 || this.cache.has(token)) return;
    if (this.cache.size >= this.cacheSize) {
      // Full: the expired go, and if that frees less than a quarter, the oldest too, down to
      // three quarters. A sweep per insert would make every new token cost the whole cache.
      const kept = [...this.cache].filter(([, c]) => c.claims.exp + this.leewayS > nowS);
      this.cache = new Map(kept.slice(Math.max(0, kept.length - Math.floor(this.cacheSize * 3 / 4))));
    }
    this.cache.set(token, capability);
  }
}

// ----- reading a token's parts ----------------------------------------------------------

interface Header {
  readonly alg: string;
  readonly kid: string;
  readonly typ: string;
}

const ASCII = new TextEncoder();
// fatal: invalid UTF-8 is unreadable, as in msgspec; ignoreBOM: a BOM stays and JSON.parse refuses it.
const UTF8 = new TextDecoder("utf-8", { fatal: true, ignoreBOM: true });
const B64URL = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_";
const B64URL_PATTERN = /^[A-Za-z0-9_-]*$/;
const SIGNATURE_CHARS = Math.ceil(SIGNATURE_BYTES * 4 / 3); // 86: 64 bytes, unpadded
// A lone UTF-16 surrogate (a "\ud800" escape): JSON.parse takes it, msgspec refuses the document.
const LONE_SURROGATE = /[\ud800-\udbff](?![\udc00-\udfff])|(?<![\ud800-\udbff])[\udc00-\udfff]/;
const HEADER_FIELDS = new Set(["alg", "kid", "typ"]);
const OPTIONAL_CLAIMS = ["lease_id", "tier", "plan"] as const;

function longerThan(text: string, maxChars: number): boolean {
  // In code points, as Python counts; a UTF-16 length over twice the bound is over it in any count.
  if (text.length <= maxChars) return false;
  if (text.length > 2 * maxChars) return true;
  let points = 0;
  for (const _ of text) if (++points > maxChars) return true;
  return false;
}

function b64(raw: Uint8Array): string {
  let text = "";
  for (let i = 0; i < raw.length; i += 3) {
    const chunk = (raw[i]! << 16) | ((raw[i + 1] ?? 0) << 8) | (raw[i + 2] ?? 0);
    const chars = Math.min(4, Math.ceil((raw.length - i) * 4 / 3));
    for (let c = 0; c < chars; c++) text += B64URL[(chunk >> (18 - 6 * c)) & 63];
  }
  return text;
}

/** Strict unpadded base64url: a TypeError for any other character, a bad length, or a last
 * character with its unused bits set (another spelling of the same bytes: one per token). */
function unb64(text: string): Uint8Array<ArrayBuffer> {
  if (text.length % 4 === 1 || !B64URL_PATTERN.test(text)) throw new TypeError("not unpadded base64url");
  const raw = new Uint8Array((text.length * 3) >> 2);
  let value = 0;
  let bits = 0;
  let at = 0;
  for (let i = 0; i < text.length; i++) {
    value = (value << 6) | B64URL.indexOf(text[i]!);
    bits += 6;
    if (bits >= 8) {
      bits -= 8;
      raw[at++] = (value >> bits) & 0xff;
      value &= (1 << bits) - 1;
    }
  }
  if (value !== 0) throw new TypeError("not canonical base64url");
  return raw;
}

function readJson(raw: Uint8Array): unknown {
  const value: unknown = JSON.parse(UTF8.decode(raw));
  if (hasLoneSurrogate(value)) throw new TypeError("a string with a lone surrogate");
  return value;
}

function hasLoneSurrogate(value: unknown): boolean {
  if (typeof value === "string") return LONE_SURROGATE.test(value);
  if (typeof value !== "object" || value === null) return false;
  return Object.entries(value).some(([key, item]) => LONE_SURROGATE.test(key) || hasLoneSurrogate(item));
}

function readHeader(value: unknown): Header {
  if (!isObject(value)) throw new TypeError("header: not an object");
  for (const name of Object.keys(value)) if (!HEADER_FIELDS.has(name)) throw new TypeError(`header: unknown field ${name}`);
  const typ = Object.hasOwn(value, "typ") ? text(value["typ"], "header.typ") : TOKEN_TYPE; // absent: the default
  return { alg: text(value["alg"], "header.alg"), kid: text(value["kid"], "header.kid"), typ };
}

function readClaims(value: unknown): Claims {
  if (!isObject(value)) throw new TypeError("claims: not an object");
  const optional = Object.fromEntries(OPTIONAL_CLAIMS.map((name) => [name, optionalText(value[name], name)]));
  return Object.freeze({
    org_id: text(value["org_id"], "org_id"), action: text(value["action"], "action"),
    iat: integer(value["iat"], "iat"), exp: integer(value["exp"], "exp"),
    resources: readGrant(value["resources"]),
    lease_id: optional["lease_id"] ?? null, tier: optional["tier"] ?? null, plan: optional["plan"] ?? null,
  });
}

function readGrant(value: unknown): Resources {
  if (value === undefined) return NO_RESOURCES;
  if (!isObject(value)) throw new TypeError("resources: not an object");
  const grant: Record<string, unknown> = { ...NO_RESOURCES };
  for (const [name, item] of Object.entries(value)) {
    if ((COUNTED as readonly string[]).includes(name)) grant[name] = integer(item, `resources.${name}`);
    else if ((NAMED as readonly string[]).includes(name)) grant[name] = optionalText(item, `resources.${name}`);
    else throw new TypeError(`resources: unknown field ${name}`);
  }
  return Object.freeze(grant) as unknown as Resources;
}

function text(value: unknown, name: string): string {
  if (typeof value !== "string") throw new TypeError(`${name}: not a string`);
  return value;
}

function optionalText(value: unknown, name: string): string | null {
  return value === undefined || value === null ? null : text(value, name);
}

function integer(value: unknown, name: string): number {
  if (!Number.isSafeInteger(value)) throw new TypeError(`${name}: not a safe integer`);
  return value as number;
}

/** kid → public key, from a published key set; a TypeError for a key that is not an Ed25519
 * OKP key or whose kid is not its own. */
async function keysOf(keySet: unknown): Promise<Map<string, CryptoKey>> {
  if (!isObject(keySet)) throw new TypeError("a key set is an object {\"keys\": [jwk, ...]}");
  const jwks = keySet["keys"] ?? [];
  if (!Array.isArray(jwks)) throw new TypeError("the key set's keys are not a list");
  const keys = new Map<string, CryptoKey>();
  for (const jwk of jwks) {
    const name = JSON.stringify(isObject(jwk) ? jwk["kid"] : undefined);
    if (!isObject(jwk) || jwk["kty"] !== "OKP" || jwk["crv"] !== "Ed25519" || (Object.hasOwn(jwk, "alg") && jwk["alg"] !== ALGORITHM)) {
      throw new TypeError(`key ${name} is not an Ed25519 signing key`);
    }
    const raw = unb64(text(jwk["x"], `key ${name}: x`));
    if (raw.length !== KEY_BYTES) throw new TypeError(`key ${name} is not ${KEY_BYTES} bytes`);
    // The kid is the first 12 bytes of the SHA-256 of the raw key: derived, so never shared.
    const kid = b64(new Uint8Array(await crypto.subtle.digest("SHA-256", raw)).subarray(0, 12));
    if (jwk["kid"] !== kid) throw new TypeError(`key ${name}: the kid is not the key's own (${kid})`);
    keys.set(kid, await crypto.subtle.importKey("raw", raw, { name: "Ed25519" }, false, ["verify"]));
  }
  return keys;
}
