"""The commands that run here rather than ask the service: `up`, `migrate`, `bench`."""

from __future__ import annotations

import asyncio
import os
import shutil
import subprocess
import sys
import threading
import warnings
from contextlib import contextmanager
from enum import Enum
from typing import Annotated, Iterator
from urllib.parse import urlsplit

import typer

from cli.client import CliError, JsonOption
from cli.output import Output
from config.settings import PROJECT_DIR


def up(host: Annotated[str | None, typer.Option("--host", help="Sets METERGATE_HTTP_HOST (default 127.0.0.1).",
                                                show_default=False)] = None,
       port: Annotated[int | None, typer.Option("--port", min=1, max=65535, show_default=False,
                                                help="Sets METERGATE_HTTP_PORT (default 8000).")] = None) -> None:
    """Run the service in the foreground, as `make up` does.

    It runs `python -m serve_app.main`: an embedded Postgres unless METERGATE_DATABASE_URL,
    a local Ray unless RAY_ADDRESS, the shards and the Serve app, and prints the URLs and
    tokens. Ctrl-C or SIGTERM drains and stops it. Every other setting is a METERGATE_*
    variable (docs/reference/settings.md)."""
    if host is not None:
        os.environ["METERGATE_HTTP_HOST"] = host
    if port is not None:
        os.environ["METERGATE_HTTP_PORT"] = str(port)
    sys.stdout.flush()
    # This process becomes the service's relay: signals reach it as they reach `make up`'s.
    os.execv(sys.executable, [sys.executable, "-m", "serve_app.main"])


def migrate(as_json: JsonOption = False) -> None:
    """Apply the database migrations that are not applied yet.

    The database is METERGATE_DATABASE_URL, or else the embedded Postgres in
    METERGATE_DATA_DIR/pg (started for the run, as `make up` would). Safe while the service
    runs, and when run twice."""
    from config.settings import SettingsError, load_settings
    from storage import db

    try:
        settings = load_settings()
    except SettingsError as exc:
        raise CliError(str(exc)) from None
    out = Output(as_json)
    with out.progress("migrating"), database(settings) as (url, where):
        try:
            applied = asyncio.run(db.migrate(url, **db.migration_options(settings)))
        except SettingsError as exc:  # a refusal (newer database, changed file, pooler, lock): its own words
            raise CliError(f"cannot migrate {where}: {exc}") from None
        except Exception as exc:  # noqa: BLE001 - asyncpg and OS errors alike: one line naming the database
            raise CliError(f"cannot migrate {where}: {type(exc).__name__}: {exc}") from None
    known = [name for _, name, _ in db.migration_files()]
    if out.as_json:
        return out.json({"database": where, "applied": applied, "migrations": known})
    if applied:
        out.line(f"applied {len(applied)} migration{'' if len(applied) == 1 else 's'} to {where}: "
                 + ", ".join(applied))
    else:
        out.line(f"{where} is up to date ({len(known)} migrations)")


@contextmanager
def database(settings, url: str | None = None) -> Iterator[tuple[str, str]]:
    """(url, where: the database named for people) a command works on: `url`, else
    METERGATE_DATABASE_URL, else the embedded Postgres of `make up` in METERGATE_DATA_DIR/pg,
    started for the command and let go after it. CliError if it cannot start."""
    from storage import db

    url = url or settings.database_url
    if url is not None:
        yield url, _without_password(url)
        return
    where = f"the embedded Postgres in {settings.data_dir / 'pg'}"
    try:
        with warnings.catch_warnings():  # pgserver's platformdirs warns where XDG_RUNTIME_DIR is unset
            warnings.simplefilter("ignore")
            url, server = db.start_embedded_postgres(settings.data_dir)
    except Exception as exc:  # noqa: BLE001 - pgserver fails in many ways; each ends the command alike
        raise CliError(f"cannot start {where}: {exc}") from None
    try:
        yield url, where
    finally:
        db.stop_embedded_postgres(server)


def _without_password(url: str) -> str:
    parts = urlsplit(url)
    if parts.password is None:
        return url
    return parts._replace(netloc=parts.netloc.replace(f":{parts.password}@", ":***@", 1)).geturl()


class Benchmark(str, Enum):
    all = "all"
    gate = "gate"
    usage = "usage"
    memory = "memory"
    recovery = "recovery"
    client = "client"


NEEDS_WRK = (Benchmark.all, Benchmark.gate)


def bench(name: Annotated[Benchmark, typer.Argument(help="Which benchmark.")] = Benchmark.all,
          as_json: Annotated[bool, typer.Option("--json", help="The benchmark's result as JSON on stdout; what "
                                                               "it prints goes to stderr. One benchmark only.")]
          = False) -> None:
    """Run a benchmark, streaming what it prints (minutes, not seconds).

    It runs `python -m bench.NAME` (`all` is `make bench`). Each benchmark starts its own
    service on a free port, so one you may be running is untouched. `gate` needs wrk
    (apt-get install wrk)."""
    if as_json and name is Benchmark.all:
        raise CliError("bench all prints a summary, not JSON; name one benchmark with --json", exit_code=2)
    if name in NEEDS_WRK and shutil.which("wrk") is None:
        raise CliError(f"bench {name.value} needs wrk: apt-get install wrk")
    if not (PROJECT_DIR / "bench").is_dir():
        raise CliError(f"the benchmarks live in the source tree (bench/), and {PROJECT_DIR} has none")
    module = "bench.run_all" if name is Benchmark.all else f"bench.{name.value}"
    command = [sys.executable, "-u", "-m", "cli.bench_run", module, *(["--json"] if as_json else [])]
    out = Output(as_json)
    with out.progress(f"bench {name.value}") as tracker, subprocess.Popen(
            command, cwd=PROJECT_DIR, env={**os.environ, "METERGATE_BENCH_PARENT": str(os.getpid())},
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, bufsize=1) as child:
        def relay_stderr() -> None:  # the benchmark's logs, from a thread; its stdout from here
            for line in child.stderr:
                tracker.say(line.rstrip("\n"), stderr=True)

        relay = threading.Thread(target=relay_stderr, name="bench-stderr", daemon=True)
        relay.start()
        for line in child.stdout:
            if as_json:
                sys.stdout.write(line)  # the JSON result: cli.bench_run sent everything else to stderr
            else:
                tracker.say(line.rstrip("\n"))
        code = child.wait()
        relay.join()
    if code != 0:
        raise CliError(f"bench {name.value} failed (python -m {module} exited with {code})")

