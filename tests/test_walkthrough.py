"""The walkthrough (docs/getting-started/walkthrough.md) run against `make up`: each command on
the page, in order, prints what the page shows under it.

The service is started exactly as `make up` starts it (tests/service_process.py), on its own
port and data folder; the page's commands run in bash from the repository root with the
three variables the page sets (METERGATE_URL, METERGATE_ADMIN_TOKEN, METERGATE_SERVICE_TOKEN).
What may differ from run to run, and nothing else, is listed in tests/walkthrough_page.py
(VARYING).
"""

from __future__ import annotations

import os
import shutil
import subprocess

import pytest

from tests.service_process import ADMIN, ROOT, SERVICE, STOP_WITHIN_S, Service
from tests.service_process import service_files  # noqa: F401 - the fixture the test below takes
from tests.walkthrough_page import Step, output_differences, steps_of

PAGE = ROOT / "docs" / "getting-started" / "walkthrough.md"
COMMAND_TIMEOUT_S = 60
# The page's story: create, gate, lease, usage and its resend, balance, the run to zero, the
# org, three refusals, the release, the service token refused, the grant, the org, the gate,
# the usage report. Fewer steps means the page lost some, or the parser stopped finding them.
MIN_STEPS = 17
TOOLS = ("bash", "curl", "jq")  # what the page's commands run, as a reader's shell has them


def _command_env(url: str) -> dict[str, str]:
    """The reader's shell after the page's set-up block, and nothing of this machine's own
    metergate settings (a METERGATE_DATA_DIR here would point the CLI somewhere else)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("METERGATE_")}
    env.update(METERGATE_URL=url, METERGATE_ADMIN_TOKEN=ADMIN, METERGATE_SERVICE_TOKEN=SERVICE,
               PATH=f"{ROOT / '.venv' / 'bin'}:{env.get('PATH', '/usr/bin:/bin')}")
    return env


def _run(step: Step, env: dict[str, str]) -> str:
    done = subprocess.run(["bash", "-o", "pipefail", "-c", step.command], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=COMMAND_TIMEOUT_S)
    assert done.returncode == 0, (f"line {step.line}: exit {done.returncode}\n{step.command}\n"
                                  f"stdout: {done.stdout}\nstderr: {done.stderr}")
    return done.stdout


def test_every_command_of_the_walkthrough_prints_what_the_page_shows(service_files):
    missing = [tool for tool in TOOLS if shutil.which(tool) is None]
    assert not missing, f"the walkthrough's commands need {', '.join(missing)} (apt-get install {' '.join(missing)})"
    steps = steps_of(PAGE.read_text(encoding="utf-8"))
    assert len(steps) >= MIN_STEPS, [step.command for step in steps]
    assert all(step.output.strip() for step in steps), "a command on the page shows no output"

    run = Service(*service_files)
    try:
        run.wait_up()
        env = _command_env(run.url)
        wrong = []
        for step in steps:  # every step, so one run reports every output the page has wrong
            answered = _run(step, env)
            found = output_differences(step.output, answered)
            if found:
                wrong.append(f"line {step.line}: {step.command.splitlines()[0]}\n  " + "\n  ".join(found))
        took_s = run.group_sigterm()
    finally:
        run.kill()
    assert not wrong, "the page shows outputs the service does not give:\n" + "\n".join(wrong)
    assert took_s < STOP_WITHIN_S
    assert run.leftovers() == []


@pytest.mark.parametrize("shown, answered, found", [
    ('{"balance_micros": 4997240}', '{"balance_micros":4997241}', ["$.balance_micros"]),
    ('{"created_at": "2026-01-01T00:00:00Z"}', '{"created_at": "2027-05-05T10:00:00.5Z"}', []),
    ('{"expires_at": null}', '{"expires_at": "2027-05-05T10:00:00Z"}', ["$.expires_at"]),
    ('{"period": {"key": "2026-12"}}', '{"period": {"key": "2027-01"}}', []),
    ('{"key": "a"}', '{"key": "b"}', ["$.key"]),  # only the period's key varies
    ('{"seq": 2}', '{"seq": 3}', ["$.seq"]),  # only a gate view's does
    ('{"a": 1}', '{"a": 1, "b": 2}', ["$.b"]),
    ('{"a": 1}\nHTTP 402', '{"a":1}\nHTTP 200', ["item 2"]),
    ('{"a": 1.0}', '{"a": 1}', ["$.a"]),
])
def test_the_comparison_ignores_only_what_varies(shown, answered, found):
    differences = output_differences(shown, answered)
    assert len(differences) == len(found), differences
    assert all(difference.startswith(prefix) for difference, prefix in zip(differences, found)), differences


def test_a_command_runs_to_the_end_of_its_continuations_and_its_here_document():
    page = "\n".join([
        "```console", "$ curl -s a \\", "    -d @- <<EOF | jq -c", '{"x": 1}', "EOF", '{"ok": true}',
        "$ echo done", "done", "```",
    ])
    steps = steps_of(page)
    assert [(s.line, s.command, s.output) for s in steps] == [
        (2, 'curl -s a \\\n    -d @- <<EOF | jq -c\n{"x": 1}\nEOF', '{"ok": true}'),
        (7, "echo done", "done"),
    ]
