"""`make up` stops cleanly on SIGTERM to its whole process group, during traffic and during
start-up, loses nothing acknowledged, leaves no process behind, and starts again at once.

Each test runs the real entry point (`python -m serve_app.main`, what `make up` runs) in a
process group of its own, with its own data folder, port and local Ray cluster.
"""

from __future__ import annotations

import os
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
from serve_app.launch import haproxy_dir
from tests.helpers import free_port, wait_for

ROOT = Path(__file__).resolve().parent.parent
ADMIN = "stop-test-admin-token-0123456789"
SERVICE = "stop-test-service-token-0123456789"
STOP_WITHIN_S = 15
TRAFFIC_MAX_S = 60  # the traffic loop ends by itself after this, stop or no stop


class Service:
    """One `make up` in its own process group; output kept in a file."""

    def __init__(self, data_dir: Path, port: int, log: Path) -> None:
        env = {k: v for k, v in os.environ.items() if not k.startswith(("METERGATE_", "RAY_ADDRESS"))}
        env.update(METERGATE_DATA_DIR=str(data_dir), METERGATE_HTTP_PORT=str(port), METERGATE_SHARDS="1",
                   METERGATE_ADMIN_TOKEN=ADMIN, METERGATE_SERVICE_TOKEN=SERVICE,
                   METERGATE_DASHBOARD="false", METERGATE_METRICS_PORT="0")  # no fixed ports, less CPU
        self.url = f"http://127.0.0.1:{port}"
        self.port = port
        self.data_dir = data_dir
        self.log = log
        self.log_from = log.stat().st_size if log.exists() else 0  # this run's output starts here
        with open(log, "ab") as out:
            self.process = subprocess.Popen([sys.executable, "-m", "serve_app.main"], cwd=ROOT, env=env,
                                            stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
        # The service itself runs in a child with a session of its own: its id names it.
        self.service_sid = wait_for("the service process", self._service_sid, 30)

    def _service_sid(self) -> int | None:
        try:
            children = psutil.Process(self.process.pid).children()
        except psutil.NoSuchProcess:
            return None
        return children[0].pid if children else None

    def output(self) -> bytes:
        return self.log.read_bytes()[self.log_from:]

    def wait_up(self, timeout_s: float = 180) -> None:
        wait_for("metergate is up", lambda: b"metergate is up" in self.output() or self.process.poll() is not None,
                 timeout_s)
        assert self.process.poll() is None, self.output()[-3000:].decode(errors="replace")

    def group_sigterm(self) -> float:
        """SIGTERM to the whole process group, as systemd or a terminal sends it; seconds to exit."""
        started = time.monotonic()
        os.killpg(self.process.pid, signal.SIGTERM)
        try:
            self.process.wait(STOP_WITHIN_S)
        except subprocess.TimeoutExpired:
            os.killpg(self.process.pid, signal.SIGKILL)
            raise AssertionError(f"no exit within {STOP_WITHIN_S} s:\n{self.log.read_text()[-3000:]}")
        return time.monotonic() - started

    def leftovers(self) -> list[str]:
        """Processes of the service's session still alive, and the embedded Postgres if it runs."""
        left = []
        for proc in psutil.process_iter(["pid", "cmdline", "status"]):
            if proc.info["status"] == psutil.STATUS_ZOMBIE:
                continue  # already dead, waiting to be reaped by whoever adopted it
            try:
                if os.getsid(proc.pid) == self.service_sid:
                    left.append(" ".join(proc.info["cmdline"] or [])[:120])
            except (ProcessLookupError, PermissionError):
                continue
        haproxy = str(haproxy_dir(Settings(data_dir=self.data_dir))) + os.sep  # Serve's, which can outlive Ray
        for proc in psutil.process_iter(["cmdline"]):
            if any(arg.startswith(haproxy) for arg in proc.info["cmdline"] or ()):
                left.append(f"haproxy pid {proc.pid}")
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
        return left


@pytest.fixture
def service_files(tmp_path):
    return tmp_path / "data", free_port(), tmp_path / "service.log"


def _send_ticks(url: str, org_id: str, acked: list[str], sent: list[str], stop: threading.Event) -> None:
    """Usage ticks, ten a request, until stopped or refused; records what was acknowledged."""
    headers = {"Authorization": f"Bearer {SERVICE}"}
    deadline = time.monotonic() + TRAFFIC_MAX_S
    with httpx.Client(base_url=url, headers=headers, timeout=10) as client:
        number = 0
        while not stop.is_set() and time.monotonic() < deadline:
            ids = [f"t{number + i}" for i in range(10)]
            number += 10
            sent.extend(ids)
            try:
                response = client.post("/v1/usage", json={"ticks": [_tick(org_id, t) for t in ids]})
            except httpx.HTTPError:
                continue  # the service is going away: this batch may or may not have committed
            if response.status_code == 200 and not response.json()["rejected"]:
                acked.extend(ids)


def _tick(org_id: str, tick_id: str) -> dict:
    return {"tick_id": tick_id, "org_id": org_id, "started_at": int(time.time()), "duration_ms": 1000,
            "memory_mb": 1024, "cpu_count": 1}


def test_group_sigterm_during_traffic_stops_within_15_s_and_loses_no_acknowledged_tick(service_files):
    data_dir, port, log = service_files
    org_id = f"org_{uuid.uuid4().hex[:8]}"
    first = Service(data_dir, port, log)
    try:
        first.wait_up()
        admin = httpx.Client(base_url=first.url, headers={"Authorization": f"Bearer {ADMIN}"}, timeout=30)
        assert admin.post("/v1/orgs", json={"org_id": org_id, "email": "stop@example.com"}).status_code == 201
        acked, sent, stop = [], [], threading.Event()
        traffic = threading.Thread(target=_send_ticks, args=(first.url, org_id, acked, sent, stop))
        traffic.start()
        wait_for("ticks acknowledged", lambda: len(acked) >= 200, 60)
        took_s = first.group_sigterm()
        stop.set()
        traffic.join(TRAFFIC_MAX_S)
    finally:
        if first.process.poll() is None:
            os.killpg(first.process.pid, signal.SIGKILL)
    assert took_s < STOP_WITHIN_S
    assert b"metergate: stopped in" in first.output()
    assert first.leftovers() == []

    second = Service(data_dir, port, log)  # `make up` again, at once
    try:
        second.wait_up()
        compute = httpx.Client(base_url=second.url, headers={"Authorization": f"Bearer {SERVICE}"}, timeout=60)
        admin = httpx.Client(base_url=second.url, headers={"Authorization": f"Bearer {ADMIN}"}, timeout=30)
        # Everything sent goes again: each acknowledged tick must come back as a duplicate, and
        # the total billed must be every tick once.
        accepted = duplicates = 0
        for start in range(0, len(sent), 5_000):
            part = [_tick(org_id, t) for t in sent[start:start + 5_000]]
            resent = compute.post("/v1/usage", json={"ticks": part}).json()
            assert resent["rejected"] == [], resent
            accepted, duplicates = accepted + resent["accepted"], duplicates + resent["duplicates"]
        assert accepted + duplicates == len(sent)
        assert duplicates >= len(acked)
        groups = admin.get(f"/v1/orgs/{org_id}/usage", params={"group_by": "lease"}).json()["groups"]
        assert sum(g["ticks"] for g in groups) == len(set(sent))
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
