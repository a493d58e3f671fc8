"""The gate projection without a service: a view's validity, the shard's view log, the
reader's Projection, the cursor, and the client package standing on its own.

The property that a published view decides exactly as the org would, at any instant of its
validity, is a rule of the stateful machine in test_org_stateful.py.
"""

from __future__ import annotations

import asyncio
import copy
import subprocess
import sys
import time
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from actors.commands import AcquireLease, Advance, ApplyUsage, Credit, Halt, InvoiceFailed, InvoicePaid, execute
from actors.org import Effects, Resources
from actors.timeutil import US_PER_S
from actors.viewlog import ViewLog
from metergate_client.decision import Reason, decide
from metergate_client.projection import (
    FEED_DECODER,
    RECORD_DECODER,
    RECORD_ENCODER,
    CLOCK_WINDOW_US,
    Heartbeat,
    Projection,
    Resync,
    ShardClock,
    ViewRecord,
    format_cursor,
    mono_us,
    parse_cursor,
)
from tests.helpers import CATALOG, HOBBY, ORG_ID, T0, make_org, usage_costing

ROOT = Path(__file__).resolve().parent.parent


def test_a_view_holds_until_the_period_ends_when_only_the_quota_paid():
    org, fx = make_org(plan=HOBBY, signup_micros=0, card=True)
    execute(org, ApplyUsage([usage_costing(HOBBY.included_micros)]), CATALOG, T0 + 60 * US_PER_S, fx)
    now = T0 + 120 * US_PER_S
    view, until = org.view_as_of(now)
    assert decide("create", Resources(), view).reason == Reason.HALTED  # out of quota and money
    assert until == org.period_end_us  # the new period's quota changes the answer, by time alone
    assert org.gate("create", Resources(), until - 1).reason == Reason.HALTED
    assert org.gate("create", Resources(), until).reason == Reason.OK


def test_a_view_holds_until_the_first_lease_or_grant_expires():
    org, fx = make_org(card=True)
    execute(org, Credit("grant", 1_000_000, T0 + 3_600 * US_PER_S, None), CATALOG, T0, fx)
    execute(org, AcquireLease("ls_1", Resources(), 120), CATALOG, T0, fx)
    assert org.view_as_of(T0)[1] == T0 + 120 * US_PER_S
    assert org.view_as_of(T0 + 120 * US_PER_S)[1] == T0 + 3_600 * US_PER_S


def test_a_period_end_that_changes_nothing_expires_nothing():
    """Calendar periods end for every org at once; an org whose view the new period leaves as
    it is (no quota used, no halt to lift) keeps its view across it (issue 18, finding 5)."""
    org, fx = make_org(plan=HOBBY, signup_micros=5_000_000, card=True)
    view, until = org.view_as_of(T0)
    assert until is None
    assert org.view_as_of(org.period_end_us + 1)[0] == view
    execute(org, ApplyUsage([usage_costing(1_000)]), CATALOG, T0 + 60 * US_PER_S, fx)
    assert org.view_as_of(T0 + 60 * US_PER_S)[1] == org.period_end_us  # quota was used: it resets then


def test_a_dunning_deadline_ends_the_view_and_denies_as_of_now_without_a_sweep():
    """Suspension is a deadline, not a sweep: the view expires at it, and a view taken after it
    says suspended though no command ran since (issue 18, finding 3)."""
    org, fx = make_org(plan=HOBBY, signup_micros=5_000_000, card=True)
    execute(org, InvoiceFailed(T0, 3 * 86_400, 7 * 86_400, 14 * 86_400, "free", CATALOG.current_plan("free", T0).version), CATALOG, T0, fx)
    suspend_at = T0 + 3 * 86_400 * US_PER_S
    view, until = org.view_as_of(T0 + US_PER_S)
    assert until == suspend_at and not view.suspended
    assert org.gate("create", Resources(), suspend_at - 1).reason == Reason.OK
    assert org.gate("create", Resources(), suspend_at).reason == Reason.SUSPENDED
    assert not org.suspended  # nothing was applied: the answer is as of now
    after, until = org.view_as_of(suspend_at)
    assert after.suspended and until == T0 + 7 * 86_400 * US_PER_S
    degraded, _ = org.view_as_of(until)
    assert degraded.degraded and decide("purchase", Resources(), degraded).reason == Reason.SUSPENDED


