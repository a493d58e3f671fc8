"""The layout of every saved struct, as tests/formats/schema.lock.json records it.

    PYTHONPATH=. .venv/bin/python tests/formats/lock.py    # record an append (refuses anything else)

Saved structs: every struct and enum reachable from the roots below (the current snapshot and
journal row, and the frozen layouts of older format versions). The rule (actors/formats.py):
a struct only ever gains fields at its end, each with a default; a union may gain members; an
enum may gain members. A struct whose tag (its format version) changed is a new version: its
old layout must stay reachable under another name (a frozen copy in actors/formats.py).
"""

from __future__ import annotations

import enum
import json
import sys
import types
import typing
from pathlib import Path

import msgspec

from actors.commands import JournalEntry
from actors.formats import OrgSnapshotV1
from actors.org import OrgSnapshot

LOCK = Path(__file__).resolve().parent / "schema.lock.json"
ROOTS = (OrgSnapshot, JournalEntry, OrgSnapshotV1)
RULE = ("a saved struct only ever gains fields at its end, each with a default (a union or an enum may gain "
        "members); anything else (remove, rename, reorder, retype, a field without a default) needs a new format "
        "version: a frozen copy of the old layout and an upcaster in actors/formats.py, and the old bytes in "
        "tests/formats/ (generate.py). See docs/operations/formats.md")


def type_of(hint) -> object:
    """A JSON form of a field's type: a name, {"union": [...]} or {"of": name, "args": [...]}."""
    if hint is type(None):
        return "None"
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        return {"union": [type_of(arg) for arg in typing.get_args(hint)]}
    if origin is not None:
        return {"of": origin.__name__, "args": [type_of(arg) for arg in typing.get_args(hint)]}
    return hint.__name__


def _named(hint) -> list[type]:
    found = [hint] if isinstance(hint, type) and issubclass(hint, (msgspec.Struct, enum.Enum)) else []
    for arg in typing.get_args(hint):
        found += _named(arg)
    return found


def schema(roots=ROOTS) -> dict:
    out: dict[str, dict] = {}
    todo = list(roots)
    while todo:
        cls = todo.pop()
        if cls.__qualname__ in out:
            continue
        if issubclass(cls, enum.Enum):
            out[cls.__qualname__] = {"enum": {member.name: member.value for member in cls}}
            continue
        hints = typing.get_type_hints(cls)
        fields = []
        for field in msgspec.structs.fields(cls):
            entry = {"name": field.name, "type": type_of(hints[field.name])}
            if field.default is not msgspec.NODEFAULT:
                entry["default"] = msgspec.to_builtins(field.default)
            elif field.default_factory is not msgspec.NODEFAULT:
                entry["default_factory"] = field.default_factory.__name__
            fields.append(entry)
            todo += _named(hints[field.name])
        config = cls.__struct_config__
        out[cls.__qualname__] = {"array_like": config.array_like, "tag": config.tag, "fields": fields}
    return dict(sorted(out.items()))


def _type_widens(old, new) -> bool:
    if old == new:
        return True
    old_members = old["union"] if isinstance(old, dict) and "union" in old else [old]
    new_members = new["union"] if isinstance(new, dict) and "union" in new else [new]
    return len(new_members) > 1 and all(member in new_members for member in old_members)


def violations(locked: dict, current: dict) -> list[str]:
    """What breaks the rule, going from the `locked` layouts to the `current` ones."""
    found = []
    for name, old in locked.items():
        new = current.get(name)
        if new is None:
            found.append(f"{name}: gone (a saved layout is never removed; keep it, or freeze it for a new version)")
            continue
        if "enum" in old:
            found += [f"{name}.{member}: was {value!r}, now {new.get('enum', {}).get(member, 'gone')!r}"
                      for member, value in old["enum"].items() if new.get("enum", {}).get(member) != value]
            continue
        if (old["array_like"], old["tag"]) != (new["array_like"], new["tag"]):
            if old["tag"] != new["tag"] and old["tag"] is not None:
                continue  # a new format version of it: its old layout is frozen under another name
            found.append(f"{name}: array_like/tag {old['array_like']}/{old['tag']!r} became "
                         f"{new['array_like']}/{new['tag']!r}")
            continue
        for position, old_field in enumerate(old["fields"]):
            new_field = new["fields"][position] if position < len(new["fields"]) else None
            if new_field is None:
                found.append(f"{name}: field {position} {old_field['name']!r} is gone")
            elif new_field["name"] != old_field["name"]:
                found.append(f"{name}: field {position} was {old_field['name']!r}, now {new_field['name']!r} "
                             "(removed, renamed or reordered)")
            elif not _type_widens(old_field["type"], new_field["type"]):
                found.append(f"{name}.{old_field['name']}: type {old_field['type']} became {new_field['type']}")
            elif {k: v for k, v in old_field.items() if k != "type"} != {k: v for k, v in new_field.items()
                                                                         if k != "type"}:
                found.append(f"{name}.{old_field['name']}: default changed ({old_field} -> {new_field})")
        for new_field in new["fields"][len(old["fields"]):]:
            if "default" not in new_field and "default_factory" not in new_field:
                found.append(f"{name}.{new_field['name']}: appended without a default (old bytes lack it)")
    return found


def main() -> None:
    current = schema()
    if LOCK.exists():
        broken = violations(json.loads(LOCK.read_text()), current)
        if broken:
            sys.exit("not recorded: " + "; ".join(broken) + "\nthe rule: " + RULE)
    LOCK.write_text(json.dumps(current, indent=1) + "\n")
    print(f"wrote {LOCK}: {len(current)} saved structs and enums")


if __name__ == "__main__":
    main()
