"""A real `make up` (`python -m serve_app.main`) run by a test in a process group of its own,
with its own data folder, port and local Ray cluster, and the checks that a stop left
nothing behind and lost nothing acknowledged.

Shared by the stop-signal tests (tests/test_stop_signals.py) and the chaos tests of
`make up` itself (tests/chaos/test_make_up.py).
"""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path

import httpx
import psutil
import pytest

from config.settings import Settings
from serve_app.launch import haproxy_dir, haproxy_processes
from tests.helpers import free_port, wait_for

ROOT = Path(__file__).resolve().parent.parent
ADMIN = "stop-test-admin-token-0123456789"
SERVICE = "stop-test-service-token-0123456789"
STOP_WITHIN_S = 15
TRAFFIC_MAX_S = 60  # the traffic loop ends by itself after this, stop or no stop
# Every process a run starts inherits this from the environment (Ray's workers, HAProxy and
# the embedded Postgres too): it finds them whichever session or parent they ended up in.
RUN_TAG = "METERGATE_TEST_RUN_ID"


class Service:
    """One `make up` in its own process group; output kept in a file.

    await_service=False returns at once after the spawn, before `make up` has started the
    service process (service_sid stays None until service_started() finds it)."""

    def __init__(self, data_dir: Path, port: int, log: Path, await_service: bool = True) -> None:
        self.run_id = uuid.uuid4().hex
        env = {k: v for k, v in os.environ.items() if not k.startswith(("METERGATE_", "RAY_ADDRESS"))}
        env.update(METERGATE_DATA_DIR=str(data_dir), METERGATE_HTTP_PORT=str(port), METERGATE_SHARDS="1",
                   METERGATE_ADMIN_TOKEN=ADMIN, METERGATE_SERVICE_TOKEN=SERVICE,
                   METERGATE_DASHBOARD="false", METERGATE_METRICS_PORT="0")  # no fixed ports, less CPU
        env[RUN_TAG] = self.run_id
        self.url = f"http://127.0.0.1:{port}"
        self.port = port
        self.data_dir = data_dir
        self.log = log
        self.log_from = log.stat().st_size if log.exists() else 0  # this run's output starts here
        self.started_at = time.monotonic()
        with open(log, "ab") as out:
            self.process = subprocess.Popen([sys.executable, "-m", "serve_app.main"], cwd=ROOT, env=env,
                                            stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
        self.service_sid: int | None = None
        if await_service:
            # The service itself runs in a child with a session of its own: its id names it.
            wait_for("the service process", self.service_started, 30)

    def service_started(self) -> int | None:
        if self.service_sid is None:
            try:
                children = psutil.Process(self.process.pid).children()
            except psutil.NoSuchProcess:
                return None
            self.service_sid = children[0].pid if children else None
        return self.service_sid

    def output(self) -> bytes:
        return self.log.read_bytes()[self.log_from:]

    def wait_output(self, marker: bytes, timeout_s: float = 120) -> float:
        """Wait for marker in this run's output; seconds since the spawn."""
        wait_for(repr(marker), lambda: marker in self.output() or self.process.poll() is not None, timeout_s)
        assert marker in self.output(), self.output()[-3000:].decode(errors="replace")
        return time.monotonic() - self.started_at

    def wait_up(self, timeout_s: float = 180) -> float:
        """Wait for the banner; seconds the start took. The banner is true: callers are served
        from that moment (not told 503 while Serve's HAProxy waits for its routes)."""
        took_s = self.wait_output(b"metergate is up", timeout_s)
        assert self.process.poll() is None, self.output()[-3000:].decode(errors="replace")
        served = httpx.get(f"{self.url}/healthz", timeout=10)
        assert served.status_code == 200, served.text
        return took_s

    def exited_within(self, seconds: float, started: float) -> float:
        """Seconds from `started` until `make up` exited; killed with its group past `seconds`."""
        try:
            self.process.wait(max(seconds - (time.monotonic() - started), 0.1))
        except subprocess.TimeoutExpired:
            self.kill()
            raise AssertionError(f"no exit within {seconds} s:\n{self.output()[-3000:].decode(errors='replace')}")
        return time.monotonic() - started

    def signal_group(self, signum: int) -> float:
        """A signal to the whole process group, as a terminal (Ctrl-C: SIGINT) or systemd
        (SIGTERM) sends it; seconds to exit."""
        started = time.monotonic()
        os.killpg(self.process.pid, signum)
        return self.exited_within(STOP_WITHIN_S, started)

    def group_sigterm(self) -> float:
        return self.signal_group(signal.SIGTERM)

    def kill(self) -> None:
        """SIGKILL to the process group `make up` runs in (not the service's own session)."""
        if self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait(10)

    def ray_processes_pattern(self) -> re.Pattern | None:
        """Ray names its session folder after the process that started Ray: the service."""
        return re.compile(rf"/session_[0-9_-]+_{self.service_sid}(/|\b)") if self.service_sid else None

    def leftovers(self) -> list[str]:
        """Anything of this run still alive: processes of the service's session or started by
        the run (whatever session they moved to), Ray's processes of this run, Serve's
        HAProxy, its files, and any Postgres of the data folder, the HTTP port held, and pids the embedded
        Postgres still counts as its holders (it stops only when none is left)."""
        left = []
        ray_session = self.ray_processes_pattern()
        for proc in psutil.process_iter(["pid", "cmdline", "status"]):
            if proc.info["status"] == psutil.STATUS_ZOMBIE or proc.pid == os.getpid():
                continue  # already dead, waiting to be reaped by whoever adopted it
            cmdline = " ".join(proc.info["cmdline"] or [])
            try:
                in_session = self.service_sid is not None and os.getsid(proc.pid) == self.service_sid
            except ProcessLookupError:
                continue
            try:
                started_by_run = proc.environ().get(RUN_TAG) == self.run_id
            except psutil.Error:
                started_by_run = False  # gone meanwhile, or not ours to read
            if (in_session or started_by_run or (ray_session and ray_session.search(cmdline))
                    or str(self.data_dir) in cmdline):
                left.append(f"pid {proc.pid}: {cmdline[:120]}")
        settings = Settings(data_dir=self.data_dir)
        left += [f"haproxy pid {proc.pid}" for proc in haproxy_processes(settings)]  # Serve's, which can outlive Ray
        if haproxy_dir(settings).exists():
            left.append(f"haproxy files {haproxy_dir(settings)}")
        with socket.socket() as sock:  # as a server binds it: SO_REUSEADDR
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                sock.bind(("127.0.0.1", self.port))
            except OSError:
                left.append(f"port {self.port} still held")
        postmaster = self.data_dir / "pg" / "postmaster.pid"
        if postmaster.exists():
            pid = int(postmaster.read_text().split()[0])
            if psutil.pid_exists(pid):
                left.append(f"embedded postgres pid {pid}")
        holders = self.data_dir / "pg" / ".handle_pids.json"
        if holders.exists() and json.loads(holders.read_text()):
            left.append(f"embedded postgres holders {holders.read_text()}")
        return sorted(set(left))


@pytest.fixture
def service_files(tmp_path):
    return tmp_path / "data", free_port(), tmp_path / "service.log"


class Traffic:
    """Usage ticks for a new org against a running service, ten a request, in a thread,
    until stop() or refused; records what was sent and what was acknowledged."""

    def __init__(self, run: Service, email: str) -> None:
        self.org_id = f"org_{uuid.uuid4().hex[:8]}"
        self.acked: list[str] = []
        self.sent: list[str] = []
        self._stop = threading.Event()
        admin = httpx.Client(base_url=run.url, headers={"Authorization": f"Bearer {ADMIN}"}, timeout=30)
        with admin:
            created = admin.post("/v1/orgs", json={"org_id": self.org_id, "email": email})
            assert created.status_code == 201, (created.status_code, dict(created.headers), created.text[:500])
        self._thread = threading.Thread(target=self._send, args=(run.url,))
        self._thread.start()
        wait_for("ticks acknowledged", lambda: len(self.acked) >= 200, 60)

    def stop(self) -> None:
        self._stop.set()  # before the service comes back: a loop failing against none would spin
        self._thread.join(TRAFFIC_MAX_S)

    def _send(self, url: str) -> None:
        headers = {"Authorization": f"Bearer {SERVICE}"}
        deadline = time.monotonic() + TRAFFIC_MAX_S
        with httpx.Client(base_url=url, headers=headers, timeout=10) as client:
            number = 0
            while not self._stop.is_set() and time.monotonic() < deadline:
                ids = [f"t{number + i}" for i in range(10)]
                number += 10
                self.sent.extend(ids)
                try:
                    response = client.post("/v1/usage", json={"ticks": [tick(self.org_id, t) for t in ids]})
                except httpx.HTTPError:
                    continue  # the service is going away: this batch may or may not have committed
                if response.status_code == 200 and not response.json()["rejected"]:
                    self.acked.extend(ids)

    def assert_every_tick_counted_once(self, url: str) -> None:
        """Everything sent goes again (to a service started since): each acknowledged tick
        must come back as a duplicate, and the total billed must be every tick once."""
        compute = httpx.Client(base_url=url, headers={"Authorization": f"Bearer {SERVICE}"}, timeout=60)
        admin = httpx.Client(base_url=url, headers={"Authorization": f"Bearer {ADMIN}"}, timeout=30)
        with compute, admin:
            accepted = duplicates = 0
            for start in range(0, len(self.sent), 5_000):
                part = [tick(self.org_id, t) for t in self.sent[start:start + 5_000]]
                answer = compute.post("/v1/usage", json={"ticks": part})
                assert answer.status_code == 200, answer.text
                resent = answer.json()
                assert resent["rejected"] == [], resent
                accepted, duplicates = accepted + resent["accepted"], duplicates + resent["duplicates"]
            assert accepted + duplicates == len(self.sent)
            assert duplicates >= len(self.acked)
            groups = admin.get(f"/v1/orgs/{self.org_id}/usage", params={"group_by": "lease"}).json()["groups"]
            assert sum(g["ticks"] for g in groups) == len(set(self.sent))


def tick(org_id: str, tick_id: str) -> dict:
    return {"tick_id": tick_id, "org_id": org_id, "started_at": int(time.time()), "duration_ms": 1000,
            "memory_mb": 1024, "cpu_count": 1}

