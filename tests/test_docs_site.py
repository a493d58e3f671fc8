"""The docs site builds with `mkdocs build --strict`: every page in the nav exists and is in it,
and no link or anchor between pages is dead (mkdocs.yml's `validation`). Links from a page to a
repository file outside docs/ are served by mkdocs_hooks.py; one to a file that does not exist
must still fail the build, which the second test shows on a copy of the tree."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
# What a copy of the tree needs to build (pages may link to any repository file); not the venv,
# the database or caches.
NOT_COPIED = shutil.ignore_patterns(".venv", ".git", ".metergate", "build", "mutants", "__pycache__",
                                    ".pytest_cache", ".hypothesis", "artifacts", "*.egg-info")


def build(root: Path, site_dir: Path) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "--strict", "-f", str(root / "mkdocs.yml"),
         "-d", str(site_dir)],
        cwd=root, capture_output=True, text=True, timeout=300, env={"NO_MKDOCS_2_WARNING": "1", "PATH": ""})


def test_docs_site_builds_strict_with_no_dead_link(tmp_path: Path) -> None:
    done = build(ROOT, tmp_path / "site")
    assert done.returncode == 0, f"mkdocs build --strict failed:\n{done.stdout}{done.stderr}"
    assert (tmp_path / "site" / "index.html").is_file()
    # A page's link to a repository file outside docs/ leads to a copy in the site.
    assert (tmp_path / "site" / "_repo" / "clients" / "vectors" / "gate_decisions.json").is_file()


def test_a_dead_link_fails_the_build(tmp_path: Path) -> None:
    tree = tmp_path / "tree"
    shutil.copytree(ROOT, tree, ignore=NOT_COPIED)
    page = tree / "docs" / "concepts" / "guarantees.md"
    page.write_text(page.read_text(encoding="utf-8")
                    + "\nSee [a page that is not there](no-such-page.md) and [a file that is not"
                      " there](../../actors/no_such_module.py).\n", encoding="utf-8")
    done = build(tree, tmp_path / "site")
    assert done.returncode != 0
    output = done.stdout + done.stderr
    assert "no-such-page.md" in output and "no_such_module.py" in output, output
