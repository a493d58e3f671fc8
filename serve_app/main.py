"""`make up`: the service with its embedded defaults, until Ctrl-C or SIGTERM.

Two processes. The one `make up` starts only relays stop signals. The service runs in a
child, in a session of its own, with Ray and the embedded Postgres under it. A signal sent
to the whole process group (Ctrl-C in a terminal, `kill -- -PGID`) then reaches the relay
alone, and the service stops in order: it drains, then stops Ray and Postgres. Without the
split, the group signal kills Ray's processes first and the drain hangs until something
kills the service. The child also stops by itself when the relay dies (kill -9), so
nothing outlives a killed `make up`.

Both processes put in their signal handlers before they load anything of the project: the
imports (Ray's above all) take seconds, and a Ctrl-C then would end `make up` with a
KeyboardInterrupt traceback. So this module imports only the standard library at its top.
"""

from __future__ import annotations

import _thread
import logging
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from serve_app import launch

STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)
_RELAY_ENV = "METERGATE_RELAY_PID"  # set in the child that runs the service: its relay's pid
RUN_RECORD = "make-up.json"  # in the data folder: which processes the last run there was
PARENT_CHECK_EVERY_S = 0.5
# A stop must end within 15 s. Start-up can sit in a call that no signal interrupts (ray.init
# waiting on its own processes), and a stop step can hang on a half-dead cluster: past these
# the service stops Postgres and kills its own process group (Ray's processes and itself).
# Nothing is lost by that: an acknowledgement is only ever sent after its commit.
HARD_STOP_DURING_START_S = 8.0
HARD_STOP_AFTER_BUDGET_S = 1.5  # past launch.STOP_BUDGET_S
RELAY_DEADLINE_S = 12.5  # the relay's own last resort, should the child's hard stop not run
RAISE_AGAIN_AFTER_S = 0.02  # a StopRequested dropped where it landed is raised again this much later


class StopRequested(BaseException):
    """A stop signal came while the service was still starting (like KeyboardInterrupt)."""


def interrupted_by_stop(exc: BaseException) -> bool:
    """Whether a start-up failure is a stop signal's doing: StopRequested itself, SystemExit
    (Ray's SIGTERM handler, while ray.init runs), or an error StopRequested turned into on its
    way out of C code (raised inside Ray's Cython, it came out as "SystemError: ... returned a
    result with an exception set", the StopRequested as its cause)."""
    if isinstance(exc, SystemExit):
        return True
    seen: set[int] = set()
    while exc is not None and id(exc) not in seen:
        if isinstance(exc, StopRequested):
            return True
        seen.add(id(exc))
        exc = exc.__cause__ or exc.__context__
    return False


def main() -> int:
    relay_pid = os.environ.get(_RELAY_ENV)
    if relay_pid:
        return run_service(int(relay_pid))
    return relay()


def relay() -> int:
    """Start the service in its own session, pass every stop signal on to it, and take down
    whatever it leaves behind once it has ended."""
    started: list[subprocess.Popen] = []
    asked_at: list[float] = []  # when stop signals came: the first starts the relay's deadline

    def forward(_signum, _frame) -> None:
        asked_at.append(time.monotonic())
        if started and started[0].poll() is None:
            started[0].send_signal(signal.SIGTERM)

    for sig in STOP_SIGNALS:  # before the child exists: a signal in between is not lost
        signal.signal(sig, forward)
    if asked_at:  # a stop came while the handlers went in: nothing to start, nothing to stop
        print("metergate: stopped before the service started", flush=True)
        return 0
    started.append(subprocess.Popen([sys.executable, "-m", "serve_app.main", *sys.argv[1:]],
                                    env={**os.environ, _RELAY_ENV: str(os.getpid())}, start_new_session=True))
    child = started[0]
    if asked_at:
        child.send_signal(signal.SIGTERM)
    code = _wait(child, asked_at)
    # Ray's processes live in the child's process group: none may outlive it, whichever way it ended.
    _kill_group(child.pid)
    if code < 0:
        # Killed by a signal (its own hard stop, a crash of Ray's native code while stopping,
        # or a stop signal before it put in its handlers): the embedded Postgres may be left
        # running too.
        from serve_app import launch

        launch.kill_postgres_of(_loaded_settings())
        print(f"metergate: stopped (the service process ended by signal {-code})", flush=True)
        return 0 if asked_at else 128 - code
    return code


def _wait(child: subprocess.Popen, asked_at: list[float]) -> int:
    """The child's exit code. Once a stop was asked, the child gets RELAY_DEADLINE_S to end
    on its own (it has its own hard stop before that); then it is killed, group and all."""
    while True:
        try:
            return child.wait(timeout=0.5)
        except subprocess.TimeoutExpired:
            if asked_at and time.monotonic() - asked_at[0] > RELAY_DEADLINE_S:
                _kill_group(child.pid)


