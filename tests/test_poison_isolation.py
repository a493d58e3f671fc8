"""One tenant's bad request never fails another's: a group commit that an item breaks commits
every other item, and the guilty one alone gets a 4xx.

The edge now refuses what Postgres cannot store, so the poison here is handed to the shard
actors directly (the same Ray calls the ingress makes), which is what a future gap in edge
validation would look like: it reaches the commit.
"""

from __future__ import annotations

import threading
import uuid
from concurrent.futures import ThreadPoolExecutor

import ray

from actors import commands as cmd
from actors.clock import now_us
from actors.placement import NAMESPACE, shard_name, slot_of
from actors.refusals import Refusal
from actors.ticks import TICKS_ENCODER, Tick
from serve_app.errors import STATUS_BY_REFUSAL
from tests.helpers import SIGNUP_MICROS, hour_tick, ledger_sum

ORGS = 20
VALID_REQUESTS = 200
POISON_ROUNDS = 40


def shard(service, k: int):
    return ray.get_actor(shard_name(k), namespace=NAMESPACE)


def isolations(service) -> int:
    return sum(ray.get(shard(service, k).stats.remote())["isolations"] for k in range(service.settings.shards))


def test_poison_in_a_group_commit_fails_only_itself(service, admin, sql, new_org, org_id_on):
    orgs = [new_org() for _ in range(ORGS)]
    victims = {k: new_org(org_id=org_id_on(k)) for k in range(service.settings.shards)}  # the poison's own orgs
    before = isolations(service)
    statuses: list[int] = []
    poison_answers: list[dict] = []
    stop = threading.Event()

    def valid(n: int) -> None:
        org = orgs[n % ORGS]
        response = admin.post(f"/v1/orgs/{org}/credits", json={"kind": "grant", "amount_micros": 1_000 + n,
                                                              "note": f"valid {n}"})
        statuses.append(response.status_code)

    def poison() -> None:
        # NUL in a note: Postgres refuses it at commit (CharacterNotInRepertoire), on every shard.
        for _ in range(POISON_ROUNDS):
            if stop.is_set():
                return
            for k, victim in victims.items():
                refs = [shard(service, k).submit.remote([(victim, cmd.Credit("grant", 7, None, "bad\x00note"), None)])
                        for _ in range(3)]
                poison_answers.extend(answer for batch in ray.get(refs) for answer in batch)

    poisoner = threading.Thread(target=poison)
    poisoner.start()
    with ThreadPoolExecutor(max_workers=24) as pool:
        list(pool.map(valid, range(VALID_REQUESTS)))
    stop.set()
    poisoner.join(120)

    assert statuses.count(201) == VALID_REQUESTS, sorted(set(statuses))
    assert poison_answers and all(a["error"]["code"] == "unstorable_input" for a in poison_answers), poison_answers[:3]
    assert STATUS_BY_REFUSAL[Refusal.UNSTORABLE_INPUT] == 422  # what the edge answers for it
    assert isolations(service) > before, "the poison never shared a commit with valid requests"
    for index, org in enumerate(orgs):
        granted = sum(1_000 + n for n in range(VALID_REQUESTS) if n % ORGS == index)
        assert ledger_sum(sql, org) == SIGNUP_MICROS + granted
        assert admin.get(f"/v1/orgs/{org}").json()["balance_micros"] == SIGNUP_MICROS + granted
    for victim in victims.values():
        assert ledger_sum(sql, victim) == SIGNUP_MICROS  # nothing of the poison was written
        assert sql.val("SELECT count(*) FROM ledger WHERE org_id = $1", victim) == 1


def test_a_poison_tick_is_rejected_alone_with_its_index_and_the_rest_of_its_batch_is_billed(service, compute, sql,
                                                                                           new_org):
    org = new_org()
    k = service.slot_map[slot_of(org)]
    now = now_us()
    ticks = [Tick(f"t{i}", org, "sbx\x00bad" if i == 5 else "sbx", now, 1_000, 1024, 1, 0, None, i)
             for i in range(12)]
    others = [new_org() for _ in range(4)]

    def neighbours() -> list[int]:
        return [compute.post("/v1/usage", json={"ticks": [hour_tick(o, f"n-{uuid.uuid4().hex[:6]}")]}).status_code
                for o in others]

    with ThreadPoolExecutor(max_workers=2) as pool:
        statuses = pool.submit(neighbours)
        answer = ray.get(shard(service, k).usage.remote(TICKS_ENCODER.encode(ticks)))
    assert statuses.result() == [200] * len(others)
    assert answer["accepted"] == 11
    assert [(r["index"], r["tick_id"], r["error"]) for r in answer["rejected"]] == [(5, "t5", "unstorable_input")]
    assert sql.val("SELECT sum(ticks)::int FROM usage_rollups WHERE org_id = $1", org) == 11
    for other in others:
        assert sql.val("SELECT sum(ticks)::int FROM usage_rollups WHERE org_id = $1", other) == 1
