"""An org rebuilt from what Postgres holds: its snapshot and the journal tail after it.

One path for every reader of stored orgs (a shard's load, its parity and views, and
`metergate check`), so a change of the stored formats reaches all of them at once.
"""

from __future__ import annotations

from actors import commands as cmd
from actors.formats import decode_snapshot  # (formats) every snapshot format, upcast to the current one
from actors.org import OrgBillingActor
from config.catalog import Catalog


def rebuilt_org(state: bytes, entries: list[bytes], catalog: Catalog) -> OrgBillingActor:
    """The org a snapshot and its journal tail (in seq order) hold; raises what decoding,
    replay or the core's invariants raise."""
    snap = decode_snapshot(state)
    org = OrgBillingActor.from_snapshot(snap, catalog)
    for entry in entries:
        cmd.replay(org, cmd.JOURNAL_DECODER.decode(entry), catalog)
    org.check_invariants()
    return org
