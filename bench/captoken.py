"""Capability-token verification in Python (metergate_client/captoken.py Verifier), on this host.

Three figures, each the median of ROUNDS rounds, printed as tokens verified per second:
- signature: every token new to the verifier (cache off), so each pays one Ed25519
  verification in `cryptography` plus decoding: what a cell pays the first time it sees a token;
- remembered: the same tokens again (the verifier's cache of tokens it checked, each until its
  expiry): a dict lookup and the expiry, org and action checks;
- with requires(): the remembered path plus the resources check a cell makes before a create.
The tokens are lease tokens of DISTINCT orgs, signed here with a test key; a cell sees a token
once per create and each retry, so real traffic is a mix of the first two figures.

Run (no service needed):  .venv/bin/python -m bench.captoken [--rounds 5] [--tokens 20000]
"""

from __future__ import annotations

import argparse
import statistics
import time

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from metergate_client.captoken import Claims, Grant, Verifier, public_jwk, sign
from metergate_client.decision import Resources

TARGET_PER_S = 50_000  # issue 21


def tokens(count: int, now_s: int) -> tuple[dict, list[tuple[str, str]]]:
    key = Ed25519PrivateKey.generate()
    grant = Grant(memory_mb=4096, cpu_count=2, disk_mb=10_240, machine_type="n2-standard-4", region="us-central1")
    made = [(f"org_{i}", sign(key, Claims(f"org_{i}", "create", now_s, now_s + 3600, grant, f"lease_{i}")))
            for i in range(count)]
    return {"keys": [public_jwk(key.public_key())]}, made


def rate(verifier: Verifier, made: list[tuple[str, str]], asked: Resources | None) -> float:
    started = time.perf_counter()
    for org_id, token in made:
        capability = verifier.verify(token, org_id, "create")
        if asked is not None:
            capability.requires(asked)
    return len(made) / (time.perf_counter() - started)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--tokens", type=int, default=20_000)
    args = parser.parse_args()
    key_set, made = tokens(args.tokens, int(time.time()))
    asked = Resources(memory_mb=2048, cpu_count=1, machine_type="n2-standard-4")
    signature, remembered, required = [], [], []
    for _ in range(args.rounds):
        signature.append(rate(Verifier(key_set, cache_size=0), made, None))
        warm = Verifier(key_set, cache_size=args.tokens)
        rate(warm, made, None)
        remembered.append(rate(warm, made, None))
        required.append(rate(warm, made, asked))
    print(f"capability tokens verified per second ({args.tokens} tokens, median of {args.rounds} rounds; "
          f"target {TARGET_PER_S:,}):")
    for name, figures in (("signature (first sight)", signature), ("remembered", remembered),
                          ("remembered + requires()", required)):
        median = statistics.median(figures)
        print(f"  {name:26} {median:>12,.0f}/s   {'meets' if median >= TARGET_PER_S else 'below'} the target"
              f"   (rounds: {', '.join(f'{f:,.0f}' for f in figures)})")


if __name__ == "__main__":
    main()
