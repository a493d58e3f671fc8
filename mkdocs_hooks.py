"""mkdocs hook: a docs page may link to a file of the repository outside docs/ (the gate's test
vectors, say) with a relative link, which works as it is on GitHub. In the built site such a
file is copied under `_repo/` and the link is pointed there; a link to a directory of the
repository (nothing to serve) becomes its text and path. A link whose target exists nowhere is
left as written, so `mkdocs build --strict` still fails on it; so is a link to a Markdown file
outside docs/ (it would be rendered as a page with links of its own that break)."""

from __future__ import annotations

import posixpath
import re
from pathlib import Path

from mkdocs.structure.files import File

LINK = re.compile(r"\[([^\]]*)\]\(([^)\s#]+)(#[^)\s]*)?\)")
PREFIX = "_repo"


def _repo_path(page_uri: str, target: str, docs_dir: Path, root: Path) -> tuple[str, bool] | None:
    """(repository path, is a directory) of a link's target that exists outside docs/, else None."""
    if "://" in target or target.startswith(("/", "mailto:")) or target.endswith(".md"):
        return None
    joined = posixpath.normpath(posixpath.join(posixpath.dirname(page_uri), target))
    if not joined.startswith("../"):
        return None  # inside docs/: mkdocs checks it
    path = (docs_dir / joined).resolve()
    try:
        relative = path.relative_to(root)
    except ValueError:
        return None  # outside the repository: left for mkdocs to report
    if not (path.is_file() or path.is_dir()):
        return None
    return relative.as_posix(), path.is_dir()


def _root(config) -> Path:
    return Path(config.config_file_path).resolve().parent


def on_files(files, config):
    docs_dir, root = Path(config.docs_dir).resolve(), _root(config)
    for page in sorted(docs_dir.rglob("*.md")):
        page_uri = page.relative_to(docs_dir).as_posix()
        for link in LINK.finditer(page.read_text(encoding="utf-8")):
            found = _repo_path(page_uri, link.group(2), docs_dir, root)
            if found and not found[1] and files.get_file_from_path(f"{PREFIX}/{found[0]}") is None:
                files.append(File.generated(config, f"{PREFIX}/{found[0]}", abs_src_path=str(root / found[0])))
    return files


def on_page_markdown(markdown, page, config, files):
    docs_dir, root = Path(config.docs_dir).resolve(), _root(config)
    page_uri = page.file.src_uri

    def pointed_into_site(link: re.Match) -> str:
        found = _repo_path(page_uri, link.group(2), docs_dir, root)
        if found is None:
            return link.group(0)
        path, is_dir = found
        if is_dir:
            return f"{link.group(1)} (`{path}/` in the repository)"
        target = posixpath.relpath(f"{PREFIX}/{path}", posixpath.dirname(page_uri) or ".")
        return f"[{link.group(1)}]({target}{link.group(3) or ''})"

    return LINK.sub(pointed_into_site, markdown)
