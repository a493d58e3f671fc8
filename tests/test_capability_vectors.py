"""Capability-token vectors (clients/vectors/capability_tokens.json): the generator writes the
checked-in file byte for byte, every refusal is in them, and the Python verifier answers each
case as written, with each Ed25519 library it can use (libsodium, cryptography); and the edges
where the two libraries alone disagree (small-order keys and R, S >= L, a long signature) are
answered alike by both. No service: the tokens are signed with fixed test keys."""

from __future__ import annotations

import hashlib
import json

import msgspec
import pytest
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey
from nacl.bindings import crypto_sign_open
from nacl.exceptions import BadSignatureError

from clients.vectors import generate_tokens
from metergate_client.captoken import (
    BACKENDS, DEFAULT_BACKEND, FIELD_PRIME, GROUP_ORDER, SMALL_ORDER_Y, CapabilityError, Grant, Refusal, Verifier,
    b64, sign, unb64)

VECTORS = json.loads(generate_tokens.VECTORS_PATH.read_text(encoding="utf-8"))
BACKEND_NAMES = ["libsodium", "cryptography"]


def judged(verifier: Verifier, case: dict) -> dict:
    """What the verifier answers for a case, in the vectors' terms."""
    try:
        capability = verifier.verify(case["token"], case["org_id"], case["action"])
        if case["requires"] is not None:
            capability.requires(msgspec.convert(case["requires"], Grant))
    except CapabilityError as exc:
        return {"refusal": exc.refusal.value}
    return {"claims": msgspec.to_builtins(capability.claims), "kid": capability.kid}


def test_the_generator_writes_the_checked_in_file_byte_for_byte():
    assert generate_tokens.render().encode("utf-8") == generate_tokens.VECTORS_PATH.read_bytes(), (
        "clients/vectors/capability_tokens.json differs from what the generator writes: "
        "run `python -m clients.vectors.generate_tokens`")


def test_every_refusal_is_in_the_vectors():
    refused = {case["expect"].get("refusal") for case in VECTORS["cases"]}
    assert {r.value for r in Refusal} <= refused
    assert any("claims" in case["expect"] for case in VECTORS["cases"])


def test_both_ed25519_libraries_are_here_and_libsodium_is_the_default():
    """PyNaCl is a dependency of metergate: without it the runs below would test one library."""
    assert sorted(BACKENDS) == sorted(BACKEND_NAMES) and DEFAULT_BACKEND == "libsodium"
    assert Verifier(VECTORS["key_set"]).backend.name == "libsodium"
    with pytest.raises(ValueError, match="not available"):
        Verifier(VECTORS["key_set"], backend="openssl")


@pytest.mark.parametrize("backend", BACKEND_NAMES)
@pytest.mark.parametrize("case", VECTORS["cases"], ids=[case["name"] for case in VECTORS["cases"]])
def test_the_verifier_answers_each_vector_as_written(case, backend):
    verifier = Verifier(VECTORS["key_set"], clock=lambda: VECTORS["now_s"], leeway_s=VECTORS["leeway_s"],
                        backend=backend)
    assert judged(verifier, case) == case["expect"]


@pytest.mark.parametrize("backend", BACKEND_NAMES)
def test_verify_many_answers_each_vector_as_verify_does(backend):
    verifier = Verifier(VECTORS["key_set"], clock=lambda: VECTORS["now_s"], leeway_s=VECTORS["leeway_s"],
                        backend=backend)
    answers = verifier.verify_many((c["token"], c["org_id"], c["action"]) for c in VECTORS["cases"])
    for case, answer in zip(VECTORS["cases"], answers, strict=True):
        if "refusal" in case["expect"] and case["requires"] in (None, {}):
            assert isinstance(answer, CapabilityError) and answer.refusal.value == case["expect"]["refusal"]
        elif "claims" in case["expect"]:
            assert msgspec.to_builtins(answer.claims) == case["expect"]["claims"], case["name"]


