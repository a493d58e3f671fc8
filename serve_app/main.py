"""`make up`: the service with its embedded defaults, until Ctrl-C."""

from __future__ import annotations

import logging
import signal
import sys
import threading

from config.catalog import CatalogError
from config.settings import SettingsError, load_settings
from serve_app import launch


def main() -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        settings = load_settings()
        running = launch.start(settings)
    except (SettingsError, CatalogError) as exc:
        print(f"metergate: {exc}", file=sys.stderr)
        return 2
    s = running.settings
    print(f"""
metergate is up
  API          {running.base_url}/v1/...
  API docs     {running.base_url}/docs
  health       {running.base_url}/healthz   ready: {running.base_url}/readyz
  database     {'embedded Postgres in ' + str(s.data_dir / 'pg') if running.pg_server else 'METERGATE_DATABASE_URL'}
  shards       {s.shards}
  service token  {s.service_token}
  admin token    {s.admin_token}
Ctrl-C stops it; every acknowledged change is already in Postgres.
""", flush=True)
    stop_requested = threading.Event()
    signal.signal(signal.SIGINT, lambda *_: stop_requested.set())
    signal.signal(signal.SIGTERM, lambda *_: stop_requested.set())
    stop_requested.wait()
    print("metergate: stopping (draining shards)...", flush=True)
    launch.stop(running)
    print("metergate: stopped", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
