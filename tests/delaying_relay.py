"""A loopback TCP relay that can hold what the server sends for a while before passing it on:
the buffering proxy, TCP backlog or starved reader that a gate client must not mistake for a
fresh feed. Requests go through at once; answers wait `delay_s` (changeable at any time).
Threads only; every loop ends when its sockets close, and close() closes them all."""

from __future__ import annotations

import socket
import threading
import time
from collections import deque
from urllib.parse import urlsplit


class DelayingRelay:
    def __init__(self, target_url: str) -> None:
        parts = urlsplit(target_url)
        self.target = (parts.hostname, parts.port)
        self.delay_s = 0.0
        self._listener = socket.create_server(("127.0.0.1", 0))
        self._listener.settimeout(0.2)
        self.url = f"http://127.0.0.1:{self._listener.getsockname()[1]}"
        self._sockets: list[socket.socket] = []
        self._closed = threading.Event()
        self._threads = [threading.Thread(target=self._accept, daemon=True)]
        self._threads[0].start()

    def _accept(self) -> None:
        while not self._closed.is_set():
            try:
                client, _ = self._listener.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            server = socket.create_connection(self.target, timeout=10)
            server.settimeout(None)
            self._sockets += [client, server]
            held: deque = deque()
            ready = threading.Condition()
            for target in (lambda: self._pump(client, server), lambda: self._hold(server, held, ready),
                           lambda: self._release(client, held, ready)):
                thread = threading.Thread(target=target, daemon=True)
                thread.start()
                self._threads.append(thread)

    @staticmethod
    def _pump(source: socket.socket, sink: socket.socket) -> None:
        try:
            while chunk := source.recv(65536):
                sink.sendall(chunk)
        except OSError:
            pass
        finally:
            _shut(sink)

    def _hold(self, source: socket.socket, held: deque, ready: threading.Condition) -> None:
        try:
            while chunk := source.recv(65536):
                with ready:
                    held.append((time.monotonic() + self.delay_s, chunk))
                    ready.notify()
        except OSError:
            pass
        with ready:
            held.append((0.0, b""))  # the end, passed on after what was held before it
            ready.notify()

    def _release(self, sink: socket.socket, held: deque, ready: threading.Condition) -> None:
        while not self._closed.is_set():
            with ready:
                while not held and not self._closed.is_set():
                    ready.wait(0.2)
                if not held:
                    break
                due, chunk = held[0]
            wait = due - time.monotonic()
            if wait > 0:
                time.sleep(min(wait, 0.2))
                continue
            with ready:
                held.popleft()
            if not chunk:
                break
            try:
                sink.sendall(chunk)
            except OSError:
                break
        _shut(sink)

    def close(self) -> None:
        self._closed.set()
        self._listener.close()
        for sock in self._sockets:
            _shut(sock)
            sock.close()
        for thread in self._threads:
            thread.join(timeout=5)

    def __enter__(self) -> DelayingRelay:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _shut(sock: socket.socket) -> None:
    try:
        sock.shutdown(socket.SHUT_RDWR)
    except OSError:
        pass