def test_a_remembered_token_is_still_refused_once_it_expires_or_for_another_org():
    """The cache of checked signatures keeps nothing but the signature check: the same token,
    verified once, is judged again on every call."""
    valid = next(c for c in VECTORS["cases"] if c["name"] == "a lease's token, asked for less")
    now = [VECTORS["now_s"]]
    verifier = Verifier(VECTORS["key_set"], clock=lambda: now[0], leeway_s=VECTORS["leeway_s"])
    assert "claims" in judged(verifier, valid)
    assert judged(verifier, {**valid, "org_id": "org_2"}) == {"refusal": "wrong_org"}
    assert judged(verifier, {**valid, "requires": {"memory_mb": 8192}}) == {"refusal": "exceeds_grant"}
    now[0] = valid["expect"]["claims"]["exp"] + VECTORS["leeway_s"]
    assert judged(verifier, valid) == {"refusal": "expired"}


def test_a_key_dropped_from_the_key_set_voids_the_tokens_it_signed_even_remembered():
    previous = next(c for c in VECTORS["cases"] if c["name"] == "signed with the previous key, still published")
    verifier = Verifier(VECTORS["key_set"], clock=lambda: VECTORS["now_s"])
    assert "claims" in judged(verifier, previous)
    verifier.set_keys({"keys": [k for k in VECTORS["key_set"]["keys"] if k["kid"] != previous["expect"]["kid"]]})
    assert judged(verifier, previous) == {"refusal": "unknown_key"}


def test_the_cache_stays_within_its_size():
    cases = [c for c in VECTORS["cases"] if "claims" in c["expect"]]
    verifier = Verifier(VECTORS["key_set"], cache_size=2, clock=lambda: VECTORS["now_s"])
    for case in cases:
        assert "claims" in judged(verifier, case)
    assert len(verifier._cache) <= 2


def test_a_key_set_with_a_wrong_kid_or_another_curve_is_refused():
    key = VECTORS["key_set"]["keys"][0]
    with pytest.raises(ValueError, match="not the key's own"):
        Verifier({"keys": [{**key, "kid": "someone-else"}]})
    with pytest.raises(ValueError, match="not an Ed25519"):
        Verifier({"keys": [{**key, "crv": "X25519"}]})


# ----- the edges where libsodium and OpenSSL alone disagree ------------------------------------------

P, L = FIELD_PRIME, GROUP_ORDER
D = -121665 * pow(121666, P - 2, P) % P
IDENTITY = bytes([1]) + bytes(31)


