"""`make up` stops cleanly on SIGTERM to its whole process group, during traffic and during
start-up, loses nothing acknowledged, leaves no process behind, and starts again at once.

Each test runs the real entry point (`python -m serve_app.main`, what `make up` runs) in a
process group of its own, with its own data folder, port and local Ray cluster.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import httpx
import pytest

from tests.helpers import wait_for
from tests.service_process import STOP_WITHIN_S, Service, Traffic
from tests.service_process import service_files  # noqa: F401 - the fixture the tests below take


def test_group_sigterm_during_traffic_stops_within_15_s_and_loses_no_acknowledged_tick(service_files):
    data_dir, port, log = service_files
    first = Service(data_dir, port, log)
    try:
        first.wait_up()
        traffic = Traffic(first, "stop@example.com")
        took_s = first.group_sigterm()
        traffic.stop()
    finally:
        if first.process.poll() is None:
            os.killpg(first.process.pid, signal.SIGKILL)
    assert took_s < STOP_WITHIN_S
    assert b"metergate: stopped in" in first.output()
    assert first.leftovers() == []

    second = Service(data_dir, port, log)  # `make up` again, at once
    try:
        second.wait_up()
        traffic.assert_every_tick_counted_once(second.url)
        assert second.group_sigterm() < STOP_WITHIN_S
    finally:
        if second.process.poll() is None:
            os.killpg(second.process.pid, signal.SIGKILL)
    assert second.leftovers() == []


def test_group_sigterm_during_start_up_stops_cleanly_and_the_next_start_works(service_files):
    data_dir, port, log = service_files
    starting = Service(data_dir, port, log)
    try:
        # Once Postgres is up and Ray is starting: the middle of start-up.
        wait_for("start-up under way", lambda: b"Started a local Ray instance" in starting.output(), 120)
        starting.group_sigterm()
    finally:
        if starting.process.poll() is None:
            os.killpg(starting.process.pid, signal.SIGKILL)
    assert b"KeyboardInterrupt" not in starting.output()
    assert b"metergate: stopped" in starting.output()
    assert starting.leftovers() == []
    again = Service(data_dir, port, log)
    try:
        again.wait_up()
        assert httpx.get(f"{again.url}/healthz", timeout=30).status_code == 200
        again.group_sigterm()
    finally:
        if again.process.poll() is None:
            os.killpg(again.process.pid, signal.SIGKILL)
    assert again.leftovers() == []


def test_when_make_up_is_killed_with_kill_9_its_service_stops_by_itself_and_the_next_start_works(service_files):
    data_dir, port, log = service_files
    orphaned = Service(data_dir, port, log)
    try:
        orphaned.wait_up()
        os.kill(orphaned.process.pid, signal.SIGKILL)  # the process `make up` started, nothing else
        orphaned.process.wait(10)
        wait_for("the orphaned service to stop by itself", lambda: orphaned.leftovers() == [], 30)
    finally:
        if orphaned.process.poll() is None:
            os.killpg(orphaned.process.pid, signal.SIGKILL)
    assert b"metergate: stopped in" in orphaned.output()
    again = Service(data_dir, port, log)
    try:
        again.wait_up()
        assert again.group_sigterm() < STOP_WITHIN_S
    finally:
        if again.process.poll() is None:
            os.killpg(again.process.pid, signal.SIGKILL)
    assert again.leftovers() == []


# A process that installs the service's stop handling, then is signalled while it runs a
# __del__: the handler's StopRequested lands there, where Python drops it ("Exception
# ignored in ...") and prints a traceback. It must still interrupt the start-up, silently.
_SIGNALLED_INSIDE_DEL = """
import os, signal, time
from serve_app.main import StopRequested, StopSignals

StopSignals().install()

class SignalledWhileCollected:
    def __del__(self):
        os.kill(os.getpid(), signal.SIGINT)
        for _ in range(100_000):  # the handler runs here, between two of these steps
            pass

try:
    SignalledWhileCollected()
    started = time.monotonic()
    while time.monotonic() - started < 10:  # start-up going on
        time.sleep(0.01)
    print("start-up went on")
except StopRequested:
    print(f"start-up interrupted after {time.monotonic() - started:.2f} s")
"""


def test_a_stop_signal_whose_exception_python_drops_still_interrupts_the_start_up():
    done = subprocess.run([sys.executable, "-c", _SIGNALLED_INSIDE_DEL], cwd=Path(__file__).parent.parent,
                          capture_output=True, timeout=60)
    out, err = done.stdout.decode(), done.stderr.decode()
    assert done.returncode == 0, err
    assert out.startswith("start-up interrupted after "), out + err
    assert float(out.split()[-2]) < 5  # at once, not after the start-up's 10 s
    assert "Traceback" not in err and "Exception ignored" not in err, err


def test_a_stop_signal_that_c_code_turned_into_another_error_still_stops_quietly():
    """A clean-clone run of .ci/run found it: a SIGTERM while the scheduler started raised
    StopRequested inside Ray's Cython, which let it out as "SystemError: ... returned a result
    with an exception set", the StopRequested its cause. The start-up stopped what it had
    started, but the service printed that SystemError's traceback as if start-up had failed."""
    from serve_app.main import StopRequested, interrupted_by_stop

    def raised_through_c_code(chained: bool) -> None:
        try:
            raise StopRequested
        except StopRequested as stop:
            error = SystemError("<built-in method __new__> returned a result with an exception set")
            if chained:
                raise error from stop
            raise error  # the StopRequested as its context

    for chained in (True, False):
        with pytest.raises(SystemError) as raised:
            raised_through_c_code(chained)
        assert interrupted_by_stop(raised.value), chained
    assert interrupted_by_stop(StopRequested()) and interrupted_by_stop(SystemExit(0))
    for failure in (SystemError("a C extension's bug"), RuntimeError("Ray did not start"), KeyboardInterrupt()):
        assert not interrupted_by_stop(failure)
