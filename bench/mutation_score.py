"""The mutation score of the pure money core, from the last `mutmut run` (`make mutation`).

Reads mutmut's results (mutants/actors/*.py.meta) and prints, per module, the mutants
killed (a test failed, or it ran past its time: a loop that never ends is caught too), the
ones that survived (no test noticed), and the score: killed / (killed + survived).
`mutmut results` lists the survivors and `mutmut show <name>` shows one.
Run: .venv/bin/python -m bench.mutation_score
"""

from __future__ import annotations

import json
import sys
from collections import Counter
from pathlib import Path

from mutmut.stats import status_by_exit_code

CAUGHT = ("killed", "timeout", "caught by type check", "segfault")


def main() -> int:
    metas = sorted(Path("mutants").glob("actors/*.py.meta"))
    if not metas:
        print("no mutmut results: run `make mutation` first", file=sys.stderr)
        return 1
    total: Counter = Counter()
    print(f"{'module':24} {'mutants':>8} {'killed':>8} {'survived':>9} {'score':>7}")
    for meta in metas:
        codes = json.loads(meta.read_text())["exit_code_by_key"]
        statuses = Counter(status_by_exit_code[code] for code in codes.values())
        killed = sum(statuses[s] for s in CAUGHT)
        survived = statuses["survived"]
        total.update(statuses)
        module = meta.name.removesuffix(".meta")
        score = killed / (killed + survived) if killed + survived else 1.0
        print(f"{module:24} {len(codes):>8} {killed:>8} {survived:>9} {score:>7.1%}")
    killed = sum(total[s] for s in CAUGHT)
    survived = total["survived"]
    others = {s: n for s, n in total.items() if s not in CAUGHT + ("survived",)}
    print(f"{'all':24} {sum(total.values()):>8} {killed:>8} {survived:>9} {killed / max(1, killed + survived):>7.1%}"
          + (f"   (not counted: {others})" if others else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
