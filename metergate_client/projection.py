"""Gate views on the wire, and a local store of them that answers gate checks.

Every org's *gate view* is published by its shard after each commit that changes it, as a
`ViewRecord`: the view, the shard that owns the org, that shard's epoch (it changes when the
shard restarts) and the record's sequence number in the shard's feed. The feed of one shard is
the sequence of its records; a shard keeps only the latest record of each org, so a reader
that resumes from an older position gets at most one record per org, never a gap.

A position in the feeds of all shards is a cursor: `epoch:seq` for each shard, in shard
order, joined by commas (`"7:1032,5:88"`), `-` for a shard the reader has no position in. A
reader that applied every record up to a cursor may resume from it; for a shard that
restarted meanwhile (its epoch changed), or has no position, the stream says `resync` for that
shard alone and the reader loads that shard's snapshot, while the other shards go on.

The formats are JSON, specified for gateways in other languages in docs/gate-protocol.md.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from typing import Literal

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


class PublishedRecord(ViewRecord, frozen=True, tag="view"):
    """A view record as a shard writes it, with published_us: the shard's time when it
    published the record, just after the commit it follows. Informative (how long a record
    takes to reach a reader, docs/gate-protocol.md 8.1): no rule reads it."""

    published_us: int | None = None


class Heartbeat(msgspec.Struct, frozen=True, tag="heartbeat", tag_field="type"):
    """Nothing was left out: every change up to `cursor` has been sent. Per shard k, in that
    shard's own clock: now_us[k], the shard's time when this line was written, and as_of_us[k],
    the time at which the shard's feed was known complete through the cursor (null: not
    known on this stream yet). A reader's age of shard k's views is the shard's time now
    minus as_of_us[k]: delay on the way, anywhere, counts as age."""

    cursor: str
    now_us: list[int | None]
    as_of_us: list[int | None]


class Resync(msgspec.Struct, frozen=True, tag="resync", tag_field="type"):
    """The reader's views of `shard` are gone or were never loaded (the shard restarted, or
    the cursor had no position for it): load that shard's snapshot (GET /v1/gate/views?shard=)
    while this stream goes on with the shard's records from its new position. Null `shard`:
    the cursor is not one for this server at all; the stream ends, start over with no cursor."""

    reason: str
    shard: int | None = None
    epoch: int | None = None


class ViewPage(msgspec.Struct, frozen=True):
    """A page of GET /v1/gate/views. `cursor` is where the feed goes on after the snapshot (the
    same on every page of one snapshot; of one shard only, "epoch:seq", when `shard` is set);
    `next` fetches the next page, null after the last."""

    cursor: str
    views: list[ViewRecord]
    next: str | None = None
    shard: int | None = None


FeedLine = ViewRecord | Heartbeat | Resync
RECORD_ENCODER = msgspec.json.Encoder()
FEED_DECODER = msgspec.json.Decoder(FeedLine)
RECORD_DECODER = msgspec.json.Decoder(ViewRecord)
PAGE_DECODER = msgspec.json.Decoder(ViewPage)


class _Envelope(msgspec.Struct, frozen=True):
    """What a view record says besides its view: enough to place it in the org's order. Its
    `type` is a plain field, so a line without one is no record (a tag may be absent)."""

    type: Literal["view"]
    org_id: str
    shard: int
    epoch: int
    seq: int


class _RawPage(msgspec.Struct, frozen=True):
    cursor: str
    views: list[msgspec.Raw]
    next: str | None = None
    shard: int | None = None


_ENVELOPE_DECODER = msgspec.json.Decoder(_Envelope)
_RAW_PAGE_DECODER = msgspec.json.Decoder(_RawPage)
# docs/gate-protocol.md 8.1: a record whose view this reader cannot read (a newer server's halt
# cause, a field of the wrong type) stands in the org's order as a record that is never current,
# so neither it nor an older record is decided from, and the stream goes on for every other
# org. Its valid_until_us is in 1970; its view is only a placeholder, never read.
UNREADABLE = 0
_PLACEHOLDER = GateView(0, 0, 0, 0, 0, 0, None, True, True, False, False)


def _unreadable(raw: bytes | msgspec.Raw) -> ViewRecord:
    """The never-current stand-in for a record whose envelope reads and whose view does not;
    a record whose envelope does not read either raises (a broken line, not one org's)."""
    envelope = _ENVELOPE_DECODER.decode(raw)
    return ViewRecord(envelope.org_id, envelope.shard, envelope.epoch, envelope.seq, UNREADABLE, _PLACEHOLDER)


def read_record(value: object) -> ViewRecord | None:
    """A view record already parsed from JSON (a lease answer's gate_view): the record, its
    unreadable stand-in, or None when even its envelope does not read (nothing to apply)."""
    try:
        return msgspec.convert(value, ViewRecord)
    except msgspec.ValidationError:
        pass
    try:
        envelope = msgspec.convert(value, _Envelope)
    except msgspec.ValidationError:
        return None
    return ViewRecord(envelope.org_id, envelope.shard, envelope.epoch, envelope.seq, UNREADABLE, _PLACEHOLDER)


def read_feed_line(line: bytes | str) -> FeedLine:
    """One line of GET /v1/gate/feed (DecodeError or ValidationError for a broken line)."""
    try:
        return FEED_DECODER.decode(line)
    except msgspec.ValidationError:
        return _unreadable(line)


def read_page(body: bytes) -> ViewPage:
    """One page of GET /v1/gate/views; each record as read_feed_line reads a view record."""
    try:
        return PAGE_DECODER.decode(body)
    except msgspec.ValidationError:
        page = _RAW_PAGE_DECODER.decode(body)
    views = []
    for raw in page.views:
        try:
            views.append(RECORD_DECODER.decode(raw))
        except msgspec.ValidationError:
            views.append(_unreadable(raw))
    return ViewPage(page.cursor, views, page.next, page.shard)


Position = tuple[int, int] | None  # (epoch, seq) in one shard's feed; None: none yet


def format_cursor(positions: list[Position]) -> str:
    return ",".join("-" if p is None else f"{p[0]}:{p[1]}" for p in positions)


def parse_cursor(text: str) -> list[Position]:
    """ValueError when `text` is not a cursor. "-" is a shard with no position."""
    positions: list[Position] = []
    for part in text.split(","):
        if part == "-":
            positions.append(None)
            continue
        epoch, sep, seq = part.partition(":")
        if not sep or not epoch.isdigit() or not seq.isdigit() or len(epoch) > 18 or len(seq) > 18:
            raise ValueError(f"not a cursor: {text[:60]!r}")
        positions.append((int(epoch), int(seq)))
    return positions


def mono_us() -> int:
    return time.monotonic_ns() // 1_000


CLOCK_WINDOW_US = 10_000_000  # a clock sample counts for 10 to 20 s (clocks drift, and step)


class _Best:
    """The best of the samples of the last one or two windows (a cheap sliding extreme)."""

    __slots__ = ("better", "current", "previous", "since_us")

    def __init__(self, better) -> None:
        self.better, self.current, self.previous, self.since_us = better, None, None, 0

    def add(self, value: int, local_us: int) -> None:
        if local_us - self.since_us >= CLOCK_WINDOW_US:
            self.previous, self.current, self.since_us = self.current, value, local_us
        elif self.current is None or self.better(value, self.current) == value:
            self.current = value

    def best(self) -> int | None:
        if self.previous is None:
            return self.current
        return self.better(self.current, self.previous)


class ShardClock:
    """One shard's clock as seen from here: its offset from our monotonic clock (our wall clock
    is never read, so stepping it changes nothing).

    Two kinds of sample bound the offset. A time the shard stated, read at local time t1, can
    only have been late on its way: offset >= stated - t1 (a lower bound; every feed line gives
    one). A time stated in answer to a request sent at local time t0 was read after t0: offset
    <= stated - t0 (an upper bound; round trips give one). The estimate is the tightest upper
    bound of the window, so a shard's time is never under-estimated and a delay on the way,
    however long it lasts, counts as age; without round trips, the tightest lower bound (then
    the estimate lags by the quickest transit seen). A lower bound above the upper one means
    the shard's clock stepped forward: the lower one is taken then. A step backward shows
    within two windows; meanwhile views expire early, never late."""

    __slots__ = ("offset_us", "bounded_at_us", "_low", "_high")

    def __init__(self) -> None:
        self.offset_us: int | None = None
        self.bounded_at_us: int | None = None  # local time of the last round trip
        self._low, self._high = _Best(max), _Best(min)

    def sample(self, shard_us: int, received_us: int) -> None:
        self._low.add(shard_us - received_us, received_us)
        self._estimate()

    def sample_round_trip(self, shard_us: int, sent_us: int, received_us: int) -> None:
        self._high.add(shard_us - sent_us, sent_us)
        self._low.add(shard_us - received_us, received_us)
        self.bounded_at_us = received_us
        self._estimate()

    def bounded(self, now_us: int) -> bool:
        """Is the estimate bounded from above by a round trip of the last two windows? Only
        then may a view of the shard count as current (one-way samples cannot see a delay
        that lasts)."""
        return self.bounded_at_us is not None and now_us - self.bounded_at_us < 2 * CLOCK_WINDOW_US

    def _estimate(self) -> None:
        low, high = self._low.best(), self._high.best()
        self.offset_us = low if high is None else high if low is None else max(low, high)


class Projection:
    """The latest view of each org a reader knows, and how current it is per shard.

    Thread-safe: record writers take one lock, the clocks and `heard` another (the feed and
    the clock probes write them); readers only look up a dict. A record replaces the
    org's view only when it is newer (a later epoch, or a higher seq in the same epoch), so
    records may arrive by the feed, snapshots and direct answers in any order. All times of a
    shard (valid_until_us, as of) are in that shard's clock.
    """

    def __init__(self, wanted: Callable[[str], bool] | None = None) -> None:
        """wanted: which orgs to keep (None: all); records of the others are dropped."""
        self._wanted = wanted
        self._records: dict[str, ViewRecord] = {}
        self._positions: dict[int, tuple[int, int]] = {}  # shard → (epoch, seq) applied through
        self._heard: dict[int, int] = {}  # shard → its time when its feed was known complete
        self._clocks: dict[int, ShardClock] = {}
        # shard → (heard, clock offset) when both are known: what a check reads, in one lookup.
        self._fresh: dict[int, tuple[int, int]] = {}
        # shard → (epoch, seq) below which no record of it is taken any more: set by a resync,
        # so that a late record (a reply in flight) cannot stand for what was missed. (A record
        # of that very position is the latest of its org then; a snapshot stamps its own.)
        self._floors: dict[int, tuple[int, int]] = {}
        self._clock_lock = threading.Lock()  # heard, clocks and _fresh: the feed and clock threads write
        self._lock = threading.Lock()

    # ----- writes -----------------------------------------------------------------------

    def apply(self, record: ViewRecord) -> bool:
        """Keep the record if it is newer than the org's view; True if it was kept."""
        with self._lock:
            return self._apply(record)

    def apply_all(self, records: list[ViewRecord]) -> None:
        with self._lock:
            for record in records:
                self._apply(record)

    def _apply(self, record: ViewRecord) -> bool:
        if self._wanted is not None and not self._wanted(record.org_id):
            return False
        known = self._records.get(record.org_id)
        if known is not None and (known.epoch, known.seq) >= (record.epoch, record.seq):
            return False
        floor = self._floors.get(record.shard)
        if floor is not None and (record.epoch, record.seq) < floor:
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

    def reset(self, shard: int, epoch: int, seq: int, every: bool = False) -> None:
        """The shard restarted (or the reader lost its place): forget its views of older
        epochs, or with `every` all of them (a resync: what was missed is unknown, and a
        record kept could win over the snapshot's)."""
        with self._lock:
            self._reset(shard, epoch, seq, every)
        self.forget_heard(shard)

    def _reset(self, shard: int, epoch: int, seq: int, every: bool = False) -> None:
        # Records of the new incarnation (from direct answers) are current; older ones are not.
        self._records = {org_id: r for org_id, r in self._records.items()
                         if r.shard != shard or (r.epoch >= epoch and not every)}
        self._positions[shard] = (epoch, seq)
        if every:
            self._floors[shard] = (epoch, seq)

    def clock(self, shard: int, shard_us: int, received_us: int | None = None, sent_us: int | None = None) -> None:
        """The shard stated its time `shard_us`; we read it at `received_us` (monotonic; now
        if None), in answer to a request we sent at `sent_us` (None: not an answer)."""
        received = mono_us() if received_us is None else received_us
        with self._clock_lock:
            known = self._clocks.get(shard)
            if known is None:
                known = self._clocks[shard] = ShardClock()
            if sent_us is None:
                known.sample(shard_us, received)
            else:
                known.sample_round_trip(shard_us, sent_us, received)
            self._refresh(shard)

    def heard(self, shard: int, as_of_us: int) -> None:
        """Every change of `shard` up to its time `as_of_us` has been applied."""
        with self._clock_lock:
            if as_of_us > self._heard.get(shard, -1):
                self._heard[shard] = as_of_us
                self._refresh(shard)

    def forget_heard(self, shard: int) -> None:
        with self._clock_lock:
            self._heard.pop(shard, None)
            self._fresh.pop(shard, None)

    def _refresh(self, shard: int) -> None:
        """(Holding _clock_lock.)"""
        heard, known = self._heard.get(shard), self._clocks.get(shard)
        if heard is not None and known is not None and known.offset_us is not None and known.bounded(mono_us()):
            self._fresh[shard] = (heard, known.offset_us)
        else:
            self._fresh.pop(shard, None)

    def expire_clocks(self) -> None:
        """Shards whose clock no round trip bounded lately are not current until one does."""
        with self._clock_lock:
            for shard in list(self._fresh):
                self._refresh(shard)

    # ----- reads ------------------------------------------------------------------------

    def get(self, org_id: str) -> ViewRecord | None:
        return self._records.get(org_id)

    def __len__(self) -> int:
        return len(self._records)

    def positions(self) -> dict[int, tuple[int, int]]:
        return dict(self._positions)

    def shard_now_us(self, shard: int) -> int | None:
        """The shard's time now, as estimated here (None: it never stated one). Views are
        current only while a recent round trip bounds it (see `_fresh`)."""
        known = self._clocks.get(shard)
        offset = known.offset_us if known is not None else None
        return None if offset is None else mono_us() + offset

    def age_s(self, shard: int) -> float:
        """How old this reader's knowledge of the shard's views is, in the shard's time (inf:
        never heard, or its clock not bounded lately)."""
        fresh = self._fresh.get(shard)
        if fresh is None:
            return float("inf")
        return max(0.0, (mono_us() + fresh[1] - fresh[0]) / 1e6)

    def current(self, org_id: str, max_age_s: float) -> tuple[ViewRecord, float] | None:
        """The org's view and its age, if its shard was heard within max_age_s and the view
        is valid at the shard's time now; else None."""
        record = self._records.get(org_id)
        if record is None:
            return None
        fresh = self._fresh.get(record.shard)
        if fresh is None:
            return None
        heard, offset = fresh
        now = mono_us() + offset
        age = (now - heard) / 1e6
        until = record.valid_until_us
        if age > max_age_s or (until is not None and now >= until):
            return None
        return record, max(0.0, age)

    def decide(self, org_id: str, action: str, resources: Resources, max_age_s: float) -> tuple[Decision, float] | None:
        """The gate decision from the org's current view and the view's age, or None."""
        found = self.current(org_id, max_age_s)
        if found is None:
            return None
        return decide(action, resources, found[0].view), found[1]
