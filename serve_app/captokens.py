"""The service's side of capability tokens (metergate_client/captoken.py has the format and the
verifier): the signing key, the key set it publishes, and the tokens an allowed lease or gate
check carries.

The key is METERGATE_CAPABILITY_KEY (32 bytes, base64url; generated once and kept with the
tokens in DATA_DIR/tokens.json). During a rotation METERGATE_CAPABILITY_KEY_PREVIOUS is the
key being replaced: new tokens are signed with the current key, and both public keys are
published, so the tokens already handed out verify until they expire.
"""

from __future__ import annotations

import hashlib

import msgspec
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from actors.leases import Lease
from metergate_client.captoken import KEY_BYTES, Claims, Grant, key_id, public_jwk, sign, unb64
from metergate_client.decision import Resources

GATE_TOKEN_TTL_S = 60  # a gate check's token: long enough to reach a cell and create, short enough to not be a lease
KEYS_MAX_AGE_S = 300  # Cache-Control of the key set; a rotation publishes a new key this long before it signs


def private_key(seed: str) -> Ed25519PrivateKey:
    raw = unb64(seed)
    assert len(raw) == KEY_BYTES, "the settings check the key's length"
    return Ed25519PrivateKey.from_private_bytes(raw)


class CapabilitySigner:
    """Signs with the current key; publishes it and, during a rotation, the previous one."""

    def __init__(self, key: str, previous_key: str | None = None) -> None:
        self._private = private_key(key)
        self.kid = key_id(self._private.public_key())
        published = [self._private.public_key()]
        if previous_key is not None:
            previous = private_key(previous_key).public_key()
            assert key_id(previous) != self.kid, "the settings refuse a previous key equal to the current one"
            published.append(previous)
        self.key_set = {"keys": [public_jwk(public) for public in published]}
        self.key_set_body = msgspec.json.encode(self.key_set)
        self.etag = '"' + hashlib.sha256(self.key_set_body).hexdigest()[:32] + '"'

    def lease_token(self, org_id: str, lease: Lease, now_us: int, tier: str | None = None,
                    plan: str | None = None, short: bool = False) -> str:
        """The token of a granted lease: the lease's resources and the org's tier and plan when
        it was granted, valid until the lease's expiry; `short` (an org in shadow, billing-rules
        2.12): for at most GATE_TOKEN_TTL_S, so that no token of a shadow org outlives its
        cutover by more than a gate check's does (the holder renews the lease for a new one)."""
        grant = Grant(lease.memory_mb, lease.cpu_count, lease.disk_mb, lease.machine_type, lease.region,
                      lease.quantity)
        now_s, exp_s = now_us // 1_000_000, lease.expires_at_us // 1_000_000
        if short:
            exp_s = min(exp_s, now_s + GATE_TOKEN_TTL_S)
        return sign(self._private, Claims(org_id, "create", now_s, exp_s, grant, lease.lease_id, tier, plan))

    def gate_token(self, org_id: str, action: str, resources: Resources, now_us: int,
                   view_until_us: int | None = None) -> str:
        """The token of an allowed gate check: its action and resources, for GATE_TOKEN_TTL_S,
        and never past `view_until_us` (in this replica's clock), when the view the check was
        decided from stops being valid sooner: past it, time alone may change the answer (a
        grant expires, a period ends), and the token would outlive the decision it stands for."""
        now_s = now_us // 1_000_000
        exp_s = now_s + GATE_TOKEN_TTL_S
        if view_until_us is not None:
            exp_s = max(now_s, min(exp_s, view_until_us // 1_000_000))  # floor: never past the view
        return sign(self._private, Claims(org_id, action, now_s, exp_s, Grant.of(resources)))
