"""Start localstripe and the Checkout front on loopback for a test session; stop them after."""

from __future__ import annotations

import socket
import subprocess
import sys
import time
from contextlib import contextmanager
from pathlib import Path

from tests.helpers import free_port

HERE = Path(__file__).resolve().parent
START_TIMEOUT_S = 30


def _wait_listening(port: int, process: subprocess.Popen) -> None:
    deadline = time.monotonic() + START_TIMEOUT_S
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"server on port {port} exited with {process.returncode}")
        with socket.socket() as sock:
            if sock.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.05)
    raise RuntimeError(f"nothing listens on 127.0.0.1:{port} after {START_TIMEOUT_S} s")


@contextmanager
def stripe_on_loopback(folder: Path):
    """Yields the api_base: the front (Checkout, portal) backed by localstripe (the rest)."""
    localstripe_port, front_port = free_port(), free_port()
    processes = []
    try:
        processes.append(subprocess.Popen(
            [sys.executable, str(HERE / "localstripe_loopback.py"), str(localstripe_port), str(folder)],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
        _wait_listening(localstripe_port, processes[-1])
        processes.append(subprocess.Popen(
            [sys.executable, str(HERE / "stripe_front.py"), str(front_port), str(localstripe_port)],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
        _wait_listening(front_port, processes[-1])
        yield f"http://127.0.0.1:{front_port}"
    finally:
        for process in processes:
            process.terminate()
        for process in processes:
            try:
                process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                process.kill()
