"""A Postgres wire-protocol relay on loopback that can cut a connection in the middle of a COMMIT.

The test service reaches Postgres through it (tests/conftest.py), so a test can make exactly
the fault a network gives a database client at its worst moment: the COMMIT went out and the
answer never came back. Did it commit? Only Postgres knows, and the shard must ask it.

It runs as its own process (`python -m tests.pgproxy UPSTREAM`), prints its two ports, and
takes one JSON command per line on its control port:

- `{"cmd": "cut", "needle": "note-1f3a", "when": "after_commit" | "before_commit"}`: the next
  transaction whose messages carry those bytes (a value written only by the commit under
  test, such as a credit's note or a lease id, is in its bind parameters) loses its
  connection at COMMIT. `after_commit` forwards
  the COMMIT, waits for Postgres to answer it, drops the answer and closes both sides (the
  transaction committed, the client cannot know); `before_commit` drops the COMMIT and closes
  (Postgres rolls the transaction back). `"when": "statement"` cuts instead the next
  statement outside a transaction (autocommit, such as an Idempotency-Key record's update)
  that carries the bytes, before Postgres gets it. With `"silent": true` a COMMIT cut closes
  nothing: the connection goes quiet both ways, as over a partitioned network (no reset, no
  answer), until the client closes it (and, before the COMMIT, Postgres ends its side) or
  SILENT_AT_MOST_S pass. Answers `{"armed": id}`.
- `{"cmd": "status"}`: `{"connections", "open", "cuts": [{"id", "when", "done"}]}`.

Client messages are framed (type byte, int32 length); nothing else is parsed. Only the
simple-query COMMIT that asyncpg's Transaction.commit sends is recognised.
"""

from __future__ import annotations

import asyncio
import glob
import json
import socket
import struct
import sys
from pathlib import Path

CHUNK = 1 << 16
SILENT_AT_MOST_S = 120  # a silent connection nobody closes is closed then


class Cut:
    def __init__(self, cut_id: int, needle: bytes, when: str, then_refuse_s: float, silent: bool = False) -> None:
        assert when in ("after_commit", "before_commit", "statement"), when
        assert not silent or when != "statement", "only a COMMIT goes silent"
        self.cut_id = cut_id
        self.needle = needle
        self.when = when
        self.then_refuse_s = then_refuse_s
        self.silent = silent
        self.done = False


