"""Ray names of the shard actors, and the ingress's cached slot lookup.

The slot of an org (a stable hash into a fixed slot space) is storage's, since the slot map
lives in Postgres; this module names what runs them.
"""

from __future__ import annotations

from functools import lru_cache

from storage.slots import SLOT_COUNT, slot_of

__all__ = ["NAMESPACE", "SLOT_COUNT", "cached_slot_of", "shard_name", "slot_of"]

NAMESPACE = "metergate"

# For the ingress, which routes the same orgs over and over. Not for shards: a cache entry
# per org there would cost more memory than the org itself.
cached_slot_of = lru_cache(maxsize=200_000)(slot_of)


def shard_name(shard: int) -> str:
    return f"metergate-shard-{shard}"
