"""Path parameters shared by the routes: ids are validated in paths as in bodies."""

from __future__ import annotations

from typing import Annotated

from fastapi import Path

from actors.ticks import ID_PATTERN

OrgPath = Annotated[str, Path(min_length=1, max_length=128, pattern=ID_PATTERN)]
LeasePath = Annotated[str, Path(min_length=1, max_length=128, pattern=ID_PATTERN)]
MessagePath = Annotated[str, Path(pattern=r"^msg_[0-9a-f]{1,32}$")]
