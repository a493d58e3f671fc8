"""Where an org lives: a stable hash to a fixed slot space, slots mapped to shard actors."""

from __future__ import annotations

import hashlib
from functools import lru_cache

# Fixed forever: changing it would move every org. Shards own slots, never orgs directly.
SLOT_COUNT = 1024
NAMESPACE = "metergate"


def slot_of(org_id: str) -> int:
    digest = hashlib.blake2b(org_id.encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big") % SLOT_COUNT


# For the ingress, which routes the same orgs over and over. Not for shards: a cache entry
# per org there would cost more memory than the org itself.
cached_slot_of = lru_cache(maxsize=200_000)(slot_of)


def shard_name(shard: int) -> str:
    return f"metergate-shard-{shard}"

