"""Replicas behind a real load balancer: two `steer-server serve` processes of a tiny model share
one real redis-server store, behind a real nginx running the shipped config.

- a vector created through one replica is usable through every replica (and the balancer) at
  once, with the same steered output everywhere;
- a tenant's quotas hold across the replicas (counted in the shared Redis): its vectors, its
  capture tokens a minute and its steered requests in flight, whichever replica takes them;
- killing a replica (SIGKILL, its whole process group) in the middle of a load of vector
  writes and steered requests through nginx loses no vector, fails no request (nginx retries
  on the other replica, and marks the dead one down), and the other replica keeps serving.

The processes are shared by the module; the kill comes last.
"""
from __future__ import annotations

import os
import signal
import threading
import uuid
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor, wait
from dataclasses import dataclass

import httpx
import pytest
import redis
from fleet_processes import (
    ServerProcess,
    after_the_slot_returns,
    free_port,
    held_body,
    nginx_config,
    start_nginx,
    start_tiny_server,
    stop,
    stream_held_open,
)
from models import make_tiny_llama

pytestmark = pytest.mark.slow

ADMIN_KEY = "admin-" + uuid.uuid4().hex
QUOTA_KEY = "quota-admin-" + uuid.uuid4().hex  # tenant team-q's, with QUOTAS
QUOTAS = {"vectors": 2, "capture_tokens_per_minute": 40, "steered_in_flight": 1}
REDIS_DB = 3  # the session's redis-server is shared: this module owns db 3 and empties it first
PROMPT = "The old harbour town was quiet in the early morning"


@dataclass
class Fleet:
    replicas: list[ServerProcess]
    balancer: str  # nginx's URL
    store: str


@pytest.fixture(scope="module")
def fleet(redis_server: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Fleet]:
    store = redis_server.rsplit("/", 1)[0] + f"/{REDIS_DB}"
    redis.Redis.from_url(store).flushdb()
    model = make_tiny_llama(tmp_path_factory.mktemp("replicas-tiny") / "llama")
    keys = tmp_path_factory.mktemp("replicas-keys") / "keys"
    keys.write_text(f"admin {ADMIN_KEY}\nadmin {QUOTA_KEY} team-q\n")
    quotas = keys.with_name("quotas")
    quotas.write_text("team-q " + " ".join(f"{quota}={limit}" for quota, limit in QUOTAS.items()) + "\n")
    replicas: list[ServerProcess] = []
    nginx = None
    workdirs = [tmp_path_factory.mktemp(f"replica-{index}") for index in range(2)]
    # Both replicas start at once: each start is mostly one process at a time on one core, so two
    # overlap. The pool's threads live until the replicas are stopped: a server is spawned with
    # PR_SET_PDEATHSIG, which fires when the *thread* that spawned it exits.
    pool = ThreadPoolExecutor(2)
    try:
        starts = [pool.submit(start_tiny_server, model, workdir, store,
                              ["--api-keys-file", str(keys), "--quotas-file", str(quotas)])
                  for workdir in workdirs]
        wait(starts)
        replicas.extend(start.result() for start in starts if start.exception() is None)
        for start in starts:
            if start.exception() is not None:
                raise start.exception()
        port = free_port()
        balancer = f"http://127.0.0.1:{port}"
        config = nginx_config(tmp_path_factory.mktemp("nginx"), [r.url.removeprefix("http://") for r in replicas], port)
        nginx = start_nginx(config, balancer)
        yield Fleet(replicas, balancer, store)
    finally:
        if nginx is not None:
            stop(nginx)
        for replica in replicas:
            stop(replica)
        pool.shutdown()


def _client(url: str, key: str = ADMIN_KEY) -> httpx.Client:
    return httpx.Client(base_url=url, headers={"Authorization": f"Bearer {key}"}, timeout=120)


def _steered_text(url: str, vector: str) -> str:
    with _client(url) as http:
        response = http.post("/v1/completions", json={
            "model": "tiny", "prompt": PROMPT, "max_tokens": 8, "temperature": 0,
            "steering": {"additions": [{"vector": vector, "coeff": 1.0}]}})
        assert response.status_code == 200, f"{url}: {response.text}"
        return response.json()["choices"][0]["text"]


def test_a_vector_created_through_one_replica_is_used_through_every_replica(fleet):
    name = f"love-{uuid.uuid4().hex[:8]}"
    first, second = fleet.replicas
    with _client(first.url) as http:  # computed through the first replica's engine
        created = http.post("/v1/steering/vectors", json={
            "name": name, "layer": 1, "additions": [{"prompt": "Love", "coeff": 6}, {"prompt": "Hate", "coeff": -6}]})
        assert created.status_code == 201, created.text
    with _client(second.url) as http:
        assert http.get(f"/v1/steering/vectors/{name}").json()["id"] == created.json()["id"]

    with _client(fleet.balancer) as http:
        unsteered = http.post("/v1/completions", json={"model": "tiny", "prompt": PROMPT, "max_tokens": 8,
                                                       "temperature": 0}).json()["choices"][0]["text"]
    texts = {url: _steered_text(url, name) for url in (first.url, second.url, fleet.balancer)}
    assert len(set(texts.values())) == 1, texts
    assert texts[first.url] != unsteered


