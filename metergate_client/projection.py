"""Gate views on the wire, and a local store of them that answers gate checks.

Every org's *gate view* is published by its shard after each commit that changes it, as a
`ViewRecord`: the view, the shard that owns the org, that shard's epoch (it changes when the
shard restarts) and the record's sequence number in the shard's feed. The feed of one shard is
the sequence of its records; a shard keeps only the latest record of each org, so a reader
that resumes from an older position gets at most one record per org, never a gap.

A position in the feeds of all shards is a cursor: `epoch:seq` for each shard, in shard
order, joined by commas (`"7:1032,5:88"`). A reader that applied every record up to a cursor
may resume from it; if a shard restarted meanwhile (its epoch changed) the server answers
`resync` and the reader starts over from a snapshot.

The formats are JSON, described in README.md ("Gate views and feed") for gateways in other
languages.
"""

from __future__ import annotations

import threading
import time

import msgspec

from metergate_client.decision import Decision, GateView, Resources, decide


class ViewRecord(msgspec.Struct, frozen=True, tag="view", tag_field="type"):
    """One org's gate view as its shard published it. Valid while the server's clock is before
    valid_until_us (null: until the next record); it changes only by a later record."""

    org_id: str
    shard: int
    epoch: int
    seq: int
    valid_until_us: int | None
    view: GateView


class Heartbeat(msgspec.Struct, frozen=True, tag="heartbeat", tag_field="type"):
    """Nothing was left out: every change up to `cursor` has been sent. age_ms[k] is how old
    the server's knowledge of shard k is (0 while its feed is live); now_us is the server's clock."""

    cursor: str
    now_us: int
    age_ms: list[int]


class Resync(msgspec.Struct, frozen=True, tag="resync", tag_field="type"):
    """The stream cannot go on from where the reader is (a shard restarted, or the cursor is
    not one this server gave): fetch a snapshot (GET /v1/gate/views) and follow from its cursor."""

    reason: str


class ViewPage(msgspec.Struct, frozen=True):
    """A page of GET /v1/gate/views. `cursor` is where the feed goes on after the snapshot (the
    same on every page of one snapshot); `next` fetches the next page, null after the last."""

    cursor: str
    views: list[ViewRecord]
    next: str | None = None


FeedLine = ViewRecord | Heartbeat | Resync
RECORD_ENCODER = msgspec.json.Encoder()
FEED_DECODER = msgspec.json.Decoder(FeedLine)
RECORD_DECODER = msgspec.json.Decoder(ViewRecord)
PAGE_DECODER = msgspec.json.Decoder(ViewPage)


def format_cursor(positions: list[tuple[int, int]]) -> str:
    return ",".join(f"{epoch}:{seq}" for epoch, seq in positions)


def parse_cursor(text: str) -> list[tuple[int, int]]:
    """ValueError when `text` is not a cursor."""
    positions = []
    for part in text.split(","):
        epoch, sep, seq = part.partition(":")
        if not sep or not epoch.isdigit() or not seq.isdigit() or len(epoch) > 18 or len(seq) > 18:
            raise ValueError(f"not a cursor: {text[:60]!r}")
        positions.append((int(epoch), int(seq)))
    return positions


def wall_us() -> int:
    return time.time_ns() // 1_000


class Projection:
    """The latest view of each org a reader knows, and how current it is per shard.

    Thread-safe: record writers take a lock, readers only look up a dict; `heard` has one
    writer per shard (the thread or task that follows that shard's feed). A record replaces the
    org's view only when it is newer (a later epoch, or a higher seq in the same epoch), so
    records may arrive by the feed and by direct answers in any order.
    """

    def __init__(self) -> None:
        self._records: dict[str, ViewRecord] = {}
        self._positions: dict[int, tuple[int, int]] = {}  # shard → (epoch, seq) applied through
        self._heard: dict[int, float] = {}  # shard → monotonic time its feed was known complete
        self._clock_offset_us = 0  # the server's clock minus ours
        self._lock = threading.Lock()

    # ----- writes -----------------------------------------------------------------------

    def apply(self, record: ViewRecord) -> bool:
        """Keep the record if it is newer than the org's view; True if it was kept."""
        with self._lock:
            return self._apply(record)

    def _apply(self, record: ViewRecord) -> bool:
        known = self._records.get(record.org_id)
        if known is not None and (known.epoch, known.seq) >= (record.epoch, record.seq):
            return False
        position = self._positions.get(record.shard)
        if position is not None and record.epoch < position[0]:
            return False  # from a shard incarnation that is gone
        self._records[record.org_id] = record
        return True

    def advance(self, shard: int, epoch: int, seq: int, records: list[ViewRecord]) -> None:
        """A shard's feed through (epoch, seq), with the records it carried."""
        with self._lock:
            position = self._positions.get(shard)
            if position is not None and position[0] != epoch:
                self._reset(shard, epoch, seq)
            for record in records:
                self._apply(record)
            self._positions[shard] = (epoch, max(seq, self._positions.get(shard, (epoch, 0))[1]))

    def reset(self, shard: int, epoch: int, seq: int) -> None:
        """The shard restarted (or the reader lost its place): forget its views."""
        with self._lock:
            self._reset(shard, epoch, seq)

    def _reset(self, shard: int, epoch: int, seq: int) -> None:
        # Records of the new incarnation (from direct answers) are current; older ones are not.
        self._records = {org_id: r for org_id, r in self._records.items() if r.shard != shard or r.epoch >= epoch}
        self._positions[shard] = (epoch, seq)

    def heard(self, shard: int, as_of: float, server_now_us: int | None = None) -> None:
        """Every change of `shard` up to monotonic time `as_of` has been applied."""
        if as_of > self._heard.get(shard, 0.0):
            self._heard[shard] = as_of
        if server_now_us is not None:
            self._clock_offset_us = server_now_us - wall_us()

    def forget_heard(self, shard: int) -> None:
        self._heard.pop(shard, None)

    # ----- reads ------------------------------------------------------------------------

    def get(self, org_id: str) -> ViewRecord | None:
        return self._records.get(org_id)

    def __len__(self) -> int:
        return len(self._records)

    def positions(self) -> dict[int, tuple[int, int]]:
        return dict(self._positions)

    def age_s(self, shard: int, now: float | None = None) -> float:
        """How old this reader's knowledge of the shard's views is (inf: never heard)."""
        heard = self._heard.get(shard)
        if heard is None:
            return float("inf")
        return max(0.0, (time.monotonic() if now is None else now) - heard)

    def server_now_us(self) -> int:
        return wall_us() + self._clock_offset_us

    def decide(self, org_id: str, action: str, resources: Resources, server_now_us: int) -> Decision | None:
        """The gate decision from the org's view, or None if there is no view or it has expired."""
        record = self._records.get(org_id)
        if record is None or (record.valid_until_us is not None and server_now_us >= record.valid_until_us):
            return None
        return decide(action, resources, record.view)
