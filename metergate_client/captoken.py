"""Capability tokens: what a compute cell checks, offline, before it creates anything.

An allowed lease (and a gate check that asks for one) comes back with a token the service
signed with Ed25519: `<header>.<claims>.<signature>`, each part unpadded base64url, the header
`{"alg":"EdDSA","kid":...,"typ":"mgcap+jwt"}` (the JWS compact form, RFC 8037), the claims
the org, the lease, the action, the granted resources, issued-at and expiry. A cell holds the
service's public keys (GET /.well-known/metergate-keys) and refuses a create whose token is
missing, forged, expired, for another org, or for less than it is asked to run
(docs/integrate/capability-tokens.md).

The Ed25519 check is libsodium's (PyNaCl) when it is installed, ~40 µs here, else
`cryptography`'s (OpenSSL), ~85 µs: either is below what a cell's hot path wants, so a
Verifier also remembers the tokens whose signature it checked (at most `cache_size`, each
until its expiry) and checks a token it saw before with a dict lookup: expiry, org, action and
resources are still checked on every call.

The two libraries do not judge every signature alike: libsodium refuses a key or an R of small
order, which OpenSSL accepts when the equation holds (with the identity as key, S = 0 "verifies"
any message). So before either is asked, a key set is refused unless each key is the canonical
encoding of a point of large order, and a signature is refused unless it is 64 bytes, its S is
below the group order and its R is not of small order (`_signature_refused`). RFC 8032 already
refuses a non-canonical encoding and S >= L; small order it allows, and is refused here, as
libsodium does: no private key stands behind a small-order key, and the service's signer never
makes a small-order R. With those checks both answer every token alike
(tests/test_capability_vectors.py runs every vector and these edges through both).

Needs msgspec and `cryptography` (PyNaCl if present); never the server's packages.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import time
from collections.abc import Callable, Iterable
from enum import StrEnum

import msgspec
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from metergate_client.decision import Resources

try:  # PyNaCl's binding of libsodium has no detached verify: crypto_sign_open takes signature + message
    from nacl.bindings import crypto_sign_open as _sodium_open
    from nacl.exceptions import BadSignatureError as _SodiumRefused
except ImportError:  # pragma: no cover - PyNaCl is a dependency of metergate, not of every cell
    _sodium_open = None

ALGORITHM = "EdDSA"
TOKEN_TYPE = "mgcap+jwt"
MAX_TOKEN_BYTES = 4_096  # a real token is ~400 bytes: anything longer is refused before decoding
SIGNATURE_BYTES = 64
SIGNATURE_CHARS = 86  # 64 bytes in unpadded base64url
KEY_BYTES = 32
DEFAULT_CACHE_SIZE = 100_000  # verified tokens remembered, each ~1 KB: ~100 MB at most
LEEWAY_S = 5  # the cell's clock may be this far behind or ahead of the service's

FIELD_PRIME = 2**255 - 19  # p: a point's encoding is y < p, and x's sign in the top bit (RFC 8032 5.1.2)
GROUP_ORDER = 2**252 + 27742317777372353535851937790883648493  # L: a signature's S is below it (5.1.7)
# The encodings of the 8 points of small order (order 1, 2, 4, 8), y only (the sign bit cleared),
# as libsodium lists them (ge25519_has_small_order), the non-canonical y = p and p + 1 included.
# tests/test_capability_vectors.py proves each is a point whose 8th multiple is the identity.
SMALL_ORDER_Y = frozenset(bytes.fromhex(y) for y in (
    "0000000000000000000000000000000000000000000000000000000000000000",  # y = 0: order 4
    "0100000000000000000000000000000000000000000000000000000000000000",  # y = 1: the identity
    "26e8958fc2b227b045c3f489f2ef98f0d5dfac05d3c63339b13802886d53fc05",  # order 8
    "c7176a703d4dd84fba3c0b760d10670f2a2053fa2c39ccc64ec7fd7792ac037a",  # order 8
    "ecffffffffffffffffffffffffffffffffffffffffffffffffffffffffffff7f",  # y = p - 1: order 2
    "edffffffffffffffffffffffffffffffffffffffffffffffffffffffffffff7f",  # y = p (0): order 4
    "eeffffffffffffffffffffffffffffffffffffffffffffffffffffffffffff7f",  # y = p + 1 (1): the identity
))


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


class Ed25519Backend(msgspec.Struct, frozen=True):
    """A library's Ed25519 check: `prepared` turns a raw public key into what `verifies` takes
    (once per key set), `verifies(prepared key, signature, signed bytes)` answers."""

    name: str
    prepared: Callable[[bytes], object]
    verifies: Callable[[object, bytes, bytes], bool]


def _openssl_verifies(public: Ed25519PublicKey, signature: bytes, signed: bytes) -> bool:
    try:
        public.verify(signature, signed)
    except InvalidSignature:
        return False
    return True


def _sodium_verifies(public: bytes, signature: bytes, signed: bytes) -> bool:
    try:
        _sodium_open(signature + signed, public)
    except _SodiumRefused:
        return False
    return True


BACKENDS: dict[str, Ed25519Backend] = {"cryptography": Ed25519Backend(
    "cryptography", Ed25519PublicKey.from_public_bytes, _openssl_verifies)}
if _sodium_open is not None:
    BACKENDS["libsodium"] = Ed25519Backend("libsodium", bytes, _sodium_verifies)
DEFAULT_BACKEND = "libsodium" if "libsodium" in BACKENDS else "cryptography"


def key_refused(raw: bytes) -> str | None:
    """Why a raw Ed25519 public key is not one to verify with, or None: 32 bytes, the canonical
    encoding (y < p), and a point of large order (see the module's note)."""
    if len(raw) != KEY_BYTES:
        return f"{len(raw)} bytes, not {KEY_BYTES}"
    y = raw[:31] + bytes((raw[31] & 0x7F,))
    if int.from_bytes(y, "little") >= FIELD_PRIME:
        return "not the canonical encoding of a point (y >= p)"
    if y in SMALL_ORDER_Y:
        return "a point of small order (anyone can sign for it)"
    return None


def _signature_refused(signature: bytes) -> str | None:
    """Why a signature is refused before any library is asked, or None (see the module's note)."""
    if len(signature) != SIGNATURE_BYTES:
        return f"of {len(signature)} bytes, not {SIGNATURE_BYTES}"
    if int.from_bytes(signature[32:], "little") >= GROUP_ORDER:
        return "whose S is not below the group order"
    if signature[:31] + bytes((signature[31] & 0x7F,)) in SMALL_ORDER_Y:
        return "whose R is a point of small order"
    return None


_HEADER_DECODER = msgspec.json.Decoder(Header)
_CLAIMS_DECODER = msgspec.json.Decoder(Claims)
_ENCODE = msgspec.json.Encoder().encode


def b64(raw: bytes) -> str:
    return base64.urlsafe_b64encode(raw).rstrip(b"=").decode()


_URL_TO_STANDARD = bytes.maketrans(b"-_+/", b"+/-_")  # "+" and "/" become characters strict mode refuses
_ALPHABET_INDEX = {c: i for i, c in enumerate("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_")}
_PADDING = ("", None, "==", "=")  # by len % 4 (1: never a length of base64)
_SPARE_BITS_MASK = (0, None, 0b1111, 0b11)  # the bits of the last character that encode nothing


def unb64(text: str) -> bytes:
    """Strict unpadded base64url: ValueError for any other character or a bad length, and for
    a last character with unused bits set (another spelling of the same bytes). On a first-sight
    token's path three times, so without a second encoding to compare."""
    rest = len(text) % 4
    if rest == 1 or "=" in text:
        raise ValueError("not unpadded base64url")
    standard = (text + _PADDING[rest]).encode("ascii").translate(_URL_TO_STANDARD)
    raw = binascii.a2b_base64(standard, strict_mode=True)
    if rest and _ALPHABET_INDEX[text[-1]] & _SPARE_BITS_MASK[rest]:
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


def keys_of(key_set: dict) -> dict[str, bytes]:
    """kid → raw public key, from a published key set ({"keys": [jwk, ...]}); ValueError for a
    key that is not an Ed25519 OKP key, not 32 bytes, not canonical or of small order
    (key_refused), or whose kid is not its own."""
    keys = {}
    for jwk in key_set.get("keys", []):
        if jwk.get("kty") != "OKP" or jwk.get("crv") != "Ed25519" or jwk.get("alg", ALGORITHM) != ALGORITHM:
            raise ValueError(f"key {jwk.get('kid')!r} is not an Ed25519 signing key")
        raw = unb64(jwk["x"])
        why = key_refused(raw)
        if why is not None:
            raise ValueError(f"key {jwk.get('kid')!r} is {why}")
        public = Ed25519PublicKey.from_public_bytes(raw)
        if jwk.get("kid") != key_id(public):
            raise ValueError(f"key {jwk.get('kid')!r}: the kid is not the key's own ({key_id(public)})")
        keys[jwk["kid"]] = raw
    return keys


class Verifier:
    """Checks tokens offline against a key set (the service's published keys).

        verifier = Verifier(httpx.get(f"{billing}/.well-known/metergate-keys").json())
        capability = verifier.verify(token, org_id="org_1", action="create")
        capability.requires(Resources(memory_mb=4096))

    Every refusal is a CapabilityError naming why. Not thread-safe (one per thread, or a lock).
    `backend` names the Ed25519 library (BACKENDS: "libsodium" when PyNaCl is installed, else
    "cryptography"); both answer every token alike.
    """

    def __init__(self, key_set: dict, cache_size: int = DEFAULT_CACHE_SIZE,
                 clock: Callable[[], float] = time.time, leeway_s: int = LEEWAY_S,
                 backend: str = DEFAULT_BACKEND) -> None:
        assert cache_size >= 0 and leeway_s >= 0
        if backend not in BACKENDS:
            raise ValueError(f"Ed25519 backend {backend!r} is not available here (have: {', '.join(BACKENDS)})")
        self.backend = BACKENDS[backend]
        self._keys = self._prepared(key_set)
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
        self._keys = self._prepared(key_set)
        self._cache = {token: c for token, c in self._cache.items() if c.kid in self._keys}

    def _prepared(self, key_set: dict) -> dict[str, object]:
        return {kid: self.backend.prepared(raw) for kid, raw in keys_of(key_set).items()}

    def verify_many(self, checks: Iterable[tuple[str, str | None, str | None]]) -> list[Capability | CapabilityError]:
        """verify(token, org_id, action) of each check, in order: its Capability, or the
        CapabilityError in its place (one refused token does not stop the others)."""
        answers: list[Capability | CapabilityError] = []
        for token, org_id, action in checks:
            try:
                answers.append(self.verify(token, org_id, action))
            except CapabilityError as exc:
                answers.append(exc)
        return answers

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
        if len(signature_b64) < SIGNATURE_CHARS:  # cut short, before its spelling is checked
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
        why = _signature_refused(signature)
        if why is not None:
            raise CapabilityError(Refusal.BAD_SIGNATURE, f"a signature {why}")
        if not self.backend.verifies(public, signature, f"{header_b64}.{claims_b64}".encode()):
            raise CapabilityError(Refusal.BAD_SIGNATURE, f"not signed by key {header.kid!r}")
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
