"""Store faults never stall or kill the engine: a real redis-server, run with the persistence
deploy/compose.yaml gives it (AOF), is paused (SIGSTOP), killed and restarted under mixed
load. Unsteered requests keep flowing, steered requests whose vectors were used before keep
working, those that need the store fail fast with a 503 naming it, and everything works again
once the store is back. Killed in the middle of a burst of creates, it keeps every vector the
server acknowledged."""
from __future__ import annotations

import os
import signal
import threading
import time
from collections import Counter

import httpx
import pytest
from api_helpers import CreateBurst, error_of
from conftest import API_KEY, start_steer_server, stop_steer_server

from models import make_tiny_llama
from redis_fixture import RedisProcess, deployed_redis_persistence, needs_redis_server
from vector_store import StoredVector, VectorMeta
from vector_store.keys import model_fingerprint
from vector_store.redis import RedisVectorStore

pytestmark = pytest.mark.slow

STORE_TIMEOUT_S = 1.0
HIDDEN = 128


@pytest.fixture(scope="module")
def faulty(tmp_path_factory):
    needs_redis_server()
    workdir = tmp_path_factory.mktemp("faults")
    model_dir = make_tiny_llama(workdir / "llama")
    store = RedisProcess(workdir, persist=True, persistence=deployed_redis_persistence())
    store.start()
    server = start_steer_server(
        workdir / "server.log",
        ["--model", model_dir, "--store", store.url, "--store-timeout", str(STORE_TIMEOUT_S),
         "--store-cache-ttl", "0.5", "--max-model-len", "256"],
    )
    try:
        yield server, store, model_dir
    finally:
        stop_steer_server(server)
        store.stop()


def put_unseen(store_url: str, model_dir: str, name: str, seed: int) -> str:
    """A vector written by another replica: this server has never resolved it."""
    import torch

    gen = torch.Generator().manual_seed(seed)
    vector = StoredVector(VectorMeta(model_fingerprint(model_dir), HIDDEN, "constant"),
                          {1: 4 * torch.randn(1, HIDDEN, generator=gen)})
    other = RedisVectorStore(store_url)
    content_id = other.put(vector)
    other.set_name(name, content_id)
    return content_id


def steered(name: str) -> dict:
    return {"mode": "constant", "additions": [{"vector": name, "coeff": 1.0}]}


class Load(threading.Thread):
    """Unsteered requests and requests steered by an already-used vector, back to back."""

    def __init__(self, http: httpx.Client, model: str, vector: str):
        super().__init__(daemon=True)
        self.http, self.model, self.vector = http, model, vector
        self.statuses: Counter = Counter()
        self.failures: list[str] = []
        self.stop = threading.Event()

    def run(self) -> None:
        i = 0
        while not self.stop.is_set():
            body = {"model": self.model, "prompt": "The weather today", "max_tokens": 4, "temperature": 0}
            if i % 2:
                body["steering"] = steered(self.vector)
            response = self.http.post("/v1/completions", json=body)
            self.statuses[response.status_code] += 1
            if response.status_code != 200:
                self.failures.append(f"{'steered' if i % 2 else 'plain'}: {response.status_code} {response.text}")
            i += 1


def complete(http, model, steering=None):
    body = {"model": model, "prompt": "My favourite colour is", "max_tokens": 8, "temperature": 0}
    if steering is not None:
        body["steering"] = steering
    started = time.monotonic()
    response = http.post("/v1/completions", json=body)
    return response, time.monotonic() - started


