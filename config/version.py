"""What version of metergate this is, as the parts of a running service compare it.

Three numbers (docs/operations/upgrades.md):
- RELEASE: the package's version, for people;
- WIRE_VERSION: changes whenever a message between the ingress, the shards and the scheduler
  changes (an actor method's arguments or answer, a view record, a command's encoding), so
  that parts of two releases never talk;
- the schema version: the highest migration number this code has; the code of one schema
  version may not run against a database migrated by another.

A shard and the scheduler report this in `ready()`; the start and the ingress refuse a part
whose wire or schema version is not theirs (compatible() says why).
"""

from __future__ import annotations

from importlib import metadata

from config.settings import PROJECT_DIR, Settings

WIRE_VERSION = 1
MIGRATIONS_DIR = PROJECT_DIR / "storage" / "migrations"

try:
    RELEASE = metadata.version("metergate")
except metadata.PackageNotFoundError:  # run from a source tree that was never installed
    RELEASE = "unknown"


def schema_version() -> int:
    """The highest migration number this code has (read from the file names: config imports
    no storage)."""
    return max(int(path.name.split("_", 1)[0]) for path in MIGRATIONS_DIR.glob("[0-9]*_*.sql"))


def this_version(settings: Settings | None = None) -> dict:
    """{"release", "wire", "schema"} of this code; `settings.test_wire_version` stands in for
    the wire version (tests make a shard of another version with it)."""
    wire = settings.test_wire_version if settings is not None and settings.test_wire_version else WIRE_VERSION
    return {"release": RELEASE, "wire": wire, "schema": schema_version()}


def describe(version: dict | None) -> str:
    if not version:
        return "a metergate from before version reports"
    return f"metergate {version.get('release')} (wire {version.get('wire')}, schema {version.get('schema')})"


def incompatibility(theirs: dict | None, ours: dict) -> str | None:
    """Why a part reporting `theirs` may not work with this code (None: it may). The release
    alone may differ: a fix that changes neither messages nor schema may roll part by part."""
    if not theirs or theirs.get("wire") != ours["wire"]:
        return f"it runs {describe(theirs)}, which speaks another wire version than {describe(ours)}"
    if theirs.get("schema") != ours["schema"]:
        return f"it runs {describe(theirs)}, made for another schema than {describe(ours)}"
    return None
