"""Vector writes acknowledged by a real server survive the server's SIGKILL, the hard way: the
shared tiny server (SQLite store) is killed, every process of it, in the middle of a burst of
concurrent creates; the store opens without repair, every acknowledged vector is there under
its name, bit for bit, nothing half-written is visible, and the restarted server serves them.
(Redis, the same with redis-server killed: test_api_store_faults.py.)"""
from __future__ import annotations

import os
import signal
import sqlite3

import httpx
import pytest
import torch
from api_helpers import CreateBurst
from conftest import API_KEY, start_steer_server, tiny_server_args

from vector_store.sqlite import SqliteVectorStore

pytestmark = pytest.mark.slow

HIDDEN, LAYER = 128, 1


def test_sigkill_during_a_burst_of_creates_loses_no_acknowledged_vector(tiny_server):
    burst = CreateBurst(tiny_server.url, API_KEY, "burst", HIDDEN, LAYER, threads=6)
    burst.start()
    try:
        burst.wait_for(40)
        os.killpg(tiny_server.running.process.pid, signal.SIGKILL)
        tiny_server.running.process.wait(timeout=60)
    finally:
        burst.stop()
    acknowledged = dict(burst.acknowledged)
    assert len(acknowledged) >= 40 and burst.other, "the kill came after the burst, not during it"

    # Opens without repair: SQLite's own check of the index, read before any server touches it.
    with sqlite3.connect(tiny_server.store / "index.sqlite3") as index:
        assert index.execute("PRAGMA integrity_check").fetchall() == [("ok",)]
        assert index.execute("PRAGMA foreign_key_check").fetchall() == []
    store = SqliteVectorStore(tiny_server.store)
    for listed in store.listing():  # every vector the index shows reads whole (its sha256 checked)
        store.get(listed.content_id)
    for name, (content_id, rows) in acknowledged.items():
        assert store.resolve(name) == content_id, name
        stored = store.get(content_id).directions[LAYER]
        assert torch.equal(stored, torch.from_numpy(rows)), name

    port = int(tiny_server.url.rsplit(":", 1)[1])
    tiny_server.running = start_steer_server(tiny_server.log.with_name("after-burst.log"),
                                             tiny_server_args(tiny_server.model_dir, tiny_server.store), port=port)
    with httpx.Client(base_url=tiny_server.url, headers={"Authorization": f"Bearer {API_KEY}"}, timeout=60) as http:
        for name, (content_id, _) in acknowledged.items():
            got = http.get(f"/v1/steering/vectors/{name}")
            assert got.status_code == 200 and got.json()["id"] == content_id, (name, got.text)
        steered = http.post("/v1/completions", json={
            "model": tiny_server.model, "prompt": "Hello", "max_tokens": 2,
            "steering": {"mode": "constant", "additions": [{"vector": next(iter(acknowledged)), "coeff": 1.0}]}})
        assert steered.status_code == 200, steered.text