class Relay:
    def __init__(self, upstream: str) -> None:
        self.upstream = upstream  # "unix:/dir" (a pgserver socket folder) or "host:port"
        self.cuts: list[Cut] = []
        self.connections = 0
        self.open = 0
        self.refusing_until = 0.0  # loop time: until then, every connection is reset
        self.writers: set[asyncio.StreamWriter] = set()

    async def _connect_upstream(self):
        if self.upstream.startswith("unix:"):
            sockets = [p for p in glob.glob(self.upstream[5:] + "/.s.PGSQL.*") if not p.endswith(".lock")]
            if not sockets:
                raise ConnectionRefusedError("no Postgres socket")
            return await asyncio.open_unix_connection(sockets[0])
        host, port = self.upstream.rsplit(":", 1)
        return await asyncio.open_connection(host, int(port))

    async def serve_client(self, client_r: asyncio.StreamReader, client_w: asyncio.StreamWriter) -> None:
        self.connections += 1
        self.open += 1
        try:
            if asyncio.get_running_loop().time() < self.refusing_until:
                _reset(client_w)
                return
            try:
                server_r, server_w = await self._connect_upstream()
            except OSError:
                _reset(client_w)  # as a stopped Postgres does: the connection is refused
                return
            self.writers.update((client_w, server_w))
            try:
                await self._relay(client_r, client_w, server_r, server_w)
            finally:
                self.writers.difference_update((client_w, server_w))
        finally:
            self.open -= 1

    def refuse(self, seconds: float) -> None:
        """Postgres out of reach for `seconds`: every connection reset, new ones refused."""
        self.refusing_until = asyncio.get_running_loop().time() + seconds
        for writer in list(self.writers):
            _reset(writer)

    async def _relay(self, client_r, client_w, server_r, server_w) -> None:
        commit_answered = asyncio.Event()
        cutting: list[Cut] = []  # the cut this connection is carrying out, once decided
        dropping = asyncio.Event()  # set: the answer to COMMIT (and all after it) is dropped

        async def upstream_to_client() -> None:
            while data := await server_r.read(CHUNK):
                if dropping.is_set():
                    commit_answered.set()
                    if cutting[0].silent:
                        continue  # swallowed
                    return
                client_w.write(data)
                await client_w.drain()

        async def client_to_upstream() -> None:
            buffer = b""
            started = False  # the startup message (and SSL/GSS requests before it) has no type byte
            in_transaction = False  # between a simple-query BEGIN and COMMIT / ROLLBACK (asyncpg's)
            carries: Cut | None = None  # the armed cut whose needle this transaction carried
            while data := await client_r.read(CHUNK):
                buffer += data
                out = bytearray()
                while True:
                    if not started:
                        if len(buffer) < 8:
                            break
                        length = struct.unpack("!I", buffer[:4])[0]
                        if len(buffer) < length:
                            break
                        code = struct.unpack("!I", buffer[4:8])[0]
                        started = code not in (80877103, 80877104)  # SSLRequest, GSSENCRequest
                        out += buffer[:length]
                        buffer = buffer[length:]
                        continue
                    if len(buffer) < 5:
                        break
                    length = struct.unpack("!I", buffer[1:5])[0]
                    if len(buffer) < 1 + length:
                        break
                    message, buffer = buffer[:1 + length], buffer[1 + length:]
                    query = message[5:].lstrip().upper() if message[:1] == b"Q" else b""
                    if query.startswith(b"BEGIN"):
                        in_transaction = True
                    elif in_transaction and carries is None:
                        carries = next((c for c in self.cuts
                                        if not c.done and c.when != "statement" and c.needle in message), None)
                    elif not in_transaction and (statement := next((c for c in self.cuts if not c.done and (
                            c.when == "statement" and c.needle in message)), None)):
                        statement.done = True  # this statement (and what came with it) never reaches Postgres
                        cutting.append(statement)
                        return
                    if query.startswith(b"COMMIT"):
                        if carries is not None and not carries.done:
                            carries.done = True
                            cutting.append(carries)
                            server_w.write(bytes(out))
                            dropping.set()
                            if carries.when == "after_commit":
                                server_w.write(message)
                            await server_w.drain()
                            if carries.silent:  # what the client sends from now on is swallowed
                                while await client_r.read(CHUNK):
                                    pass
                            return
                        carries, in_transaction = None, False
                    elif query.startswith(b"ROLLBACK"):
                        carries, in_transaction = None, False
                    out += message
                server_w.write(bytes(out))
                await server_w.drain()

        tasks = [asyncio.ensure_future(upstream_to_client()), asyncio.ensure_future(client_to_upstream())]
        try:
            await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
            if cutting and cutting[0].silent:
                # Quiet until the client gives up on it. After a COMMIT Postgres ran, its server
                # process is idle and the link is closed then; before it, the transaction stays
                # open until Postgres ends the process (as the shard has it do) and closes.
                await asyncio.wait([tasks[1]], timeout=SILENT_AT_MOST_S)
                if cutting[0].when == "before_commit":
                    await asyncio.wait([tasks[0]], timeout=SILENT_AT_MOST_S)
            elif cutting and cutting[0].when == "after_commit":
                # Postgres has the COMMIT: wait (bounded) until it answers, so the transaction
                # is known to be committed before the client loses the connection.
                await asyncio.wait_for(commit_answered.wait(), timeout=10)
        except (OSError, asyncio.TimeoutError):
            pass
        finally:
            if cutting and cutting[0].then_refuse_s:
                self.refuse(cutting[0].then_refuse_s)
            for task in tasks:
                task.cancel()
            for writer in (server_w, client_w):
                if cutting:
                    _reset(writer)
                else:
                    writer.close()

    async def control(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while line := await reader.readline():
                request = json.loads(line)
                if request["cmd"] == "cut":
                    cut = Cut(len(self.cuts) + 1, request["needle"].encode(), request["when"],
                              request.get("then_refuse_s", 0), request.get("silent", False))
                    self.cuts.append(cut)
                    answer = {"armed": cut.cut_id}
                else:
                    answer = {"connections": self.connections, "open": self.open,
                              "cuts": [{"id": c.cut_id, "when": c.when, "done": c.done} for c in self.cuts]}
                writer.write(json.dumps(answer).encode() + b"\n")
                await writer.drain()
        finally:
            writer.close()


def _reset(writer: asyncio.StreamWriter) -> None:
    """Close with a TCP reset (SO_LINGER 0), as a dead peer or a refused port looks."""
    sock = writer.get_extra_info("socket")
    if sock is not None and sock.family in (socket.AF_INET, socket.AF_INET6):
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        except OSError:
            pass
    writer.close()


async def main(upstream: str) -> None:
    relay = Relay(upstream)
    data = await asyncio.start_server(relay.serve_client, "127.0.0.1", 0)
    control = await asyncio.start_server(relay.control, "127.0.0.1", 0)
    print(json.dumps({"port": data.sockets[0].getsockname()[1],
                      "control_port": control.sockets[0].getsockname()[1]}), flush=True)
    # Ends with its parent: the test session closes stdin (or dies) and the relay stops.
    loop = asyncio.get_running_loop()
    stdin_closed = loop.create_future()
    loop.add_reader(sys.stdin.fileno(), lambda: stdin_closed.done() or (
        not sys.stdin.buffer.read1(1) and stdin_closed.set_result(None)))
    await stdin_closed


if __name__ == "__main__":
    asyncio.run(main(sys.argv[1]))


class PgProxy:
    """The relay above as a child process of the test session, and its control."""

    def __init__(self, upstream_url: str) -> None:
        import subprocess
        from urllib.parse import parse_qs, urlsplit

        parts = urlsplit(upstream_url)
        socket_dir = parse_qs(parts.query).get("host", [None])[0]
        upstream = f"unix:{socket_dir}" if socket_dir else f"{parts.hostname}:{parts.port or 5432}"
        self.process = subprocess.Popen([sys.executable, "-m", "tests.pgproxy", upstream],
                                        cwd=Path(__file__).resolve().parent.parent,
                                        stdin=subprocess.PIPE, stdout=subprocess.PIPE)
        ports = json.loads(self.process.stdout.readline())
        self.control_port = ports["control_port"]
        credentials = parts.username or "postgres"
        if parts.password:
            credentials += f":{parts.password}"
        self.url = f"postgresql://{credentials}@127.0.0.1:{ports['port']}{parts.path}?sslmode=disable"

    def _ask(self, request: dict) -> dict:
        with socket.create_connection(("127.0.0.1", self.control_port), timeout=10) as conn:
            conn.sendall(json.dumps(request).encode() + b"\n")
            return json.loads(conn.makefile().readline())

    def cut(self, needle: str, when: str, then_refuse_s: float = 0, silent: bool = False) -> int:
        """Arm a cut of the next transaction carrying `needle` (and, if asked, every connection
        refused for `then_refuse_s` after it: Postgres out of reach; or, `silent`, the connection
        left open and quiet instead of closed); returns the cut's id."""
        return self._ask({"cmd": "cut", "needle": needle, "when": when, "then_refuse_s": then_refuse_s,
                          "silent": silent})["armed"]

    def status(self) -> dict:
        return self._ask({"cmd": "status"})

    def stop(self) -> None:
        self.process.stdin.close()
        try:
            self.process.wait(5)
        except Exception:  # noqa: BLE001 - it must not outlive the session
            self.process.kill()
            self.process.wait(5)