def test_vectors_created_through_the_balancer_are_on_every_replica(fleet):
    names = [f"lb-{uuid.uuid4().hex[:8]}" for _ in range(4)]
    ids = {}
    with _client(fleet.balancer) as http:
        for i, name in enumerate(names):
            response = http.post("/v1/steering/vectors", json=_upload(name, seed=i))
            assert response.status_code == 201, response.text
            ids[name] = response.json()["id"]
    for replica in fleet.replicas:
        with _client(replica.url) as http:
            listed = {n: v["id"] for v in http.get("/v1/steering/vectors").json()["data"] for n in v["names"]}
            assert {n: listed.get(n) for n in names} == ids


def _upload(name: str, seed: int) -> dict:
    return {"name": name, "layers": {"2": [((seed * 31 + i * 7) % 13 - 6) / 60 for i in range(128)]}}


def test_a_tenants_quotas_hold_across_replicas(fleet):
    """Each quota reached through one replica holds on the other: the counts are in Redis."""
    one, two = (_client(replica.url, QUOTA_KEY) for replica in fleet.replicas)

    def quota_of(response: httpx.Response) -> str:
        assert response.status_code == 429, response.text
        return response.json()["error"]["message"].split("'")[1]

    # Capture tokens: pair computations alternate replicas until the minute's 40 are spent.
    refused = None
    for attempt in range(6):
        words = " ".join(f"w{uuid.uuid4().hex[:5]}" for _ in range(3))
        response = (one, two)[attempt % 2].post("/v1/steering/vectors", json={
            "layer": 2, "pairs": [{"positive": f"Calm {words}", "negative": f"Angry {words}"}]})
        if response.status_code == 429:
            refused = response
            break
        assert response.status_code == 201, response.text
        assert one.delete(f"/v1/steering/vectors/{response.json()['id']}").status_code == 200
    assert refused is not None and quota_of(refused) == "capture_tokens_per_minute"
    assert 1 <= int(refused.headers["retry-after"]) <= 60
    # Vectors: one stored through each replica fills the quota of 2, for both.
    for http, seed in ((one, 1), (two, 2)):
        rows = [[0.01 * ((i * seed) % 13) for i in range(128)]]
        assert http.post("/v1/steering/vectors", json={"name": f"q{seed}", "layers": {"2": rows}}).status_code == 201
    for http in (one, two):
        third = http.post("/v1/steering/vectors", json={"name": "q3", "layers": {"2": [[0.5] * 128]}})
        assert quota_of(third) == "vectors"
    # Steered requests in flight: one held open on the first replica refuses the next on the second.
    steering = {"additions": [{"vector": "q1", "coeff": 1.0}]}
    for _ in range(3):
        with stream_held_open(one, held_body("tiny", PROMPT, steering)) as status:
            assert status == 200
            second = two.post("/v1/completions", json={"model": "tiny", "prompt": PROMPT, "max_tokens": 2,
                                                       "steering": steering})
            unsteered = two.post("/v1/completions", json={"model": "tiny", "prompt": PROMPT, "max_tokens": 2})
            assert unsteered.status_code == 200
        if second.status_code == 429:
            break
        assert second.status_code == 200, second.text
    assert quota_of(second) == "steered_in_flight"
    after = after_the_slot_returns(lambda: two.post("/v1/completions", json={
        "model": "tiny", "prompt": PROMPT, "max_tokens": 2, "steering": steering}))
    assert after.status_code == 200, after.text
    one.close()
    two.close()


def test_killing_a_replica_mid_load_loses_no_vector(fleet):
    doomed, survivor = fleet.replicas
    jobs, kill_after = 32, 8
    done = threading.Semaphore(0)
    results: list[tuple[str, str, int, str]] = []  # (name, id, status of the steered request, its text)

    def job(index: int) -> None:
        """Through nginx: create a vector (an upload, or prompts computed by whichever replica
        answers), then steer with it."""
        name = f"load-{index}-{uuid.uuid4().hex[:6]}"
        body = _upload(name, seed=index) if index % 2 else {
            "name": name, "layer": 1, "additions": [{"prompt": f"Word {index}", "coeff": 2}]}
        try:
            with _client(fleet.balancer) as http:
                created = http.post("/v1/steering/vectors", json=body)
                assert created.status_code == 201, f"create {name}: {created.status_code} {created.text}"
                steered = http.post("/v1/completions", json={
                    "model": "tiny", "prompt": PROMPT, "max_tokens": 4, "steering": {
                        "mode": "constant" if index % 2 else "actadd", "additions": [{"vector": name, "coeff": 1.0}]}})
                results.append((name, created.json()["id"], steered.status_code, steered.text))
        finally:
            done.release()

    with ThreadPoolExecutor(4) as pool:
        futures = [pool.submit(job, i) for i in range(jobs)]
        for _ in range(kill_after):
            done.acquire()
        os.killpg(doomed.process.pid, signal.SIGKILL)  # the whole replica: API server, engine, worker
        for future in futures:
            future.result()  # re-raises a job's failed assertion

    assert doomed.process.wait(timeout=30) == -signal.SIGKILL
    assert len(results) == jobs
    assert [r for r in results if r[2] != 200] == []
    doomed_log = doomed.log.read_text(errors="replace")
    assert "POST /v1/steering/vectors" in doomed_log, "the killed replica served none of the load"

    # Every vector created through the balancer, before and after the kill, is there and usable.
    with _client(survivor.url) as http:
        listed = {n: v["id"] for v in http.get("/v1/steering/vectors").json()["data"] for n in v["names"]}
    assert {name: listed.get(name) for name, _, _, _ in results} == {name: cid for name, cid, _, _ in results}
    for name, _, _, _ in results[:: jobs // 4]:
        assert _steered_text(survivor.url, name)
        assert _steered_text(fleet.balancer, name)