def _kill_group(pgid: int) -> None:
    try:
        os.killpg(pgid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass  # nothing left


def _loaded_settings():
    from config.settings import SettingsError, load_settings

    try:
        return load_settings()
    except SettingsError:
        return None


class StopSignals:
    """The service process's stop signals. The first one during start-up raises StopRequested
    in the main thread, wherever it is, so start-up ends at once and stops what it started;
    later ones (and any after start-up) set `requested`, which the main thread waits on.
    Either way a hard stop is armed: a stop that hangs ends by force.

    An exception a signal handler raises lands wherever the main thread happens to be. If
    that is inside a `__del__`, a weakref callback or a callback from C code (msgspec's
    pattern compilation was one), Python prints it as "Exception ignored" and drops it, and
    start-up would go on. `install` puts in an unraisable hook that takes such a dropped
    StopRequested, prints nothing, and raises it again at the main thread's next step."""

    def __init__(self) -> None:
        self.requested = threading.Event()
        self.starting = True
        self.settings = None  # once loaded: what the hard stop stops
        self._dropped = False
        self._hook_code = None  # set once the unraisable hook is in

    def install(self) -> None:
        """Put in the handlers (again, where Ray's replaced them) and, once, the hook."""
        if self._hook_code is None:
            sys.unraisablehook = self._dropped_stop_raised_again(sys.unraisablehook)
        for sig in STOP_SIGNALS:
            signal.signal(sig, self.on_signal)

    def on_signal(self, _signum, frame) -> None:
        if self._dropped:
            if frame is not None and frame.f_code is self._hook_code:
                self._raise_again_soon()  # still in the hook, where it would be dropped again
                return
            self._dropped = False
            raise StopRequested
        if self.requested.is_set():
            return
        self.requested.set()
        if self.starting:  # interrupt the start-up once; launch.start stops what it had started
            self.starting = False
            _hard_stop_after(HARD_STOP_DURING_START_S, self.settings)
            raise StopRequested
        from serve_app.launch import STOP_BUDGET_S  # loaded: start-up is over

        _hard_stop_after(STOP_BUDGET_S + HARD_STOP_AFTER_BUDGET_S, self.settings)

    def _dropped_stop_raised_again(self, previous_hook):
        def hook(unraisable) -> None:
            if unraisable.exc_type is not StopRequested:
                previous_hook(unraisable)
                return
            self._dropped = True
            self._raise_again_soon()

        self._hook_code = hook.__code__
        return hook

    def _raise_again_soon(self) -> None:
        """Signal the main thread again from another thread, a moment from now: a signal sent
        from the hook itself would run on_signal inside the hook (signal.raise_signal even
        runs it before returning)."""

        def signal_main() -> None:
            time.sleep(RAISE_AGAIN_AFTER_S)
            _thread.interrupt_main(signal.SIGTERM)  # on_signal runs at the main thread's next step

        threading.Thread(target=signal_main, name="stop-again", daemon=True).start()


def run_service(relay_pid: int) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    stops = StopSignals()
    running = None
    try:
        # First in the try: from the moment a handler is in, a stop may raise StopRequested.
        stops.install()
        _stop_when_orphaned(relay_pid)
        from config.settings import load_settings  # the project's modules and Ray: seconds to load
        from serve_app import launch

        stops.settings = load_settings()
        _take_down_crashed_run(stops.settings.data_dir, relay_pid)
        running = launch.Running(stops.settings)
        launch.start(stops.settings, running=running)
        stops.starting = False
    except BaseException as exc:
        if not interrupted_by_stop(exc):
            from config.catalog import CatalogError
            from config.settings import SettingsError

            if not isinstance(exc, (SettingsError, CatalogError)):
                raise
            print(f"metergate: {exc}", file=sys.stderr)
            return 2
        if not stops.requested.is_set():  # Ray's handler took the signal: ours are not armed yet
            stops.requested.set()
            _hard_stop_after(HARD_STOP_DURING_START_S, stops.settings)
        stops.starting = False
        stops.install()  # ours again (Ray's may be in): a second signal changes nothing
        if running is not None:
            launch.stop(running, drain=False)  # does nothing if start-up already stopped it
        print("metergate: stopped during start-up", flush=True)
        return 0
    if not stops.requested.is_set():
        print(banner(running), flush=True)
        stops.requested.wait()
    print("metergate: stopping (draining shards)...", flush=True)
    started = time.monotonic()
    launch.stop(running)
    print(f"metergate: stopped in {time.monotonic() - started:.1f} s", flush=True)
    return 0


def _take_down_crashed_run(data_dir: Path, relay_pid: int) -> None:
    """Kill what an earlier `make up` on this data folder left running, then record this one.

    Killed with -9 together with its service (the OOM killer, `pkill -9 -f serve_app.main`),
    a run leaves processes that nothing stops: Ray's dashboard and runtime-env agents outlive
    their raylet by a minute or more. (Its embedded Postgres and HAProxy are found by their
    folders: storage.db and launch.stop_haproxy take care of those.) They are in the dead
    service's session, younger than it, and carry its relay's pid in their environment, or
    no environment at all (Ray's process titles overwrite it): together, that names them
    whatever pids the system has handed out again since."""
    import json

    import psutil

    record = data_dir / RUN_RECORD
    try:
        earlier = json.loads(record.read_text())
        service_pid, relay, started_at = int(earlier["service_pid"]), str(earlier["relay_pid"]), earlier["started_at"]
    except (OSError, ValueError, KeyError, TypeError):
        service_pid = None
    if service_pid is not None:
        left = []
        for proc in psutil.process_iter(["create_time"]):
            try:
                if (os.getsid(proc.pid) == service_pid and proc.info["create_time"] >= started_at
                        and proc.environ().get(_RELAY_ENV, relay) == relay):
                    left.append(proc)
            except (OSError, psutil.Error):
                continue  # gone meanwhile, a zombie, or not ours
        if any(proc.pid == service_pid for proc in left):
            return  # that run is still running: leave it (and its record) alone
        if left:
            logging.getLogger("metergate").warning("killing %d processes an earlier, killed run left: %s",
                                                   len(left), sorted(proc.pid for proc in left))
            for proc in left:
                try:
                    proc.kill()
                except psutil.Error:
                    pass
    data_dir.mkdir(parents=True, exist_ok=True)
    record.write_text(json.dumps({"service_pid": os.getpid(), "relay_pid": relay_pid,
                                  "started_at": psutil.Process().create_time()}))


def _stop_when_orphaned(relay_pid: int) -> None:
    """The relay was killed (kill -9): stop as if it had passed on a SIGTERM. The relay's pid
    comes from the relay itself: it may be dead before this process gets here."""

    def watch() -> None:
        while os.getppid() == relay_pid:
            time.sleep(PARENT_CHECK_EVERY_S)
        os.kill(os.getpid(), signal.SIGTERM)

    threading.Thread(target=watch, name="watch-relay", daemon=True).start()


def _hard_stop_after(seconds: float, settings) -> None:
    def hard_stop() -> None:
        time.sleep(seconds)
        from serve_app import launch

        print(f"metergate: the stop did not finish within {seconds:.0f} s; stopping Postgres and killing "
              "this service's processes", flush=True)
        launch.kill_now(settings)

    threading.Thread(target=hard_stop, name="hard-stop", daemon=True).start()


def dashboard_line(running: launch.Running) -> str:
    if running.dashboard_url is None:
        return "off (METERGATE_DASHBOARD=false, or a Ray started elsewhere)"
    if running.dashboard_needs_token:
        return f"{running.dashboard_url}   its token: .venv/bin/ray get-auth-token"
    return running.dashboard_url


def banner(running: launch.Running) -> str:
    s = running.settings
    return f"""
metergate is up
  API          {running.base_url}/v1/...
  API docs     {running.base_url}/docs
  health       {running.base_url}/healthz   ready: {running.base_url}/readyz
  dashboard    {dashboard_line(running)}
  metrics      {running.metrics_url or 'not exported (Ray runs without its metrics agent)'}
  database     {'embedded Postgres in ' + str(s.data_dir / 'pg') if running.pg_server else 'METERGATE_DATABASE_URL'}
  shards       {s.shards}
  service token  {shown_token(running, "service_token")}
  admin token    {shown_token(running, "admin_token")}
Ctrl-C stops it; every acknowledged change is already in Postgres.
"""


def shown_token(running: launch.Running, name: str) -> str:
    """A token as the banner prints it: whole only on the start that generated it (a banner
    lands in journald and CI logs at every start), else masked, with where to find it."""
    token = getattr(running.settings, name)
    if not token:
        return "(none)"
    if name in running.new_tokens:
        return f"{token}   (new: kept in {running.settings.data_dir / 'tokens.json'})"
    if token.startswith(("mg_svc_", "mg_adm_")):  # generated before: the prefix is no secret
        return f"{token[:7]}…{token[-4:]}   (in {running.settings.data_dir / 'tokens.json'})"
    return f"…{token[-4:]}   (METERGATE_{name.upper()})"


if __name__ == "__main__":
    sys.exit(main())