def _log_with(*org_balances: tuple[str, int]) -> tuple[ViewLog, dict]:
    log, orgs = ViewLog(shard=3), {}
    log.start(epoch=7)
    for org_id, credit in org_balances:
        org = orgs.get(org_id) or make_org()[0]
        orgs[org_id] = org
        execute(org, Credit("grant", credit, None, None), CATALOG, T0, Effects())
        log.publish(org_id, org, T0)
    return log, orgs


def test_the_view_log_is_bounded_by_dropping_the_oldest_records_of_orgs_not_in_memory():
    """Issue 18, finding 7: the log kept every org ever published. Past its bound it drops
    the oldest records of passivated orgs (never those of orgs in memory), and remembers the
    highest seq it dropped: a reader behind it must load the shard again (changes() says
    resync), a reader at or past it misses nothing."""
    log, _ = _log_with(*((f"o{n}", 1) for n in range(6)))
    loaded = {"o0", "o4"}
    assert log.evict(keep=10, loaded=loaded) == 0 and log.floor == 0
    assert log.evict(keep=2, loaded=loaded) == 2  # o1, o2: the oldest not in memory
    assert list(log.records) == ["o0", "o3", "o4", "o5"] and log.floor == 3
    seq, lines, _ = log.after(log.floor)  # a reader at the floor gets everything after it
    assert [RECORD_DECODER.decode(line).org_id for line in lines] == ["o3", "o4", "o5"] and seq == 6


def test_the_view_log_keeps_one_record_per_org_in_publish_order():
    log, _ = _log_with(("a", 1), ("b", 1), ("a", 2), ("c", 1))
    assert log.seq == 4
    assert list(log.records) == ["b", "a", "c"]  # a moved to the end when it changed again
    seq, lines, more = log.after(0)
    assert seq == 4 and not more and [RECORD_DECODER.decode(line).org_id for line in lines] == ["b", "a", "c"]
    seq, lines, _ = log.after(2)  # a reader at seq 2 missed a's and c's latest: it gets exactly those
    assert [(r.org_id, r.seq) for r in map(RECORD_DECODER.decode, lines)] == [("a", 3), ("c", 4)]
    assert log.after(4) == (4, [], False)


def test_a_capped_answer_says_more_was_left_out(monkeypatch):
    import actors.viewlog as viewlog

    monkeypatch.setattr(viewlog, "MAX_RECORDS_PER_ANSWER", 2)
    log, _ = _log_with(("a", 1), ("b", 1), ("c", 1))
    assert log.after(0)[0] == 2 and log.after(0)[2] is True
    assert log.after(2) == (3, [log.line("c")], False)


def test_an_unchanged_view_is_not_published_again():
    log, orgs = _log_with(("a", 1))
    assert not log.publish("a", orgs["a"], T0)
    assert log.seq == 1
    assert log.publish("a", orgs["a"], T0 + 1) is False  # same view, same validity


def test_expired_views_are_handed_back_once():
    log, orgs = _log_with(("a", 1))
    execute(orgs["a"], AcquireLease("ls_1", Resources(), 60), CATALOG, T0, Effects())
    log.publish("a", orgs["a"], T0)
    assert log.expired(T0 + 59 * US_PER_S) == []
    assert log.expired(T0 + 60 * US_PER_S) == ["a"]
    assert log.expired(T0 + 61 * US_PER_S) == []


def _record(org_id: str, epoch: int, seq: int, balance: int, shard: int = 0) -> ViewRecord:
    view = make_org(signup_micros=balance)[0].gate_view(T0)
    return ViewRecord(org_id, shard, epoch, seq, None, view)


