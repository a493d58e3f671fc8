"""Writes clients/vectors/capability_tokens.json: capability tokens every verifier must judge
alike (metergate_client/captoken.py, and any port of it).

    python -m clients.vectors.generate_tokens

The tokens are signed with fixed test keys (the SHA-256 of a phrase: never a service's key)
and Ed25519 signatures are deterministic, so the output is a pure function of this file and
the token format: tests/test_capability_vectors.py regenerates it and requires the checked-in
file to be the same bytes. Each case names the token, what the verifier is asked (org,
action, resources a cell would run) at `now_s`, and the expected answer: the claims, or the
refusal.
"""

from __future__ import annotations

import hashlib
import json
import sys
from pathlib import Path

import msgspec
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from metergate_client.captoken import (
    ALGORITHM, TOKEN_TYPE, Claims, Grant, Header, Refusal, b64, key_id, public_jwk, sign)

VECTORS_PATH = Path(__file__).resolve().parent / "capability_tokens.json"
NOW_S = 1_900_000_000
LEEWAY_S = 5  # the verifier's default; the cases at the edges depend on it


def test_key(phrase: str) -> Ed25519PrivateKey:
    return Ed25519PrivateKey.from_private_bytes(hashlib.sha256(phrase.encode()).digest())


CURRENT = test_key("metergate capability test key: current")
PREVIOUS = test_key("metergate capability test key: previous")
UNPUBLISHED = test_key("metergate capability test key: not published")

LEASE = Claims("org_1", "create", NOW_S - 30, NOW_S + 270,
               Grant(memory_mb=4096, cpu_count=2, disk_mb=10_240, machine_type="n2-standard-4",
                     region="us-central1"), "lease_1")
GATE = Claims("org_1", "ingest", NOW_S - 10, NOW_S + 50)


def _raw(header: dict, claims: object, key: Ed25519PrivateKey = CURRENT) -> str:
    """A token with any header, signed properly: for the cases a signer would never make."""
    signing_input = f"{b64(json.dumps(header, separators=(',', ':')).encode())}.{b64(msgspec.json.encode(claims))}"
    return f"{signing_input}.{b64(key.sign(signing_input.encode()))}"


def _ok(claims: Claims, kid: str) -> dict:
    return {"claims": msgspec.to_builtins(claims), "kid": kid}


def _refused(refusal: Refusal) -> dict:
    return {"refusal": refusal.value}


