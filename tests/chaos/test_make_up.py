"""`make up` itself under crashes and stop signals (issue 11).

A crash that takes `make up` and its service process at once (kill -9 of both, as the OOM
killer or `pkill -9 -f serve_app.main` does) leaves the embedded Postgres running with the
dead service still counted among its holders, and Serve's HAProxy holding the port: the next
`make up` must start anyway, with everything acknowledged before the crash, and its stop must
leave nothing of either run. Ctrl-C (SIGINT to the terminal's process group) or SIGTERM at any
point of start-up must stop cleanly: no traceback, "metergate: stopped", nothing left over.

Each start costs 15-40 s here, so one chain of starts covers the start-up points: the start
after one interruption is the one the next interruption hits.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

import httpx
import psutil

from storage.db import start_embedded_postgres, stop_embedded_postgres, stop_postgres_now
from tests.helpers import wait_for
from tests.service_process import ADMIN, STOP_WITHIN_S, Service, Traffic
from tests.service_process import service_files  # noqa: F401 - the fixture the tests below take

# A start after a crash may be slower than a clean one (it finds a Postgres and an HAProxy
# running), but not by a timeout's worth: Ray's raylet gives up on a port after 30 s.
RESTART_WITHIN_S = 90


def _report(what: str, seconds: float) -> None:
    print(f"  {what}: {seconds:.1f} s", flush=True)  # pytest -s shows the timings


def _ctrl_c(run: Service) -> None:
    os.killpg(run.process.pid, signal.SIGINT)  # what a terminal sends to the foreground group


def _stop_at(files: tuple, point: str, reached, send=_ctrl_c, await_service: bool = True) -> Service:
    """One `make up`, stopped by `send` once `reached(run)` returns: it must exit within
    15 s, say it stopped, show no traceback, and leave nothing running."""
    run = Service(*files, await_service=await_service)
    try:
        reached(run)
        started = time.monotonic()
        send(run)
        took_s = run.exited_within(STOP_WITHIN_S, started)
        run.service_started()  # the service process, if there was one, for leftovers()
    finally:
        run.kill()
    _report(point, took_s)
    _assert_stopped_cleanly(run, took_s)
    return run


def _assert_stopped_cleanly(run: Service, took_s: float) -> None:
    output = run.output()
    assert took_s < STOP_WITHIN_S
    assert b"Traceback" not in output, output[-4000:].decode(errors="replace")
    assert b"KeyboardInterrupt" not in output, output[-4000:].decode(errors="replace")
    assert b"metergate: stopped" in output, output[-4000:].decode(errors="replace")
    assert run.leftovers() == []


def _running_project_code(pid: int) -> bool:
    """The process is past Python's own start-up, in serve_app.main: it catches SIGTERM (its
    handlers are in) or it has loaded an extension module from site-packages (pydantic's,
    the first of serve_app.main's imports). Whichever comes first shows where the handlers
    go in: before the imports (a Ctrl-C from here on stops it cleanly) or after them."""
    try:
        status = Path(f"/proc/{pid}/status").read_text()
        caught = int(next(line for line in status.splitlines() if line.startswith("SigCgt:")).split()[1], 16)
        return bool(caught & 1 << (signal.SIGTERM - 1)) or "/site-packages/" in Path(f"/proc/{pid}/maps").read_text()
    except (OSError, StopIteration):
        return False


def _until_running_project_code(pid: int) -> None:
    """Polled every few ms: the imports that follow last ~1 s on this machine."""
    deadline = time.monotonic() + 30
    while not _running_project_code(pid):
        assert time.monotonic() < deadline, f"pid {pid} never got past Python's start-up"
        time.sleep(0.002)


def _ray_starting(run: Service) -> bool:
    """Ray's GCS server runs under the service, and ray.init has not returned yet."""
    if b"Started a local Ray instance" in run.output():
        return False
    for proc in psutil.process_iter(["name"]):
        try:
            if proc.info["name"] == "gcs_server" and os.getsid(proc.pid) == run.service_sid:
                return True
        except ProcessLookupError:
            continue
    return False


def test_ctrl_c_or_sigterm_at_each_point_of_start_up_stops_cleanly_and_the_next_start_works(service_files):
    # Ctrl-C as soon as `make up` runs its own code, before or right as it starts the service.
    _stop_at(service_files, "Ctrl-C as make up starts",
             lambda run: _until_running_project_code(run.process.pid), await_service=False)

    # Ctrl-C as soon as the service process runs its own code, while it loads Ray and the
    # rest (nothing is up yet).
    _stop_at(service_files, "Ctrl-C as the service process starts",
             lambda run: _until_running_project_code(run.service_sid))

    # Ctrl-C while pg_ctl starts the embedded Postgres: the postmaster runs in a session of
    # its own, so whatever interrupts its start must still stop it.
    _stop_at(service_files, "Ctrl-C while Postgres starts",
             lambda run: run.wait_output(b"'start']"))  # pgserver logs the pg_ctl command line it runs

    # Ctrl-C while ray.init waits for the Ray processes it started.
    ray_init = _stop_at(service_files, "Ctrl-C while Ray starts", lambda run: wait_for("Ray starting", lambda: (
        _ray_starting(run) or run.process.poll() is not None), 120))
    assert b"Started a local Ray instance" not in ray_init.output()  # it was stopped inside ray.init

    # Ctrl-C while Serve deploys the ingress (serve.run).
    deploying = _stop_at(service_files, "Ctrl-C while Serve deploys",
                         lambda run: run.wait_output(b"Started Serve in namespace"))
    assert b"metergate is up" not in deploying.output()

    # SIGTERM to `make up`'s own pid alone (`kill PID`), once the shard is up.
    _stop_at(service_files, "SIGTERM to make up's pid while the shards start",
             lambda run: run.wait_output(b"shard 0 up"), send=lambda run: os.kill(run.process.pid, signal.SIGTERM))

    # And the next start comes up and serves; Ctrl-C then drains and stops it.
    def up_and_serving(run: Service) -> None:
        _report("start after the interrupted ones", run.wait_up())
        assert httpx.get(f"{run.url}/readyz", timeout=30).status_code == 200
        org = httpx.post(f"{run.url}/v1/orgs", json={"org_id": f"org_{uuid.uuid4().hex[:8]}",
                                                     "email": "ctrl-c@example.com"},
                         headers={"Authorization": f"Bearer {ADMIN}"}, timeout=30)
        assert org.status_code == 201, org.text

    serving = _stop_at(service_files, "Ctrl-C while serving", up_and_serving)
    assert b"metergate: stopped in" in serving.output()  # the drained stop, not a start-up one


def test_make_up_and_its_service_killed_with_kill_9_mid_traffic_restart_with_every_tick_and_stop_leaving_nothing(
        service_files):
    data_dir, port, log = service_files
    crashed = Service(data_dir, port, log)
    try:
        _report("first start", crashed.wait_up())
        traffic = Traffic(crashed, "crash@example.com")
        # What `pkill -9 -f serve_app.main` does: both processes, no chance to clean up.
        os.kill(crashed.process.pid, signal.SIGKILL)
        os.kill(crashed.service_sid, signal.SIGKILL)
        crashed.process.wait(10)
        traffic.stop()
    finally:
        crashed.kill()
    left_by_crash = crashed.leftovers()
    # The premise: the Postgres survives (pg_ctl puts it in a session of its own) and still
    # counts the killed service among its holders, so it would never stop by itself.
    assert any(item.startswith("embedded postgres pid") for item in left_by_crash), left_by_crash
    assert any(str(crashed.service_sid) in item for item in left_by_crash if "holders" in item), left_by_crash

    again = Service(data_dir, port, log)  # `make up` again, at once, same data folder and port
    try:
        restart_s = again.wait_up(RESTART_WITHIN_S)
        _report(f"start after the kill -9 ({len(traffic.acked)} of {len(traffic.sent)} ticks acknowledged)",
                restart_s)
        traffic.assert_every_tick_counted_once(again.url)
        took_s = again.group_sigterm()
    finally:
        again.kill()
    _report("stop after the restart", took_s)
    assert took_s < STOP_WITHIN_S
    assert b"metergate: stopped in" in again.output()
    assert again.leftovers() == []
    # The first run's Ray processes (its agents outlive their raylet), HAProxy and Postgres.
    assert crashed.leftovers() == []


def test_the_embedded_postgres_stops_with_its_last_holder_though_a_killed_one_is_a_zombie_still(tmp_path):
    """A run killed with -9 is a zombie until its parent, or a container's init, reaps it,
    which can take seconds or forever: its pid still exists. Left among the holders, it
    would keep the Postgres running past the next run's stop (the kill -9 test above failed
    at random on this)."""
    unreaped = subprocess.Popen([sys.executable, "-c", "pass"])  # ends; this test never reaps it
    wait_for("the holder to end and stay unreaped",
             lambda: psutil.Process(unreaped.pid).status() == psutil.STATUS_ZOMBIE, 30)
    try:
        _, server = start_embedded_postgres(tmp_path)
        holders = tmp_path / "pg" / ".handle_pids.json"
        postmaster = psutil.Process(int((tmp_path / "pg" / "postmaster.pid").read_text().split()[0]))
        holders.write_text(json.dumps([unreaped.pid, *json.loads(holders.read_text())]))  # it held it too
        stop_embedded_postgres(server)
        assert not postmaster.is_running() or postmaster.status() == psutil.STATUS_ZOMBIE
        assert json.loads(holders.read_text()) == []
    finally:
        stop_postgres_now(tmp_path)
        unreaped.wait()