def test_a_projection_keeps_the_newest_record_whatever_the_order_of_arrival():
    projection = Projection()
    assert projection.apply(_record("a", 1, 5, 500))
    assert not projection.apply(_record("a", 1, 3, 300))  # older: a late feed line after a direct answer
    assert projection.get("a").seq == 5
    assert projection.apply(_record("a", 2, 1, 100))  # a later epoch wins whatever its seq


def test_a_restarted_shard_takes_its_old_views_with_it():
    projection = Projection()
    projection.advance(0, 1, 2, [_record("a", 1, 1, 1), _record("b", 1, 2, 1)])
    projection.advance(1, 4, 1, [_record("z", 4, 1, 1, shard=1)])
    projection.apply(_record("b", 2, 1, 1))  # a direct answer from the new incarnation
    projection.reset(0, 2, 1)
    assert projection.get("a") is None  # epoch 1 of shard 0 is gone
    assert projection.get("b").epoch == 2 and projection.get("z") is not None
    assert not projection.apply(_record("c", 1, 9, 1))  # a line of the old epoch, late
    assert projection.positions() == {0: (2, 1), 1: (4, 1)}


def test_views_expire_in_the_shards_time_and_age_counts_from_what_the_shard_stated():
    projection = Projection()
    record = ViewRecord("a", 0, 1, 1, T0 + 10_000_000, _record("a", 1, 1, 1).view)
    projection.apply(record)
    assert projection.decide("a", "create", Resources(), 1.0) is None  # never heard: no local decision
    local = mono_us()
    projection.clock(0, T0, local)  # the shard said "T0" when we read it at `local`
    projection.heard(0, T0 - 200_000)  # ... and that its feed was complete at T0 - 0.2 s
    assert projection.decide("a", "create", Resources(), 1.0) is None  # no round trip bounds the clock yet
    projection.clock(0, T0, local, local)  # a round trip: asked at `local`, "T0" read promptly
    assert projection.age_s(0) == pytest.approx(0.2, abs=0.05)
    assert projection.decide("a", "create", Resources(), 1.0) is not None
    assert projection.decide("a", "create", Resources(), 0.1) is None  # older than this bound
    projection.clock(0, T0 + 10_000_000, mono_us())  # the shard's time passed valid_until
    assert projection.decide("a", "create", Resources(), 60.0) is None


def test_a_delayed_statement_counts_as_age_not_as_a_fresh_clock():
    """Issue 18, finding 1: a heartbeat written 10 s ago and read now must not make an
    expired view current. The clock estimate keeps the quickest sample, so a late one does
    not pull the shard's time back, and the age is the shard's time now minus what it said."""
    projection = Projection()
    projection.apply(ViewRecord("a", 0, 1, 1, T0 + 5_000_000, _record("a", 1, 1, 1).view))
    ten_s_ago = mono_us() - 10_000_000
    projection.clock(0, T0, ten_s_ago, ten_s_ago)  # a round trip 10 s ago: the shard's time was T0
    projection.clock(0, T0, mono_us())  # a heartbeat written then, held on the way, read now
    projection.heard(0, T0)  # ... which proves the feed complete as of T0
    assert projection.shard_now_us(0) >= T0 + 10_000_000  # not pulled back by the late copy
    assert projection.age_s(0) >= 10.0
    assert projection.current("a", 60.0) is None  # valid_until (T0 + 5 s) passed in the shard's time
    assert projection.current("a", 1.0) is None


