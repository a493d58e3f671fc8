"""The process `metergate bench` starts: one benchmark module, tied to the CLI's life.

Run: python -m cli.bench_run bench.gate [--json]

It asks Linux for SIGTERM when its parent (the CLI) ends, however that ends (a closed
terminal, kill -9), so no benchmark runs on unseen; SIGTERM lets the benchmark stop the
service it started in order. With --json, everything the benchmark and the processes it
starts print goes to stderr, and its result (what its main() returns) to stdout as JSON.
"""

from __future__ import annotations

import ctypes
import importlib
import json
import os
import runpy
import signal
import sys

PR_SET_PDEATHSIG = 1  # linux/prctl.h


def main(module_name: str, as_json: bool, parent_pid: int) -> int:
    if sys.platform == "linux":
        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGTERM)
        if os.getppid() != parent_pid:
            return 1  # the CLI ended before the request above took effect
    if not as_json:
        runpy.run_module(module_name, run_name="__main__", alter_sys=True)
        return 0
    result_fd = os.dup(1)
    sys.stdout.flush()
    os.dup2(2, 1)  # at the file descriptor: child processes (wrk, Ray) print there too
    result = importlib.import_module(module_name).main()
    sys.stdout.flush()
    with os.fdopen(result_fd, "w") as result_out:
        result_out.write(json.dumps(result, indent=2, default=str) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1], "--json" in sys.argv[2:], int(os.environ["METERGATE_BENCH_PARENT"])))
