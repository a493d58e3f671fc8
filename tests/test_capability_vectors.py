"""Capability-token vectors (clients/vectors/capability_tokens.json): the generator writes the
checked-in file byte for byte, every refusal is in them, and the Python verifier answers each
case as written. No service: the tokens are signed with fixed test keys."""

from __future__ import annotations

import json

import msgspec
import pytest

from clients.vectors import generate_tokens
from metergate_client.captoken import CapabilityError, Grant, Refusal, Verifier

VECTORS = json.loads(generate_tokens.VECTORS_PATH.read_text(encoding="utf-8"))


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


@pytest.mark.parametrize("case", VECTORS["cases"], ids=[case["name"] for case in VECTORS["cases"]])
def test_the_verifier_answers_each_vector_as_written(case):
    verifier = Verifier(VECTORS["key_set"], clock=lambda: VECTORS["now_s"], leeway_s=VECTORS["leeway_s"])
    assert judged(verifier, case) == case["expect"]


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