def test_no_view_is_current_without_a_recent_round_trip_bounding_its_shards_clock():
    """One-way samples cannot tell a delay that lasts from a clock offset: a shard's views are
    current only while a round trip of the last two clock windows bounds its clock."""
    projection = Projection()
    projection.apply(ViewRecord("a", 0, 1, 1, None, _record("a", 1, 1, 1).view))
    now = mono_us()
    projection.clock(0, T0, now)
    projection.heard(0, T0)
    assert projection.current("a", 60.0) is None
    stale = now - 2 * CLOCK_WINDOW_US - 1
    projection.clock(0, T0 - (now - stale), stale, stale)  # a round trip, but too long ago
    assert projection.current("a", 60.0) is None
    projection.clock(0, T0, now - 1_000, now - 1_000)
    assert projection.current("a", 60.0) is not None
    projection._clocks[0].bounded_at_us = stale  # as if no probe answered since
    projection.expire_clocks()
    assert projection.current("a", 60.0) is None


def test_a_resync_of_a_shard_forgets_every_record_of_it():
    """A resync in the same epoch (the server's log dropped records the reader had not read)
    must not keep a record that could win over the snapshot's (issue 18 review)."""
    projection = Projection()
    projection.advance(0, 3, 9, [_record("a", 3, 5, 100), _record("b", 3, 9, 100, shard=0)])
    projection.advance(1, 4, 2, [_record("z", 4, 2, 1, shard=1)])
    projection.reset(0, 3, 0, every=True)
    assert projection.get("a") is None and projection.get("b") is None and projection.get("z") is not None
    assert projection.apply(_record("a", 3, 5, 7))  # a snapshot's record read from Postgres (its seq)
    assert projection.apply(_record("b", 3, 0, 7))  # a snapshot of a shard that published nothing yet: E:0


def test_after_a_resync_no_record_at_or_below_where_the_reader_goes_on_is_taken():
    """A reply in flight during a resync must not bring back a view of what was missed: the
    router goes on from the shard's position, and a late record at or below it is refused."""
    projection = Projection()
    projection.advance(0, 3, 100, [_record("x", 3, 100, 1)])
    projection.reset(0, 3, 200, every=True)  # behind dropped records: from seq 200 on
    assert not projection.apply(_record("x", 3, 100, 1))  # the late reply
    assert not projection.apply(_record("x", 3, 199, 1))
    assert projection.apply(_record("x", 3, 200, 1))  # the position itself: nothing newer was missed
    assert projection.apply(_record("x", 3, 201, 1))  # published after: taken
    assert projection.apply(_record("y", 4, 1, 1))  # a later incarnation: taken


def test_a_commit_that_publishes_lets_its_waiting_readers_run_before_it_goes_on():
    """The feed is not queued behind the next group commit: a reader waiting on the log is
    woken by a publication in one turn of the loop, before a publisher that yields once."""
    async def scenario() -> list[str]:
        log, orgs = _log_with(("a", 1))
        order: list[str] = []

        async def reader() -> None:
            await log.wait(5.0)
            order.append("reader")

        task = asyncio.ensure_future(reader())
        await asyncio.sleep(0)  # the reader waits
        execute(orgs["a"], Credit("grant", 5, None, None), CATALOG, T0, Effects())
        assert log.publish("a", orgs["a"], T0)
        await asyncio.sleep(0)  # what the commit loop does after a commit
        order.append("committer")
        await task
        assert not log.waiters  # nobody left behind
        await log.wait(0.01)  # a wait that times out leaves nothing behind either
        assert not log.waiters
        return order

    assert asyncio.run(scenario()) == ["reader", "committer"]


def test_a_step_of_the_shards_clock_shows_forward_at_once_and_backward_within_the_window():
    clock = ShardClock()
    clock.sample(1_000_000, 0)
    clock.sample(9_000_000, 1_000)  # the shard's clock jumped 8 s forward
    assert clock.offset_us == 9_000_000 - 1_000
    clock.sample(0, 2_000)  # and back: the higher estimate holds for a while (views expire early)
    assert clock.offset_us == 9_000_000 - 1_000
    clock.sample(0, CLOCK_WINDOW_US + 3_000)
    clock.sample(0, 2 * CLOCK_WINDOW_US + 4_000)
    assert clock.offset_us == -(CLOCK_WINDOW_US + 3_000)


