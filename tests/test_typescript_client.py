"""The TypeScript client (clients/typescript/): built with tsc from its committed lockfile, its
Node tests (node --test), and the gate vectors run inside workerd, the Workers runtime that the
npm package miniflare ships (docs/integrate/typescript.md).

Needs Node 20+ and npm on PATH; without them every test here skips and says what is missing
(CI installs Debian's nodejs and npm: .ci/run). `npm ci` reads the registry or npm's cache.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parent.parent / "clients" / "typescript"
NODE_MAJOR_MIN = 20


def _node_missing() -> str | None:
    node, npm = shutil.which("node"), shutil.which("npm")
    if node is None:
        return "Node.js is not installed (no `node` on PATH; apt-get install nodejs npm)"
    if npm is None:
        return "npm is not installed (no `npm` on PATH; apt-get install npm)"
    version = subprocess.run([node, "--version"], capture_output=True, text=True, timeout=30).stdout.strip()
    found = re.match(r"v(\d+)\.", version)
    if found is None or int(found.group(1)) < NODE_MAJOR_MIN:
        return f"Node.js {NODE_MAJOR_MIN}+ is needed for the TypeScript client's tests, found {version or 'none'}"
    return None


MISSING = _node_missing()
if MISSING is not None:
    pytest.skip(MISSING, allow_module_level=True)


def _run(args: list[str], timeout_s: float, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    done = subprocess.run(args, cwd=PACKAGE, capture_output=True, text=True, timeout=timeout_s,
                          env={**os.environ, **(env or {})})
    assert done.returncode == 0, f"{' '.join(args)} exited {done.returncode}:\n{done.stdout[-4000:]}\n{done.stderr[-4000:]}"
    return done


@pytest.fixture(scope="module")
def built() -> Path:
    """node_modules from the lockfile (install scripts off: workerd's binary comes in its own
    npm package, and npm 9 and 11 then do the same), then dist/ from tsc."""
    _run(["npm", "ci", "--no-audit", "--no-fund", "--prefer-offline", "--ignore-scripts"], timeout_s=300)
    _run([str(PACKAGE / "node_modules" / ".bin" / "tsc"), "-p", "tsconfig.json"], timeout_s=120)
    return PACKAGE


def test_node_tests_pass_the_vectors_and_the_projection_rules(built):
    tests = sorted(str(path.relative_to(built)) for path in (built / "test").glob("*.test.mjs"))
    assert tests, "no Node tests found"
    done = _run(["node", "--test", *tests], timeout_s=120)
    assert re.search(r"^# fail 0$", done.stdout, re.MULTILINE), done.stdout[-4000:]


def test_gate_vectors_pass_inside_workerd(built):
    done = _run(["node", "test/workerd/run.mjs"], timeout_s=120)
    assert "gate vectors pass" in done.stdout, done.stdout
