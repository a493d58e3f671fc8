"""Several raylets on this machine (ray.cluster_utils.Cluster), metergate deployed with
`serve deploy serve_config.yaml`: the node hosting a shard is removed while ticks and credits
stream in; the shard comes back on another node, and every acknowledged tick and credit is
there, once. Then everything stops, and nothing of the scenario is left running.

The scenario (tests/multinode_scenario.py) runs in a process of its own: this session runs
a Ray of its own in-process (conftest's `service`), and a process joins one Ray at a time.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

import psutil

ROOT = Path(__file__).resolve().parent.parent
SCENARIO_TIMEOUT_S = 240
LINGER_S = 10
MARK = "METERGATE_MULTINODE_SCENARIO"  # in the environment of every process the scenario starts


def scenario_processes(mark: str) -> list[str]:
    """Processes that inherited this run's mark: raylets, GCS, workers, dashboard, Postgres."""
    found = []
    for proc in psutil.process_iter(["pid", "name", "cmdline"]):
        try:
            if proc.environ().get(MARK) == mark:
                found.append(f"{proc.pid} {proc.info['name']}: {' '.join(proc.info['cmdline'] or ())[:160]}")
        except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
            continue
    return found


def kill_scenario_processes(mark: str) -> None:
    for proc in psutil.process_iter():
        try:
            if proc.environ().get(MARK) == mark:
                proc.kill()
        except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
            continue


def test_a_node_lost_while_ticks_stream_in_loses_nothing_acknowledged(tmp_path):
    mark = uuid.uuid4().hex
    # Short: Ray's Unix socket paths under it must stay within 107 bytes.
    ray_dir = Path(tempfile.mkdtemp(prefix="mg-mn-"))
    started = time.monotonic()
    proc = subprocess.Popen([sys.executable, "-m", "tests.multinode_scenario", str(tmp_path), str(ray_dir)],
                            cwd=ROOT, env={**os.environ, MARK: mark}, start_new_session=True,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        output, _ = proc.communicate(timeout=SCENARIO_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        output, _ = proc.communicate()
        output += f"\n(killed after {SCENARIO_TIMEOUT_S} s)"
    finally:
        # Some of Ray's processes end a moment after the ones they hang on (the dashboard's
        # forkserver when the dashboard is gone): a few seconds, not a leak.
        deadline = time.monotonic() + LINGER_S
        while (left := scenario_processes(mark)) and time.monotonic() < deadline:
            time.sleep(0.2)
        kill_scenario_processes(mark)
        shutil.rmtree(ray_dir, ignore_errors=True)
    took_s = time.monotonic() - started
    steps = "\n".join(line for line in output.splitlines() if line.startswith("[scenario"))
    print(f"multi-node scenario: {took_s:.0f} s\n{steps}")
    assert proc.returncode == 0, output[-6000:]
    report = json.loads([line for line in output.splitlines() if line.startswith("{")][-1])

    # The shards were spread, and the lost ones came back on nodes that were left.
    assert report["nodes_at_start"] == 3
    assert report["spread_over_nodes"] >= 2, report["shard_nodes_before"]
    assert report["lost_shards"]
    for shard, node in report["shard_nodes_after"].items():
        assert node != report["removed_node"], f"shard {shard} is still on the removed node"
    assert sorted(int(k) for k in report["shard_nodes_after"]) == report["lost_shards"]

    # The node went away mid-stream: some requests failed, and then the rest went through.
    total_ticks = report["requests"] * report["ticks_per_request"]
    acknowledged_ticks = sum(1 for kind, _ in report["acknowledged"] if kind == "ticks")
    assert report["failed"], "nothing failed: the node was not removed under load"
    assert acknowledged_ticks == report["requests"], "every tick batch is acknowledged after the retries"
    failed_batches = sum(1 for kind, _ in report["failed"] if kind == "ticks")
    assert (report["requests"] - failed_batches) * report["ticks_per_request"] \
        <= report["billed_before_retry"] <= total_ticks
    assert report["billed_after_retry"] == total_ticks, "every tick billed exactly once"

    # Every acknowledged credit is in the ledger once; nothing that was not sent is there.
    in_ledger = report["credit_keys_in_ledger"]
    assert len(in_ledger) == len(set(in_ledger))
    assert set(in_ledger) <= set(report["credit_keys_sent"])
    acknowledged_credits = {f"stream-credit-{n}" for kind, n in report["acknowledged"] if kind == "credit"}
    assert acknowledged_credits <= set(in_ledger), acknowledged_credits - set(in_ledger)
    assert {f"stream-credit-{n}" for kind, n in report["held"]} | acknowledged_credits \
        == set(report["credit_keys_sent"])
    for org, balance in report["balances"].items():
        assert balance["actual"] == balance["expected"] == balance["ledger"], (org, balance)

    assert not left, "processes of the scenario still running after its stop:\n  " + "\n  ".join(left)