def test_a_round_trip_bounds_the_clock_from_above_so_a_lasting_delay_still_counts_as_age():
    """Every answer of a path that holds lines for 2 s, for as long as it lasts: one-way
    samples alone would take the delay for an offset. A round trip (the shard read its clock
    after we asked) bounds it from above, and the upper bound is the estimate."""
    true_offset = 5_000_000
    clock = ShardClock()
    for t in range(0, 5 * CLOCK_WINDOW_US, 1_000_000):  # 50 s of lines, each 2 s late
        clock.sample(t + true_offset, t + 2_000_000)
    assert clock.offset_us == true_offset - 2_000_000  # fooled
    clock.sample_round_trip(t + true_offset + 500, t, t + 2_000_500)  # asked at t, read 0.5 ms later
    assert clock.offset_us == true_offset + 500
    clock.sample(t + 3_000_000 + true_offset + 9_000_000, t + 3_000_000)  # a step forward of 9 s
    assert clock.offset_us == true_offset + 9_000_000


def test_a_step_of_this_hosts_wall_clock_changes_no_shards_time(monkeypatch):
    """Issue 18, finding 6: the client's wall clock is never read for a shard's time (each
    shard has its own offset, from a monotonic clock), so stepping it an hour moves nothing."""
    projection = Projection()
    projection.clock(0, T0, mono_us())
    projection.clock(1, T0 + 7_000_000, mono_us())  # another shard, its own clock
    before = [projection.shard_now_us(0), projection.shard_now_us(1)]
    real = time.time_ns
    monkeypatch.setattr(time, "time_ns", lambda: real() + 3_600 * 10**9)
    monkeypatch.setattr(time, "time", lambda: real() / 1e9 + 3_600)
    after = [projection.shard_now_us(0), projection.shard_now_us(1)]
    assert all(0 <= a - b < 1_000_000 for a, b in zip(after, before)), (before, after)
    assert 6_000_000 < after[1] - after[0] < 8_000_000


def test_cursors_round_trip_and_refuse_garbage():
    assert parse_cursor(format_cursor([(7, 10), (3, 0), None])) == [(7, 10), (3, 0), None]
    assert format_cursor([None, (1, 2)]) == "-,1:2"
    for bad in ("", "7", "7:", ":1", "a:1", "1:-1", "1:1,", "1" * 30 + ":1", "--", "-:1"):
        with pytest.raises(ValueError):
            parse_cursor(bad)


def test_feed_lines_decode_by_their_type():
    line = RECORD_ENCODER.encode(_record("a", 1, 1, 1))
    assert line.startswith(b'{"type":"view"')
    assert isinstance(FEED_DECODER.decode(line), ViewRecord)
    beat = FEED_DECODER.decode(b'{"type":"heartbeat","cursor":"1:2,-","now_us":[5,null],"as_of_us":[4,null]}')
    assert beat == Heartbeat("1:2,-", [5, None], [4, None])
    resync = FEED_DECODER.decode(b'{"type":"resync","reason":"shard restarted","shard":1,"epoch":9}')
    assert resync == Resync("shard restarted", 1, 9)


def test_the_client_package_needs_neither_ray_nor_the_server():
    """Imported with ray, fastapi, asyncpg and the server's packages made unimportable."""
    blocked = ["ray", "fastapi", "asyncpg", "actors", "serve_app", "storage", "config", "pgserver"]
    code = ("import sys\n"
            f"for name in {blocked!r}: sys.modules[name] = None\n"
            "import metergate_client\n"
            "from metergate_client import GateClient, decide, Resources\n"
            "print('ok')\n")
    done = subprocess.run([sys.executable, "-c", code], check=False, capture_output=True, text=True, cwd=ROOT, timeout=60)
    assert done.returncode == 0 and done.stdout.strip() == "ok", done.stderr


