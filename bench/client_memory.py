"""A GateClient's memory at 100,000 followed orgs: per org, and at the peak of a shard's resync.

No service: the views arrive as the snapshot pages the server sends (JSON, 1,000 records a
page, two shards), decoded and applied exactly as GateClient's loader thread does
(PAGE_DECODER, Projection.apply_all), then each org is checked once (the decision cache).
tracemalloc counts what Python allocates.

  subject   a resync of shard 0 as the client does it now: that shard's records are
            dropped (Projection.reset), then its snapshot is loaded into the same projection.
  baseline  what the client did before (measured in the same run): a whole snapshot of every
            shard loaded into a fresh projection while the old one stays in use, then swapped.

Printed: bytes per org after the load and the checks, and each way's peak over the memory
held before it, with their ratio. Run: .venv/bin/python -m bench.client_memory
"""

from __future__ import annotations

import gc
import time
import tracemalloc

import msgspec

from metergate_client import GateClient, Resources
from metergate_client.decision import GateView
from metergate_client.projection import PAGE_DECODER, Projection, ViewPage, ViewRecord, mono_us

ORGS = 100_000
SHARDS = 2
PAGE = 1_000
ENCODER = msgspec.json.Encoder()


def pages(epochs: list[int]) -> dict[int, list[bytes]]:
    """Each shard's snapshot pages, as the server encodes them."""
    by_shard: dict[int, list[bytes]] = {}
    for shard in range(SHARDS):
        records = [ViewRecord(f"org_{n:06d}", shard, epochs[shard], n + 1, None,
                              GateView(5_000_000 + n, 0, 0, n % 3, 5, 20_480, None, False, False, False, n % 2 == 0))
                   for n in range(shard, ORGS, SHARDS)]
        by_shard[shard] = [ENCODER.encode(ViewPage(f"{epochs[shard]}:{ORGS}", records[i:i + PAGE], None, shard))
                           for i in range(0, len(records), PAGE)]
    return by_shard


def load(projection: Projection, shard_pages: list[bytes]) -> None:
    for body in shard_pages:
        projection.apply_all(PAGE_DECODER.decode(body).views)


def main() -> dict:
    first, second = pages([1, 1]), pages([2, 1])
    client = GateClient("http://127.0.0.1:9", "unused", start=False)
    gc.collect()
    tracemalloc.start()
    before = tracemalloc.get_traced_memory()[0]
    for shard in range(SHARDS):
        load(client.projection, first[shard])
    for shard in range(SHARDS):
        client.projection.clock(shard, time.time_ns() // 1000, mono_us())
        client.projection.heard(shard, time.time_ns() // 1000)
    views_only = tracemalloc.get_traced_memory()[0] - before
    resources = Resources(memory_mb=1024)
    for n in range(ORGS):
        client.check(f"org_{n:06d}", "create", resources)
    held = tracemalloc.get_traced_memory()[0]
    per_org = (held - before) / ORGS

    tracemalloc.reset_peak()
    client.projection.reset(0, 2, 0)  # subject: shard 0 restarted
    load(client.projection, second[0])
    subject_peak = tracemalloc.get_traced_memory()[1] - held

    gc.collect()
    held_again = tracemalloc.get_traced_memory()[0]
    tracemalloc.reset_peak()
    fresh = Projection()  # baseline: the whole snapshot into a new projection, then the swap
    for shard in range(SHARDS):
        load(fresh, second[shard])
    client.projection = fresh
    baseline_peak = tracemalloc.get_traced_memory()[1] - held_again
    tracemalloc.stop()

    result = {"orgs": ORGS, "bytes_per_org": per_org, "views_bytes_per_org": views_only / ORGS,
              "resync_peak_bytes": subject_peak, "swap_peak_bytes": baseline_peak,
              "peak_ratio": subject_peak / baseline_peak}
    print(f"client memory, {ORGS:,} followed orgs on {SHARDS} shards: {per_org:,.0f} bytes per org"
          f" ({result['views_bytes_per_org']:,.0f} for the views, the rest the decision cache)")
    print(f"  peak over that during a resync of one shard: {subject_peak / 2**20:,.1f} MiB"
          f" ({subject_peak / ORGS:,.0f} bytes per org followed)")
    print(f"  baseline, the whole-snapshot swap of before: {baseline_peak / 2**20:,.1f} MiB;"
          f" ratio {result['peak_ratio']:.2f} x (target: no doubling, < 1)")
    return result


if __name__ == "__main__":
    main()