def _point(encoded: bytes) -> tuple[int, int]:
    """RFC 8032 5.1.3, the y reduced mod p (as OpenSSL reads it): (x, y) on the curve."""
    y = int.from_bytes(encoded, "little") & ((1 << 255) - 1)
    y %= P
    u, v = (y * y - 1) % P, (D * y * y + 1) % P
    x = u * pow(v, P - 2, P) % P
    root = pow(x, (P + 3) // 8, P)
    if root * root % P != x:
        root = root * pow(2, (P - 1) // 4, P) % P
    assert root * root % P == x, "not on the curve"
    return (P - root if root and (root & 1) != encoded[31] >> 7 else root), y


def _add(a: tuple[int, int], b: tuple[int, int]) -> tuple[int, int]:
    (x1, y1), (x2, y2) = a, b
    t = D * x1 * x2 * y1 * y2 % P
    return ((x1 * y2 + x2 * y1) * pow(1 + t, P - 2, P) % P, (y1 * y2 + x1 * x2) * pow(1 - t, P - 2, P) % P)


def _order(point: tuple[int, int]) -> int:
    """The order of a point of small order (1, 2, 4 or 8); 0 if it is none of those."""
    multiple = point
    for order in range(1, 9):
        if multiple == (0, 1):
            return order
        multiple = _add(multiple, point)
    return 0


def test_the_small_order_encodings_are_exactly_the_points_of_order_at_most_8():
    """The list the verifier refuses, checked by point arithmetic: 5 y values (y = p and p + 1
    spell 0 and 1 again), the two of order 8 being y and -y."""
    assert sorted(_order(_point(y)) for y in SMALL_ORDER_Y) == [1, 1, 2, 4, 4, 8, 8]
    ys = sorted({int.from_bytes(y, "little") % P for y in SMALL_ORDER_Y})
    assert len(ys) == 5 and ys[:2] == [0, 1] and ys[-1] == P - 1 and ys[2] + ys[3] == P
    assert _order(_point(_raw(generate_tokens.CURRENT))) == 0  # a real key: of large order


def _raw(private) -> bytes:
    return private.public_key().public_bytes_raw()


def _signed_by_holder_with_r_identity(private, message: bytes) -> bytes:
    """A signature only the key's holder can make, R the identity: S = k * a (r = 0). The
    equation holds, so RFC 8032 and OpenSSL accept it; libsodium refuses a small-order R."""
    digest = hashlib.sha512(private.private_bytes_raw()).digest()
    a = int.from_bytes(digest[:32], "little") & ((1 << 254) - 8) | (1 << 254)
    k = int.from_bytes(hashlib.sha512(IDENTITY + _raw(private) + message).digest(), "little") % L
    return IDENTITY + (k * a % L).to_bytes(32, "little")


def _respelled(token: str, signature: bytes) -> str:
    header, claims, _ = token.split(".")
    return f"{header}.{claims}.{b64(signature)}"


def _lease_token() -> tuple[str, bytes, bytes]:
    """(the vectors' lease token, its signed bytes, its signature)."""
    token = sign(generate_tokens.CURRENT, generate_tokens.LEASE)
    header, claims, signature = token.split(".")
    return token, f"{header}.{claims}".encode(), unb64(signature)


def _edge_tokens() -> dict[str, str]:
    token, signed, signature = _lease_token()
    s = int.from_bytes(signature[32:], "little")
    return {
        "a signature of 65 bytes": _respelled(token, signature + b"\0"),
        "S + L (another spelling of S)": _respelled(token, signature[:32] + (s + L).to_bytes(32, "little")),
        "R the identity, made by the key's holder": _respelled(
            token, _signed_by_holder_with_r_identity(generate_tokens.CURRENT, signed)),
    }


BAD_KEYS = {
    "the identity": IDENTITY,  # with it, R the identity and S = 0 "verify" any message in OpenSSL
    "the identity, spelled y = p + 1": (P + 1).to_bytes(32, "little"),
    "of order 8": bytes.fromhex("26e8958fc2b227b045c3f489f2ef98f0d5dfac05d3c63339b13802886d53fc05"),
    "y = p + 2, not canonical": (P + 2).to_bytes(32, "little"),
}


def _openssl_accepts(raw: bytes, signature: bytes, signed: bytes) -> bool:
    try:
        Ed25519PublicKey.from_public_bytes(raw).verify(signature, signed)
    except InvalidSignature:
        return False
    return True


def _sodium_accepts(raw: bytes, signature: bytes, signed: bytes) -> bool:
    try:
        crypto_sign_open(signature + signed, raw)
    except BadSignatureError:
        return False
    return True


def test_the_two_libraries_alone_disagree_on_small_order_keys_and_r():
    """Why the verifier checks keys and signatures itself before asking either library."""
    _, signed, _ = _lease_token()
    r_identity = _signed_by_holder_with_r_identity(generate_tokens.CURRENT, signed)
    current = _raw(generate_tokens.CURRENT)
    judged = (_openssl_accepts(current, r_identity, signed), _sodium_accepts(current, r_identity, signed))
    assert judged == (True, False)
    forged = IDENTITY + bytes(32)
    assert (_openssl_accepts(IDENTITY, forged, b"anything"), _sodium_accepts(IDENTITY, forged, b"anything")) == (
        True, False)


@pytest.mark.parametrize("backend", BACKEND_NAMES)
@pytest.mark.parametrize("edge", list(_edge_tokens()))
def test_an_edge_signature_is_refused_alike_by_both_libraries(edge, backend):
    verifier = Verifier(VECTORS["key_set"], clock=lambda: VECTORS["now_s"], backend=backend)
    with pytest.raises(CapabilityError) as refused:
        verifier.verify(_edge_tokens()[edge], "org_1", "create")
    assert refused.value.refusal is Refusal.BAD_SIGNATURE


@pytest.mark.parametrize("backend", BACKEND_NAMES)
@pytest.mark.parametrize("name", list(BAD_KEYS))
def test_a_key_set_with_a_small_order_or_non_canonical_key_is_refused_by_both(name, backend):
    raw = BAD_KEYS[name]
    jwk = {"kty": "OKP", "crv": "Ed25519", "x": b64(raw), "use": "sig", "alg": "EdDSA",
           "kid": b64(hashlib.sha256(raw).digest()[:12])}  # its own kid (key_id)
    with pytest.raises(ValueError, match="small order|not the canonical"):
        Verifier({"keys": [jwk]}, backend=backend)