def test_renewals_do_not_pile_up_expiry_entries():
    """Every tick renews its lease, so an org's validity moves later on every publish: the
    log keeps one expiry entry per org, not one per publish, and still hands the org back."""
    log, orgs = _log_with(("a", 1))
    org = orgs["a"]
    execute(org, AcquireLease("ls_1", Resources(), 60), CATALOG, T0, Effects())
    for second in range(1_000):
        now = T0 + second * US_PER_S
        execute(org, AcquireLease("ls_1", Resources(), 60), CATALOG, now, Effects())  # renews: same lease
        org.leases["ls_1"].expires_at_us = now + 60 * US_PER_S
        log.publish("a", org, now)
    assert len(log.expiring) <= 2, len(log.expiring)
    last = T0 + 999 * US_PER_S + 60 * US_PER_S
    assert log.expired(last - 1) == []
    assert log.expired(last) == ["a"]


DAY_S = 86_400
ORG_STEPS = st.lists(st.one_of(
    st.tuples(st.just("usage"), st.integers(1, 12_000_000)),
    st.tuples(st.just("grant"), st.integers(1, 3_000_000), st.integers(1, 20 * DAY_S)),
    st.tuples(st.just("lease"), st.integers(1, 3), st.integers(1, 3_600)),
    st.tuples(st.just("invoice_failed"), st.integers(0, 15 * DAY_S)),
    st.tuples(st.just("invoice_paid"), st.just(0)),
    st.tuples(st.just("halt"), st.just(0)),
    st.tuples(st.just("wait"), st.integers(1, 9 * DAY_S)),
), max_size=8)


@settings(max_examples=1500, deadline=None)
@given(plan_id=st.sampled_from(("payg", "hobby_weekly", "free")), prepaid=st.booleans(),
       signup=st.sampled_from((0, 1_000, 5_000_000)), card=st.booleans(), steps=ORG_STEPS,
       later=st.one_of(st.just(0), st.integers(0, 30 * DAY_S * US_PER_S)), data=st.data())
def test_a_view_decides_as_the_swept_org_at_every_instant_before_valid_until(plan_id, prepaid, signup, card, steps,
                                                                             later, data):
    """The rule every local gate stands on (issue 18, what to build 2): for any org and any
    instant t before the view's valid_until, decide(view) is what the org decides at t once
    time is applied to it (a period end, expiries, dunning steps), as the scheduler's sweep
    would commit it. Views taken long after the last command count as well (`later`)."""
    org, fx = make_org(plan=CATALOG.current_plan(plan_id, T0), prepaid=prepaid, signup_micros=signup, card=card)
    now = T0
    for index, step in enumerate(steps):
        kind, value = step[0], step[1]
        if kind == "usage":
            command = ApplyUsage([usage_costing(value)])
        elif kind == "grant":
            command = Credit("grant", value, now + step[2] * US_PER_S, None)
        elif kind == "lease":
            command = AcquireLease(f"ls_{index}", Resources(quantity=value), step[2])
        elif kind == "invoice_failed":
            command = InvoiceFailed(now - value * US_PER_S, 3 * DAY_S, 7 * DAY_S, 14 * DAY_S, "free", 1)
        elif kind == "invoice_paid":
            command = InvoicePaid(now)
        elif kind == "halt":
            command = Halt()
        else:
            now += value * US_PER_S
            continue
        execute(org, command, CATALOG, now, fx)
    now += later
    view, until = org.view_as_of(now)
    wire = RECORD_DECODER.decode(RECORD_ENCODER.encode(ViewRecord(ORG_ID, 0, 1, 1, until, view))).view
    last = (until - 1 if until is not None else now + 400 * DAY_S * US_PER_S) - now
    assert last >= 0
    at = now + data.draw(st.one_of(st.just(0), st.just(last), st.integers(0, last)), label="offset_us")
    swept = copy.deepcopy(org)
    execute(swept, Advance(), CATALOG, at, Effects())
    for action in ("create", "wake", "ingest", "purchase"):
        for resources in (Resources(), Resources(quantity=2), Resources(disk_mb=10**9)):
            truth = decide(action, resources, swept.view_as_of(at)[0])
            assert decide(action, resources, wire) == truth, (action, resources, at - now)
            assert org.gate(action, resources, at) == truth