def test_redis_paused_killed_and_restarted_under_load(faulty):
    server, store, model_dir = faulty
    with httpx.Client(base_url=server.url, headers={"Authorization": f"Bearer {API_KEY}"}, timeout=60) as http:
        model = http.get("/v1/models").json()["data"][0]["id"]
        put_unseen(store.url, model_dir, "used", 1)
        plain, _ = complete(http, model)
        before, _ = complete(http, model, steered("used"))
        assert plain.status_code == before.status_code == 200
        assert before.json()["choices"][0]["text"] != plain.json()["choices"][0]["text"]
        unseen = {phase: put_unseen(store.url, model_dir, f"unseen-{phase}", seed)
                  for seed, phase in enumerate(("paused", "killed", "restarted"), start=2)}
        engine_pid = server.engine_pid()

        load = Load(http, model, "used")
        load.start()
        try:
            for phase in ("paused", "killed"):
                if phase == "paused":
                    store.signal(signal.SIGSTOP)
                else:
                    store.kill()
                time.sleep(1.0)  # longer than --store-cache-ttl: names must be asked for again
                again, _ = complete(http, model, steered("used"))
                assert again.status_code == 200, again.text
                assert again.json()["choices"][0]["text"] == before.json()["choices"][0]["text"]
                refused, elapsed = complete(http, model, steered(f"unseen-{phase}"))
                assert refused.status_code == 503, refused.text
                error = error_of(refused)
                assert store.url in error["message"] and "vector store" in error["message"], error
                assert error["type"] == "ServiceUnavailableError"
                assert elapsed < STORE_TIMEOUT_S + 2.5  # it failed fast, well before redis-py's default 5 s
                by_id, _ = complete(http, model, steered(unseen[phase]))
                assert by_id.status_code == 503, by_id.text

            store.start()  # same port, same append-only file
            for name in ("unseen-killed", "unseen-restarted"):
                back, _ = complete(http, model, steered(name))
                assert back.status_code == 200, back.text
                assert back.json()["choices"][0]["text"] != plain.json()["choices"][0]["text"]
            created = http.post("/v1/steering/vectors", json={"name": "after", "layers": {"2": [0.5] * HIDDEN}})
            assert created.status_code == 201, created.text
        finally:
            load.stop.set()
            load.join(timeout=120)
        assert load.failures == [], load.failures[:5]
        assert load.statuses[200] >= 4
        assert http.get("/health").status_code == 200
        assert server.engine_pid() == engine_pid  # the engine never restarted


def test_engine_step_never_reads_the_store(faulty):
    """With the store paused, a request steered by a vector the API process already holds
    is served at full speed: the engine gets the vector with the request."""
    server, store, model_dir = faulty
    with httpx.Client(base_url=server.url, headers={"Authorization": f"Bearer {API_KEY}"}, timeout=60) as http:
        model = http.get("/v1/models").json()["data"][0]["id"]
        content_id = put_unseen(store.url, model_dir, "by-id", 9)
        first, _ = complete(http, model, steered(content_id))
        assert first.status_code == 200
        store.signal(signal.SIGSTOP)
        try:
            time.sleep(1.0)
            second, _ = complete(http, model, steered(content_id))
        finally:
            store.signal(signal.SIGCONT)
        assert second.status_code == 200, second.text
        assert second.json()["choices"][0]["text"] == first.json()["choices"][0]["text"]
        assert os.path.exists(f"/proc/{server.engine_pid()}")


def test_redis_killed_during_a_burst_of_creates_keeps_every_acknowledged_vector(faulty):
    import torch

    server, store, _ = faulty
    burst = CreateBurst(server.url, API_KEY, "burst", HIDDEN, 1, threads=6)
    burst.start()
    try:
        burst.wait_for(40)
        store.kill()
        time.sleep(STORE_TIMEOUT_S + 1)  # creates meanwhile are refused, not acknowledged
        refused = len(burst.other)
        store.start()  # same port and directory: the append-only file is replayed
        burst.wait_for(len(burst.acknowledged) + 10)
    finally:
        burst.stop()
    assert refused > 0, "the kill came after the burst, not during it"
    direct = RedisVectorStore(store.url)
    for listed in direct.listing():  # every vector it shows reads whole (its sha256 checked)
        direct.get(listed.content_id)
    for name, (content_id, rows) in burst.acknowledged.items():
        assert direct.resolve(name) == content_id, name
        assert torch.equal(direct.get(content_id).directions[1], torch.from_numpy(rows)), name
