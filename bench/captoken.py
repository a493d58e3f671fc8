"""Capability-token verification in Python (metergate_client/captoken.py Verifier), on this host.

Figures in tokens per second, each the median of ROUNDS rounds; every round measures every
figure once, one after the other, so a slower or busier moment of the host weighs on all alike:
- raw Ed25519, per library: the library's verify alone on the tokens' signed bytes, signature
  and key already decoded: the floor a verifier in Python cannot go below;
- first sight, per library: Verifier.verify of tokens new to it (cache off): decoding, the
  checks, one Ed25519 verification; and its ratio to the library's raw rate (1.0: no
  overhead of ours);
- remembered: the same tokens again (the verifier's cache of tokens it checked, each until its
  expiry): a dict lookup and the expiry, org and action checks; and with requires(), the
  resources check a cell makes before a create;
- verify_many over a process pool of os.cpu_count() workers, first sight (the default library):
  the tokens sent in chunks, each worker's own Verifier verifying its chunks and answering how
  many verified; the pool started before timing; its ratio to one process's first-sight rate.
The tokens are lease tokens of DISTINCT orgs, signed here with a test key; a cell sees a token
once per create and each retry, so real traffic is a mix of first sight and remembered.

Run (no service needed):  .venv/bin/python -m bench.captoken [--rounds 5] [--tokens 20000]
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
from concurrent.futures import ProcessPoolExecutor

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from metergate_client.captoken import (
    BACKENDS, DEFAULT_BACKEND, Capability, Claims, Grant, Verifier, keys_of, public_jwk, sign, unb64)
from metergate_client.decision import Resources

TARGET_PER_S = 50_000  # issue 21
CHUNKS_PER_WORKER = 8


def tokens(count: int, now_s: int) -> tuple[dict, list[tuple[str, str]]]:
    key = Ed25519PrivateKey.generate()
    grant = Grant(memory_mb=4096, cpu_count=2, disk_mb=10_240, machine_type="n2-standard-4", region="us-central1")
    made = [(f"org_{i}", sign(key, Claims(f"org_{i}", "create", now_s, now_s + 3600, grant, f"lease_{i}")))
            for i in range(count)]
    return {"keys": [public_jwk(key.public_key())]}, made


def raw_rate(backend: str, public: bytes, made: list[tuple[str, str]]) -> float:
    """The library alone: each token's signature over its first two parts, decoded beforehand."""
    signed = [(unb64(token.rsplit(".", 1)[1]), token.rsplit(".", 1)[0].encode()) for _, token in made]
    if backend == "libsodium":
        from nacl.bindings import crypto_sign_open  # the call the libsodium backend makes

        started = time.perf_counter()
        for signature, message in signed:
            crypto_sign_open(signature + message, public)
    else:
        key = Ed25519PublicKey.from_public_bytes(public)
        started = time.perf_counter()
        for signature, message in signed:
            key.verify(signature, message)
    return len(signed) / (time.perf_counter() - started)


def rate(verifier: Verifier, made: list[tuple[str, str]], asked: Resources | None) -> float:
    started = time.perf_counter()
    for org_id, token in made:
        capability = verifier.verify(token, org_id, "create")
        if asked is not None:
            capability.requires(asked)
    return len(made) / (time.perf_counter() - started)


_worker_verifier: Verifier | None = None


def _start_worker(key_set: dict) -> None:
    global _worker_verifier
    _worker_verifier = Verifier(key_set, cache_size=0)


def _verified_count(chunk: list[tuple[str, str]]) -> int:
    answers = _worker_verifier.verify_many((token, org_id, "create") for org_id, token in chunk)
    return sum(isinstance(answer, Capability) for answer in answers)


def pool_rate(pool: ProcessPoolExecutor, workers: int, made: list[tuple[str, str]]) -> float:
    size = max(1, len(made) // (workers * CHUNKS_PER_WORKER))
    chunks = [made[i:i + size] for i in range(0, len(made), size)]
    started = time.perf_counter()
    verified = sum(pool.map(_verified_count, chunks))
    elapsed = time.perf_counter() - started
    assert verified == len(made), f"{verified} of {len(made)} verified"
    return len(made) / elapsed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--tokens", type=int, default=20_000)
    args = parser.parse_args()
    key_set, made = tokens(args.tokens, int(time.time()))
    (public,) = keys_of(key_set).values()
    asked = Resources(memory_mb=2048, cpu_count=1, machine_type="n2-standard-4")
    backends = sorted(BACKENDS, key=lambda name: name != DEFAULT_BACKEND)  # the default first
    workers = os.cpu_count() or 1
    figures: dict[str, list[float]] = {}

    def add(name: str, value: float) -> None:
        figures.setdefault(name, []).append(value)

    with ProcessPoolExecutor(workers, initializer=_start_worker, initargs=(key_set,)) as pool:
        pool_rate(pool, workers, made[:workers * CHUNKS_PER_WORKER])  # every worker started and warm
        for _ in range(args.rounds):
            for backend in backends:
                add(f"raw {backend}", raw_rate(backend, public, made))
                add(f"first {backend}", rate(Verifier(key_set, cache_size=0, backend=backend), made, None))
            warm = Verifier(key_set, cache_size=args.tokens)
            rate(warm, made, None)
            add("remembered", rate(warm, made, None))
            add("required", rate(warm, made, asked))
            add("pool", pool_rate(pool, workers, made))

    median = {name: statistics.median(values) for name, values in figures.items()}
    print(f"capability tokens verified per second ({args.tokens:,} tokens, median of {args.rounds} interleaved "
          f"rounds; {workers} CPUs; target {TARGET_PER_S:,}):")

    def line(label: str, name: str, note: str = "") -> None:
        meets = "meets" if median[name] >= TARGET_PER_S else "below"
        rounds = ", ".join(f"{value:,.0f}" for value in figures[name])
        print(f"  {label:54} {median[name]:>11,.0f}/s  {meets} the target  {note:36} (rounds: {rounds})")

    for backend in backends:
        line(f"raw Ed25519 verify, {backend}", f"raw {backend}")
    for backend in backends:
        ratio = median[f"first {backend}"] / median[f"raw {backend}"]
        line(f"Verifier, first sight, {backend}", f"first {backend}", f"{ratio:.2f} of the raw rate")
    line("Verifier, remembered", "remembered")
    line("Verifier, remembered + requires()", "required")
    ratio = median["pool"] / median[f"first {DEFAULT_BACKEND}"]
    line(f"verify_many, {workers} processes, first sight, {DEFAULT_BACKEND}", "pool",
         f"{ratio:.2f} x one process's first sight")


if __name__ == "__main__":
    main()