def cases() -> list[dict]:
    lease = sign(CURRENT, LEASE)
    header, claims, signature = lease.split(".")
    kid = key_id(CURRENT.public_key())
    other_org = sign(CURRENT, msgspec.structs.replace(LEASE, org_id="org_2"))
    out = [
        ("a lease's token, asked for its own resources", lease, "org_1", "create",
         {"memory_mb": 4096, "cpu_count": 2, "disk_mb": 10_240, "machine_type": "n2-standard-4",
          "region": "us-central1"}, _ok(LEASE, kid)),
        ("a lease's token, asked for less", lease, "org_1", "create", {"memory_mb": 1024}, _ok(LEASE, kid)),
        ("a lease's token, no org or action named", lease, None, None, None, _ok(LEASE, kid)),
        ("a gate check's token", sign(CURRENT, GATE), "org_1", "ingest", {}, _ok(GATE, kid)),
        ("signed with the previous key, still published", sign(PREVIOUS, LEASE), "org_1", "create", {},
         _ok(LEASE, key_id(PREVIOUS.public_key()))),
        ("within the leeway after expiry", sign(CURRENT, msgspec.structs.replace(LEASE, exp=NOW_S - LEEWAY_S + 1)),
         "org_1", "create", {}, _ok(msgspec.structs.replace(LEASE, exp=NOW_S - LEEWAY_S + 1), kid)),
        ("empty", "", "org_1", "create", {}, _refused(Refusal.MALFORMED)),
        ("not a token", "not-a-token", "org_1", "create", {}, _refused(Refusal.TRUNCATED)),
        ("four parts", lease + ".x", "org_1", "create", {}, _refused(Refusal.MALFORMED)),
        ("not base64url", f"{header}.{claims[:-2]}!!.{signature}", "org_1", "create", {},
         _refused(Refusal.MALFORMED)),
        ("padded base64", f"{header}=.{claims}.{signature}", "org_1", "create", {}, _refused(Refusal.MALFORMED)),
        ("claims not JSON", f"{header}.{b64(b'{not json')}.{signature}", "org_1", "create", {},
         _refused(Refusal.MALFORMED)),
        ("claims without an org", _raw({"alg": ALGORITHM, "kid": kid, "typ": TOKEN_TYPE},
                                       {"action": "create", "iat": NOW_S, "exp": NOW_S + 60}),
         "org_1", "create", {}, _refused(Refusal.MALFORMED)),
        ("longer than 4,096 characters", f"{header}.{claims}{'A' * 4096}.{signature}", "org_1", "create", {},
         _refused(Refusal.MALFORMED)),
        ("the signature cut off", f"{header}.{claims}.", "org_1", "create", {}, _refused(Refusal.TRUNCATED)),
        ("two parts", f"{header}.{claims}", "org_1", "create", {}, _refused(Refusal.TRUNCATED)),
        ("half a signature", f"{header}.{claims}.{signature[:43]}", "org_1", "create", {},
         _refused(Refusal.TRUNCATED)),
        ("alg none", _raw({"alg": "none", "kid": kid, "typ": TOKEN_TYPE}, LEASE), "org_1", "create", {},
         _refused(Refusal.BAD_ALGORITHM)),
        ("alg HS256", _raw({"alg": "HS256", "kid": kid, "typ": TOKEN_TYPE}, LEASE), "org_1", "create", {},
         _refused(Refusal.BAD_ALGORITHM)),
        ("another token type", _raw({"alg": ALGORITHM, "kid": kid, "typ": "JWT"}, LEASE), "org_1", "create", {},
         _refused(Refusal.BAD_ALGORITHM)),
        ("a key not published", sign(UNPUBLISHED, LEASE), "org_1", "create", {}, _refused(Refusal.UNKNOWN_KEY)),
        ("another key under the current key's id",
         _raw(msgspec.to_builtins(Header(ALGORITHM, kid)), LEASE, UNPUBLISHED), "org_1", "create", {},
         _refused(Refusal.BAD_SIGNATURE)),
        ("claims changed after signing (another org)", f"{header}.{other_org.split('.')[1]}.{signature}",
         "org_2", "create", {}, _refused(Refusal.BAD_SIGNATURE)),
        ("another token's signature", f"{header}.{claims}.{other_org.split('.')[2]}", "org_1", "create", {},
         _refused(Refusal.BAD_SIGNATURE)),
        ("expired", sign(CURRENT, msgspec.structs.replace(LEASE, exp=NOW_S - LEEWAY_S)), "org_1", "create", {},
         _refused(Refusal.EXPIRED)),
        ("issued in the future", sign(CURRENT, msgspec.structs.replace(LEASE, iat=NOW_S + LEEWAY_S + 1)),
         "org_1", "create", {}, _refused(Refusal.NOT_YET_VALID)),
        ("another org's token", other_org, "org_1", "create", {}, _refused(Refusal.WRONG_ORG)),
        ("another action's token", sign(CURRENT, GATE), "org_1", "create", {}, _refused(Refusal.WRONG_ACTION)),
        ("more memory than granted", lease, "org_1", "create", {"memory_mb": 4097}, _refused(Refusal.EXCEEDS_GRANT)),
        ("more CPUs than granted", lease, "org_1", "create", {"cpu_count": 3}, _refused(Refusal.EXCEEDS_GRANT)),
        ("more disk than granted", lease, "org_1", "create", {"disk_mb": 10_241}, _refused(Refusal.EXCEEDS_GRANT)),
        ("a larger quantity than granted", lease, "org_1", "create", {"quantity": 2},
         _refused(Refusal.EXCEEDS_GRANT)),
        ("another machine type", lease, "org_1", "create", {"machine_type": "a3-highgpu-8g"},
         _refused(Refusal.EXCEEDS_GRANT)),
        ("another region", lease, "org_1", "create", {"region": "europe-west4"}, _refused(Refusal.EXCEEDS_GRANT)),
        ("memory from a gate token that granted none", sign(CURRENT, GATE), "org_1", "ingest", {"memory_mb": 1},
         _refused(Refusal.EXCEEDS_GRANT)),
    ]
    return [{"name": name, "token": token, "org_id": org, "action": action, "requires": requires, "expect": expect}
            for name, token, org, action, requires, expect in out]


def build() -> dict:
    return {
        "about": "Capability tokens (docs/integrate/capability-tokens.md). For each case, a verifier holding "
                 "key_set, at now_s with a leeway of leeway_s, asked to verify `token` for org_id and action "
                 "(null: not checked) and then to require `requires` (null: not asked), answers `expect`: "
                 "the token's claims and key id, or the refusal.",
        "now_s": NOW_S,
        "leeway_s": LEEWAY_S,
        "key_set": {"keys": [public_jwk(CURRENT.public_key()), public_jwk(PREVIOUS.public_key())]},
        "cases": cases(),
    }


def render() -> str:
    """The file's exact text: sorted keys, indent 1, one trailing newline."""
    return json.dumps(build(), sort_keys=True, indent=1, ensure_ascii=True) + "\n"


def main() -> int:
    text = render()
    VECTORS_PATH.write_text(text, encoding="utf-8")
    print(f"{VECTORS_PATH}: {len(json.loads(text)['cases'])} cases")
    return 0


if __name__ == "__main__":
    sys.exit(main())
