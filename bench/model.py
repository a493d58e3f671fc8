"""The differential test of issue 17 for as long as asked: the engine against the independent
reference model (tests/model/), in rounds of Hypothesis examples, each round with its own seed.

Prints every round's seed, and at the end the examples and steps run, steps per minute, and
the divergences found (0, or the exit code is 1, with the seed and the shrunk example of the
first). A divergence is replayed by its seed: --seed S --minutes 0.
Run: .venv/bin/python -m bench.model [--minutes 10] [--seed S] [--steps 50]
"""

from __future__ import annotations

import argparse
import random
import sys
import time

from hypothesis import HealthCheck, Phase, seed, settings
from hypothesis.stateful import run_state_machine_as_test

from tests.differential import Pair
from tests.test_differential import EngineAgainstModel

EXAMPLES_PER_ROUND = 100


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--minutes", type=float, default=10.0)
    parser.add_argument("--seed", type=int, default=None, help="the first round's seed (random if not given)")
    parser.add_argument("--steps", type=int, default=50, help="steps per example")
    args = parser.parse_args()
    first = args.seed if args.seed is not None else random.SystemRandom().randrange(2**32)
    budget = settings(max_examples=EXAMPLES_PER_ROUND, stateful_step_count=args.steps, deadline=None,
                      database=None, suppress_health_check=list(HealthCheck),
                      phases=[Phase.generate, Phase.shrink])
    started = time.monotonic()
    rounds = examples = 0
    while rounds == 0 or time.monotonic() - started < args.minutes * 60:
        round_seed = first + rounds
        print(f"model: round {rounds + 1}, seed {round_seed}", flush=True)
        try:
            run_state_machine_as_test(seed(round_seed)(EngineAgainstModel), settings=budget)
        except AssertionError as divergence:
            steps = "\n".join(getattr(divergence, "__notes__", []))  # the shrunk example, step by step
            print(f"model: DIVERGENCE with seed {round_seed}:\n{divergence}\n{steps}", flush=True)
            return report(started, rounds + 1, examples, 1)
        rounds += 1
        examples += EXAMPLES_PER_ROUND
    return report(started, rounds, examples, 0)


def report(started: float, rounds: int, examples: int, divergences: int) -> int:
    minutes = (time.monotonic() - started) / 60
    steps = Pair.total_steps
    print(f"model: {rounds} rounds, {examples:,} examples, {steps:,} steps in {minutes:.1f} min "
          f"({steps / max(minutes, 1e-9):,.0f} steps/min, {examples / max(minutes, 1e-9):,.0f} examples/min); "
          f"divergences {divergences}")
    return 1 if divergences else 0


if __name__ == "__main__":
    sys.exit(main())