def test_a_load_asked_for_just_as_a_loader_finishes_gets_a_loader_of_its_own():
    """A resync right after a loader recorded its snapshot, before the thread ended: the shard
    must be loaded again, never left `loading` with no loader (then it is never local again)."""
    from metergate_client.client import GateClient

    client = GateClient("http://127.0.0.1:9", "t" * 20, start=False)
    loads: list[int] = []

    def load_snapshot(shard: int, generation: int) -> int:
        loads.append(generation)
        return generation

    client._load_snapshot = load_snapshot
    inner = client._load_lock

    class ResyncOnRelease:
        fired = False

        def __enter__(self):
            return inner.__enter__()

        def __exit__(self, *exc):
            inner.__exit__(*exc)
            if not ResyncOnRelease.fired and 0 in client._loaded:
                ResyncOnRelease.fired = True
                client._load(0)  # the feed's resync, in the gap before the loader thread ends

    client._load_lock = ResyncOnRelease()
    client._load(0)
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline and not (0 in client._loaded and len(loads) >= 2):
        time.sleep(0.01)
    assert ResyncOnRelease.fired and loads == [1, 2] and client._loaded.get(0) == 2
    assert 0 not in client._loading


def test_a_tokens_end_is_the_soonest_end_of_the_views_it_may_have_come_from_and_never_past():
    """A capability token of a gate check ends no later than the view it was decided from
    (routing.view_end_us). A record already past its end (the decision came from a view the
    shard answered unpublished) fails closed: the token ends now, not GATE_TOKEN_TTL_S later."""
    from actors.routing import view_end_us

    view = _record("a", 1, 1, 1).view
    now, shard_now = 5_000_000_000, T0  # this replica's clock and the shard's differ
    clocks = {0: shard_now}.get
    published = ViewRecord("a", 0, 1, 3, T0 + 20_000_000, view)
    assert view_end_us((published, None), clocks, now) == now + 20_000_000
    assert view_end_us((None, None), clocks, now) is None
    assert view_end_us((ViewRecord("a", 0, 1, 3, None, view), None), clocks, now) is None  # until the next record
    past = ViewRecord("a", 0, 1, 3, T0 - 1, view)
    assert view_end_us((past, None), clocks, now) == now  # fails closed
    answered = ViewRecord("a", 0, 1, 0, T0 + 5_000_000, view)  # unpublished, ends sooner
    assert view_end_us((published, answered), clocks, now) == now + 5_000_000
    assert view_end_us((past, answered), clocks, now) == now
    assert view_end_us((published, None), {}.get, now) == T0 + 20_000_000  # no clock of the shard yet: ours


def test_an_unpublished_answer_bounds_tokens_only_until_a_newer_published_view_comes():
    """Review: the unpublished view a shard answered once (seq 0) must not end every later
    token of the org once a newer published record is what decisions come from."""
    from actors.routing import ShardRouter

    router = ShardRouter.__new__(ShardRouter)  # its token bound only: no shards needed
    router.projection, router.answered = Projection(), {}
    view = _record("a", 1, 1, 1).view
    now = mono_us()
    router.projection.clock(0, T0, now, now)
    router.projection.apply(ViewRecord("a", 0, 1, 3, T0 + 60_000_000, view))
    router.answered["a"] = (ViewRecord("a", 0, 1, 0, T0 - 1, view), 3)  # answered while seq 3 was published
    assert router.view_until_us("a", now) == now  # its view already ended: fails closed
    router.projection.apply(ViewRecord("a", 0, 1, 4, T0 + 60_000_000, view))  # a newer published view
    assert router.view_until_us("a", now) > now + 50_000_000 and "a" not in router.answered
