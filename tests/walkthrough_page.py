"""The walkthrough page (docs/getting-started/walkthrough.md) as steps a test can run: each
```console block holds commands (`$ ` prompts) and the output printed under each.

A command is its `$ ` line, the lines after one that ends in a backslash, and the lines of a
here-document it opens (`<<EOF` up to the line `EOF`). Everything else up to the next `$ `
line or the end of the block is its output. An output is read as a sequence of JSON values
(where a line starts with `{` or `[`) and plain lines; JSON is compared as data, with the
values that differ from run to run (VARYING) only required to be there and of the same kind,
and plain lines are compared as text.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass

# What differs between two runs of the same walkthrough, by the end of its path in the JSON:
# times (creation, expiry, period end), the month's period key, the ledger's random entry
# ids, how old a gate's view was, and the view counters of the shard (its epoch and
# sequence number count the service's whole history, not the walkthrough's). Everything
# else, every *_micros amount included, must be equal.
VARYING: frozenset[tuple[str, ...]] = frozenset({
    ("created_at",), ("expires_at",), ("resets_at",), ("valid_until_us",),
    ("period", "key"), ("entry_id",), ("age_ms",),
    ("gate_view", "epoch"), ("gate_view", "seq"), ("capability_token",),
})

_HEREDOC = re.compile(r"<<-?\s*(['\"]?)([A-Za-z_][A-Za-z0-9_]*)\1")
_FENCE = re.compile(r"^```console\s*$")


@dataclass(frozen=True)
class Step:
    line: int  # of its `$ ` prompt on the page, 1-based
    command: str
    output: str


def steps_of(page: str) -> list[Step]:
    """Every command of the page's console blocks, in order, with the output shown under it."""
    steps: list[Step] = []
    lines = page.splitlines()
    index = 0
    while index < len(lines):
        if _FENCE.match(lines[index]):
            end = next((j for j in range(index + 1, len(lines)) if lines[j].startswith("```")), None)
            assert end is not None, f"line {index + 1}: a console block that is never closed"
            steps += _block_steps(lines[index + 1:end], index + 2)
            index = end
        index += 1
    return steps


def _block_steps(block: list[str], first_line: int) -> list[Step]:
    steps: list[Step] = []
    index = 0
    assert not block or block[0].startswith("$ "), f"line {first_line}: a console block must start with `$ `"
    while index < len(block):
        start = index
        command = [block[index][2:]]
        terminator = None
        while True:
            current = command[-1]
            found = _HEREDOC.search(current) if terminator is None else None
            if found:
                terminator = found.group(2)
            if terminator is not None:
                index += 1
                assert index < len(block), f"line {first_line + start}: here-document {terminator} never ends"
                command.append(block[index])
                if block[index] == terminator:
                    terminator = None
                    if not command[-1].endswith("\\"):
                        break
                continue
            if current.endswith("\\"):
                index += 1
                assert index < len(block), f"line {first_line + start}: a continued command never ends"
                command.append(block[index])
                continue
            break
        index += 1
        output_start = index
        while index < len(block) and not block[index].startswith("$ "):
            index += 1
        steps.append(Step(first_line + start, "\n".join(command), "\n".join(block[output_start:index])))
    return steps


def items_of(output: str) -> list[object]:
    """An output as JSON values and plain lines (kept as str wrapped in a tuple: ("text",))."""
    items: list[object] = []
    decoder = json.JSONDecoder()
    position = 0
    text = output.rstrip()
    while position < len(text):
        while position < len(text) and text[position] in " \t\r\n":
            position += 1
        if position >= len(text):
            break
        if text[position] in "{[":
            value, position = decoder.raw_decode(text, position)
            items.append(value)
        else:
            end = text.find("\n", position)
            end = len(text) if end < 0 else end
            items.append((text[position:end].rstrip(),))
            position = end
    return items


def differences(shown: object, answered: object, path: tuple[str, ...] = ()) -> list[str]:
    """Where the service's answer differs from what the page shows; [] when they agree."""
    where = "$" + "".join(f".{part}" for part in path)
    if any(path[-len(varying):] == varying for varying in VARYING if len(path) >= len(varying)):
        if (shown is None) != (answered is None) or type(shown) is not type(answered):
            return [f"{where}: page shows {shown!r}, service answered {answered!r} (varies, but not its kind)"]
        return []
    if isinstance(shown, dict) and isinstance(answered, dict):
        found = []
        for key in shown.keys() - answered.keys():
            found.append(f"{where}.{key}: on the page, not in the answer")
        for key in answered.keys() - shown.keys():
            found.append(f"{where}.{key}: in the answer ({answered[key]!r}), not on the page")
        for key in shown.keys() & answered.keys():
            found += differences(shown[key], answered[key], (*path, key))
        return found
    if isinstance(shown, list) and isinstance(answered, list):
        if len(shown) != len(answered):
            return [f"{where}: page shows {len(shown)} items, service answered {len(answered)}: {answered!r}"]
        return [d for i, (s, a) in enumerate(zip(shown, answered)) for d in differences(s, a, (*path, str(i)))]
    if type(shown) is not type(answered) or shown != answered:
        return [f"{where}: page shows {shown!r}, service answered {answered!r}"]
    return []


def output_differences(shown: str, answered: str) -> list[str]:
    """`differences` over whole outputs: the same sequence of JSON values and plain lines."""
    try:
        answered_items = items_of(answered)
    except json.JSONDecodeError as exc:
        return [f"the answer is not the JSON it looks like ({exc}): {answered!r}"]
    shown_items = items_of(shown)
    if len(shown_items) != len(answered_items):
        return [f"page shows {len(shown_items)} values or lines, the command printed {len(answered_items)}:\n"
                f"{answered}"]
    found = []
    for number, (s, a) in enumerate(zip(shown_items, answered_items), 1):
        if isinstance(s, tuple) or isinstance(a, tuple):
            if s != a:
                found.append(f"item {number}: page shows {s!r}, the command printed {a!r}")
        else:
            found += differences(s, a)
    return found
