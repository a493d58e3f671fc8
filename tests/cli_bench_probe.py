"""A stand-in benchmark for tests/test_cli.py: what `metergate bench` runs (cli.bench_run)
sees the same shape as bench/*: a main() that prints, starts a process that prints on file
descriptor 1, and returns its result. PROBE_SLEEP_S keeps it running, to be orphaned."""

from __future__ import annotations

import os
import subprocess
import sys
import time


def main() -> dict:
    print("probe: measuring", flush=True)
    print("probe: a log line", file=sys.stderr, flush=True)
    subprocess.run([sys.executable, "-c", "print('probe: from a child process')"], check=True)
    time.sleep(float(os.environ.get("PROBE_SLEEP_S", "0")))
    return {"ticks_per_s": 12_345, "rounds": [1, 2, 3]}


if __name__ == "__main__":
    main()
