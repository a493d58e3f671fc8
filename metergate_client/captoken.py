"""Capability tokens: what a compute cell checks, offline, before it creates anything.

An allowed lease (and a gate check that asks for one) comes back with a token the service
signed with Ed25519: `<header>.<claims>.<signature>`, each part unpadded base64url, the header
`{"alg":"EdDSA","kid":...,"typ":"mgcap+jwt"}` (the JWS compact form, RFC 8037), the claims
the org, the lease, the action, the granted resources, issued-at and expiry. A cell holds the
service's public keys (GET /.well-known/metergate-keys) and refuses a create whose token is
missing, forged, expired, for another org, or for less than it is asked to run
(docs/integrate/capability-tokens.md).

Ed25519 verification costs ~80 µs here (~12k/s on one core of the 2-core host), below what a
cell's hot path wants; a Verifier therefore remembers the tokens whose signature it checked
(at most `cache_size`, each until its expiry) and checks a token it saw before with a dict
lookup: expiry, org, action and resources are still checked on every call.

Needs msgspec and `cryptography`; never the server's packages.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import time
from collections.abc import Callable
from enum import StrEnum

import msgspec
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from metergate_client.decision import Resources

ALGORITHM = "EdDSA"
TOKEN_TYPE = "mgcap+jwt"
MAX_TOKEN_BYTES = 4_096  # a real token is ~400 bytes: anything longer is refused before decoding
SIGNATURE_BYTES = 64
KEY_BYTES = 32
DEFAULT_CACHE_SIZE = 100_000  # verified tokens remembered, each ~1 KB: ~100 MB at most
LEEWAY_S = 5  # the cell's clock may be this far behind or ahead of the service's


class Refusal(StrEnum):
    """Why a token was refused: one value per thing that can be wrong with it."""

    MALFORMED = "malformed"  # not three base64url parts of JSON with the claims of a token
    TRUNCATED = "truncated"  # a part or part of the signature is missing
    BAD_ALGORITHM = "bad_algorithm"  # the header names another algorithm (or type)
    UNKNOWN_KEY = "unknown_key"  # signed with a key id the key set does not publish
    BAD_SIGNATURE = "bad_signature"  # forged, or changed after signing
    EXPIRED = "expired"  # past its `exp` (a lease's expiry, or a gate token's short life)
    NOT_YET_VALID = "not_yet_valid"  # issued later than now: a clock far off, or a forgery
    WRONG_ORG = "wrong_org"  # valid, for another org
    WRONG_ACTION = "wrong_action"  # valid, for another action
    EXCEEDS_GRANT = "exceeds_grant"  # valid, for fewer resources than asked


class CapabilityError(Exception):
    """A refused token; `refusal` says why (a Refusal), the message says it for people."""

    def __init__(self, refusal: Refusal, message: str) -> None:
        super().__init__(f"{refusal.value}: {message}")
        self.refusal = refusal


class Header(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    alg: str
    kid: str
    typ: str = TOKEN_TYPE


class Grant(msgspec.Struct, frozen=True, omit_defaults=True, forbid_unknown_fields=True):
    """The resources a token grants (a lease's, or a gate check's): what the cell may run."""

    memory_mb: int = 0
    cpu_count: int = 0
    disk_mb: int = 0
    machine_type: str | None = None
    region: str | None = None
    quantity: int = 1

    @classmethod
    def of(cls, resources: Resources) -> Grant:
        return cls(resources.memory_mb, resources.cpu_count, resources.disk_mb, resources.machine_type,
                   resources.region, resources.quantity)


class Claims(msgspec.Struct, frozen=True, omit_defaults=True):
    """What a token says. Unknown fields are ignored (a later service may add some: the
    signature covers them either way)."""

    org_id: str
    action: str  # "create" for a lease; a gate check's own action
    iat: int  # epoch s
    exp: int  # epoch s: the lease's expiry, or the gate check's + GATE_TOKEN_TTL_S
    resources: Grant = Grant()
    lease_id: str | None = None  # a lease's; none for a gate check's token
    tier: str | None = None  # the org's tier and plan when the lease was granted (a lease's token)
    plan: str | None = None


class Capability(msgspec.Struct, frozen=True):
    """A token that verified: its claims and the key that signed it."""

    claims: Claims
    kid: str

    def requires(self, resources: Resources | Grant) -> None:
        """Raise EXCEEDS_GRANT unless `resources` fit in what the token grants: no more memory,
        CPUs, disk or quantity, and the same machine type and region where one is asked for."""
        granted = self.claims.resources
        for name in ("memory_mb", "cpu_count", "disk_mb", "quantity"):
            asked = getattr(resources, name)
            if asked > getattr(granted, name):
                raise CapabilityError(Refusal.EXCEEDS_GRANT, f"{name} {asked} asked, {getattr(granted, name)} granted")
        for name in ("machine_type", "region"):
            asked = getattr(resources, name)
            if asked is not None and asked != getattr(granted, name):
                raise CapabilityError(Refusal.EXCEEDS_GRANT,
                                      f"{name} {asked!r} asked, {getattr(granted, name)!r} granted")


_HEADER_DECODER = msgspec.json.Decoder(Header)
_CLAIMS_DECODER = msgspec.json.Decoder(Claims)
_ENCODE = msgspec.json.Encoder().encode


def b64(raw: bytes) -> str:
    return base64.urlsafe_b64encode(raw).rstrip(b"=").decode()


def unb64(text: str) -> bytes:
    """Strict unpadded base64url: ValueError for any other character or a bad length."""
    if "=" in text or len(text) % 4 == 1:
        raise ValueError("not unpadded base64url")
    raw = base64.b64decode(text + "=" * (-len(text) % 4), altchars=b"-_", validate=True)
    if b64(raw) != text:  # the last character's unused bits set: another spelling of the same bytes
        raise ValueError("not canonical base64url")
    return raw


def key_id(public: Ed25519PublicKey) -> str:
    """A key's id: the first 12 bytes of the SHA-256 of its raw public key, base64url. Derived,
    so a key carries its id everywhere and two keys never share one."""
    return b64(hashlib.sha256(public.public_bytes_raw()).digest()[:12])


def sign(private: Ed25519PrivateKey, claims: Claims) -> str:
    """The token for `claims`, signed with `private` (the service's, or a test key)."""
    header = b64(_ENCODE(Header(ALGORITHM, key_id(private.public_key()))))
    signing_input = f"{header}.{b64(_ENCODE(claims))}"
    return f"{signing_input}.{b64(private.sign(signing_input.encode()))}"


def public_jwk(public: Ed25519PublicKey) -> dict:
    """One key as GET /.well-known/metergate-keys publishes it (an OKP JWK, RFC 8037)."""
    return {"kty": "OKP", "crv": "Ed25519", "x": b64(public.public_bytes_raw()), "kid": key_id(public),
            "use": "sig", "alg": ALGORITHM}


def keys_of(key_set: dict) -> dict[str, Ed25519PublicKey]:
    """kid → public key, from a published key set ({"keys": [jwk, ...]}); ValueError for a key
    that is not an Ed25519 OKP key or whose kid is not its own."""
    keys = {}
    for jwk in key_set.get("keys", []):
        if jwk.get("kty") != "OKP" or jwk.get("crv") != "Ed25519" or jwk.get("alg", ALGORITHM) != ALGORITHM:
            raise ValueError(f"key {jwk.get('kid')!r} is not an Ed25519 signing key")
        raw = unb64(jwk["x"])
        if len(raw) != KEY_BYTES:
            raise ValueError(f"key {jwk.get('kid')!r} is not 32 bytes")
        public = Ed25519PublicKey.from_public_bytes(raw)
        if jwk.get("kid") != key_id(public):
            raise ValueError(f"key {jwk.get('kid')!r}: the kid is not the key's own ({key_id(public)})")
        keys[jwk["kid"]] = public
    return keys


class Verifier:
    """Checks tokens offline against a key set (the service's published keys).

        verifier = Verifier(httpx.get(f"{billing}/.well-known/metergate-keys").json())
        capability = verifier.verify(token, org_id="org_1", action="create")
        capability.requires(Resources(memory_mb=4096))

    Every refusal is a CapabilityError naming why. Not thread-safe (one per thread, or a lock).
    """

    def __init__(self, key_set: dict, cache_size: int = DEFAULT_CACHE_SIZE,
                 clock: Callable[[], float] = time.time, leeway_s: int = LEEWAY_S) -> None:
        assert cache_size >= 0 and leeway_s >= 0
        self._keys = keys_of(key_set)
        self._cache: dict[str, Capability] = {}  # token → what it said, signature checked
        self._cache_size = cache_size
        self._clock = clock
        self._leeway_s = leeway_s

    @property
    def key_ids(self) -> list[str]:
        return sorted(self._keys)

    def set_keys(self, key_set: dict) -> None:
        """Take a new key set (after a rotation): tokens remembered under a key it drops are
        forgotten, and refused from now on."""
        self._keys = keys_of(key_set)
        self._cache = {token: c for token, c in self._cache.items() if c.kid in self._keys}

    def verify(self, token: str, org_id: str | None = None, action: str | None = None) -> Capability:
        """The token's capability, if its signature is one of the keys', it is in force now,
        and (when named) for `org_id` and `action`; else CapabilityError."""
        capability = self._cache.get(token)
        if capability is None:
            capability = self._checked(token)
        claims = capability.claims
        now_s = self._clock()
        if claims.exp + self._leeway_s <= now_s:
            raise CapabilityError(Refusal.EXPIRED, f"expired at {claims.exp}")
        if claims.iat - self._leeway_s > now_s:
            raise CapabilityError(Refusal.NOT_YET_VALID, f"issued at {claims.iat}, after now")
        if org_id is not None and claims.org_id != org_id:
            raise CapabilityError(Refusal.WRONG_ORG, f"for org {claims.org_id!r}, not {org_id!r}")
        if action is not None and claims.action != action:
            raise CapabilityError(Refusal.WRONG_ACTION, f"for {claims.action!r}, not {action!r}")
        return capability

    def _checked(self, token: str) -> Capability:
        if not isinstance(token, str) or not token:
            raise CapabilityError(Refusal.MALFORMED, "no token")
        if len(token) > MAX_TOKEN_BYTES:
            raise CapabilityError(Refusal.MALFORMED, f"longer than {MAX_TOKEN_BYTES} characters")
        parts = token.split(".")
        if len(parts) < 3 or not parts[2]:
            raise CapabilityError(Refusal.TRUNCATED, f"{len(parts)} of 3 parts")
        if len(parts) > 3:
            raise CapabilityError(Refusal.MALFORMED, f"{len(parts)} parts, not 3")
        header_b64, claims_b64, signature_b64 = parts
        if len(signature_b64) < len(b64(bytes(SIGNATURE_BYTES))):  # cut short, before its spelling is checked
            raise CapabilityError(Refusal.TRUNCATED, f"a signature of {len(signature_b64)} characters")
        try:
            header = _HEADER_DECODER.decode(unb64(header_b64))
            claims = _CLAIMS_DECODER.decode(unb64(claims_b64))
            signature = unb64(signature_b64)
        except (ValueError, binascii.Error, msgspec.DecodeError) as exc:
            raise CapabilityError(Refusal.MALFORMED, f"cannot be read ({type(exc).__name__})") from None
        if header.alg != ALGORITHM or header.typ != TOKEN_TYPE:
            raise CapabilityError(Refusal.BAD_ALGORITHM, f"alg {header.alg!r} typ {header.typ!r}, "
                                  f"not {ALGORITHM!r} {TOKEN_TYPE!r}")
        if len(signature) < SIGNATURE_BYTES:
            raise CapabilityError(Refusal.TRUNCATED, f"a signature of {len(signature)} of {SIGNATURE_BYTES} bytes")
        public = self._keys.get(header.kid)
        if public is None:
            raise CapabilityError(Refusal.UNKNOWN_KEY, f"key {header.kid!r} is not in the key set")
        try:
            public.verify(signature, f"{header_b64}.{claims_b64}".encode())
        except InvalidSignature:
            raise CapabilityError(Refusal.BAD_SIGNATURE, f"not signed by key {header.kid!r}") from None
        capability = Capability(claims, header.kid)
        self._remember(token, capability)
        return capability

    def _remember(self, token: str, capability: Capability) -> None:
        if self._cache_size == 0:
            return
        if len(self._cache) >= self._cache_size:
            # Full: the expired go, and if that frees less than a quarter, the oldest too, down to
            # three quarters. A sweep per insert would make every new token cost the whole cache.
            now_s = self._clock()
            kept = [(t, c) for t, c in self._cache.items() if c.claims.exp + self._leeway_s > now_s]
            self._cache = dict(kept[max(0, len(kept) - self._cache_size * 3 // 4):])
        self._cache[token] = capability
