"""Calibration through a real server (the tiny float32 Llama): the concept score it measures
against a readout of the same completions through plain transformers, the choice of cell,
a stored default that ``{"vector": name}`` then steers at (the receipt says so), versions,
refusals, and a calibration interrupted by a client that goes away or a server that is
killed leaving the vector as it was."""
from __future__ import annotations

import json
import os
import signal
import time

import httpx
import pytest
import torch
from api_helpers import cli, error_of
from conftest import API_KEY, http_client, sdk_client, start_steer_server, tiny_server_args
from transformers import AutoModelForCausalLM

from vector_store import StoredVector, VectorMeta
from vector_store.sqlite import SqliteVectorStore

pytestmark = pytest.mark.slow

ROUTE = "/v1/steering/vectors"
PAIRS = [
    {"positive": "I loved the warm soup", "negative": "I hated the cold soup"},
    {"positive": "What a wonderful sunny day", "negative": "What an awful rainy day"},
    {"positive": "The staff were kind and helpful", "negative": "The staff were rude and useless"},
    {"positive": "This book is a joy", "negative": "This book is a chore"},
]
PROMPTS = ["The weather today", "My friend told me"]
# Greedy, so the test can regenerate exactly the completions the calibration scored.
SWEEP = {"prompts": PROMPTS, "layers": [1, 2], "doses": [0.2, 1.5], "samples": 1, "max_tokens": 6,
         "temperature": 0.0, "positions": "generated"}


@pytest.fixture(scope="module")
def http(tiny_server):
    with http_client(tiny_server) as client:
        yield client


@pytest.fixture(scope="module")
def mood(http):
    created = http.post(ROUTE, json={"name": "mood", "pairs": PAIRS, "layers": [1, 2]})
    assert created.status_code == 201, created.text
    return created.json()


def _readout_share(hf, prompt_ids: list[int], completion: list[int], layer: int, direction, midpoint: float) -> float:
    """Share of the completion's tokens whose stream entering ``layer`` (plain transformers,
    unsteered) projects past ``midpoint`` on the unit ``direction``."""
    with torch.no_grad():
        out = hf(input_ids=torch.tensor([prompt_ids + completion]), output_hidden_states=True)
    stream = out.hidden_states[layer][0, len(prompt_ids):].double()
    unit = torch.tensor(direction, dtype=torch.float64).reshape(-1)
    unit = unit / unit.norm()
    return float(((stream @ unit) > midpoint).double().mean())


def test_calibration_measures_chooses_stores_and_a_bare_vector_steers_at_it(tiny_server, http, mood):
    started = http.post(f"{ROUTE}/mood/calibrate", json={**SWEEP, "budget": 100.0})
    assert started.status_code == 200, started.text
    result = started.json()
    calibration, cells = result["calibration"], result["cells"]
    assert len(cells) == 4 and calibration["version"] == 1 and calibration["concept"] == "projection"

    # Every cell's concept score, recomputed: the same greedy completions, read through transformers.
    hf = AutoModelForCausalLM.from_pretrained(tiny_server.model_dir, dtype=torch.float32).eval()
    vector = http.get(f"{ROUTE}/mood").json()
    stored = SqliteVectorStore(tiny_server.store).get(vector["id"])  # the directions, read from the store itself
    rows = {str(layer): stored.directions[layer].reshape(-1).tolist() for layer in (1, 2)}
    client = sdk_client(tiny_server)
    for cell in cells:
        layer, dose = cell["layer"], cell["dose"]
        midpoint = vector["stats"][str(layer)]["midpoint"]
        for label, steering, want in (
                ("steered", {"mode": "constant", "additions": [{"vector": "mood", "layer": layer, "dose": dose,
                                                                "positions": "generated"}]}, cell["concept"]["value"]),
                ("unsteered", None, cell["unsteered_concept"]["value"])):
            shares = []
            for prompt in PROMPTS:
                response = client.completions.create(
                    model=tiny_server.model, prompt=prompt, max_tokens=6, temperature=0.0, top_p=0.3,
                    extra_body={"repetition_penalty": 1.2, "return_token_ids": True,
                                **({"steering": steering} if steering else {})})
                choice = response.choices[0].model_extra
                shares.append(_readout_share(hf, list(choice["prompt_token_ids"]), list(choice["token_ids"]), layer,
                                             rows[str(layer)], midpoint))
            assert want == pytest.approx(sum(shares) / len(shares), abs=1e-9), (label, layer, dose)

    # the largest move from the unsteered level, all cells being within the generous budget
    best = max(cells, key=lambda c: (c["concept"]["value"] - c["unsteered_concept"]["value"], -c["dose"]))
    assert (calibration["layer"], calibration["dose"]) == (best["layer"], best["dose"])
    assert calibration["positions"] == "generated" and calibration["mode"] == "constant"
    assert http.get(f"{ROUTE}/mood").json()["calibration"] == calibration

    # {"vector": name} alone steers exactly as the calibrated setting written out.
    def greedy(steering):
        response = client.completions.create(model=tiny_server.model, prompt="Once upon a time", max_tokens=8,
                                             temperature=0.0, extra_body={"steering": steering})
        return response.choices[0].text, response.model_extra.get("steering_receipt")

    bare, receipt = greedy({"additions": [{"vector": "mood"}], "receipt": True})
    explicit, _ = greedy({"mode": "constant", "additions": [
        {"vector": "mood", "layer": calibration["layer"], "dose": calibration["dose"], "positions": "generated"}]})
    plain, _ = greedy({"additions": [{"vector": "mood", "layer": calibration["layer"], "coeff": 0.0}], "mode": "constant"})
    assert bare == explicit and bare != plain
    assert receipt["calibrated"] == [{"addition": 0, "vector": "mood", "layer": calibration["layer"],
                                      "dose": calibration["dose"], "positions": "generated", "version": 1}]
    (layer_receipt,) = receipt["layers"]
    assert layer_receipt["doses_requested"] == [calibration["dose"]]

    again = http.post(f"{ROUTE}/mood/calibrate", json={**SWEEP, "layers": [2], "doses": [0.3], "budget": 100.0})
    assert again.status_code == 200 and again.json()["calibration"]["version"] == 2
    assert again.json()["calibration"]["layer"] == 2


def test_the_cli_calibrates_with_a_progress_bar_and_prints_what_it_stored(tiny_server, http, mood):
    result = cli(tiny_server, "vectors", "calibrate", "mood", "--layers", "1", "--doses", "0.25,0.5", "--samples", "1",
                 "--max-tokens", "4", "--budget", "100", "--positions", "0:3")
    stored = http.get(f"{ROUTE}/mood").json()["calibration"]
    assert stored["layer"] == 1 and stored["dose"] in (0.25, 0.5) and stored["positions"] == {"start": 0, "end": 3}
    assert "calibrating" in result.stdout and f"stored (version {stored['version']}): layer 1, dose {stored['dose']:g}" \
        in result.stdout
    refused = cli(tiny_server, "vectors", "calibrate", "mood", "--doses", "0", check=False)
    assert refused.returncode != 0 and "doses[0]: must be a finite number above 0" in refused.stderr


def test_a_default_set_by_hand_steers_and_bad_ones_are_refused(tiny_server, http, mood):
    put = http.put(f"{ROUTE}/mood/calibration", json={"layer": 2, "dose": 0.7, "positions": {"start": 1}})
    assert put.status_code == 200, put.text
    stored = put.json()["calibration"]
    assert (stored["layer"], stored["dose"], stored["positions"], stored["mode"], stored["concept"]) == \
        (2, 0.7, {"start": 1}, "constant", "set by hand")
    response = sdk_client(tiny_server).completions.create(
        model=tiny_server.model, prompt="Once upon a time", max_tokens=4, temperature=0.0,
        extra_body={"steering": {"additions": [{"vector": "mood"}], "receipt": True}})
    receipt = response.model_extra["steering_receipt"]
    assert receipt["calibrated"] == [{"addition": 0, "vector": "mood", "layer": 2, "dose": 0.7,
                                      "positions": {"start": 1}, "version": stored["version"]}]
    (layer,) = receipt["layers"]
    assert layer["generated_tokens"] == 2 and layer["dose_max"] == pytest.approx(0.7, rel=1e-3)
    for body, param, words in [
        ({"layer": 2, "dose": 0}, "dose", "above 0"),
        ({"layer": 9, "dose": 0.1}, "layer", "outside 0..3"),
        ({"layer": 1, "dose": 5.0}, "dose", "over this server's limit of 3.0 (--max-dose)"),
        ({"layer": 1, "dose": 0.1, "positions": "later"}, "positions", "'generated' or 'after_anchor'"),
        ({"layer": 1, "dose": 0.1, "colour": "red"}, "colour", "unknown field"),
    ]:
        refused = http.put(f"{ROUTE}/mood/calibration", json=body)
        assert refused.status_code == 400, (body, refused.text)
        assert error_of(refused)["param"] == param and words in error_of(refused)["message"], (body, refused.text)
    assert http.get(f"{ROUTE}/mood").json()["calibration"] == stored


def test_the_cli_runs_a_grid_larger_than_one_calibration_in_parts_and_stores_the_best(tiny_server, http):
    created = http.post(ROUTE, json={"name": "mood-all", "pairs": PAIRS, "layers": [1, 2, 3]})
    assert created.status_code == 201, created.text
    doses = [round(0.1 * i, 1) for i in range(1, 10)]  # 3 layers × 9 doses = 27 cells: parts of 2 layers and 1
    result = cli(tiny_server, "vectors", "calibrate", "mood-all", "--layers", "1,2,3",
                 "--doses", ",".join(map(str, doses)), "--samples", "1", "--max-tokens", "4", "--budget", "100",
                 "--prompts", str(_prompts_file(tiny_server)))
    rows = [[part.strip() for part in line.split("│")[1:-1]] for line in result.stdout.splitlines()
            if line.count("│") == 6 and line.split("│")[1].strip().isdigit()]
    assert sorted((int(r[0]), float(r[1])) for r in rows) == [(layer, dose) for layer in (1, 2, 3) for dose in doses]
    best = max(rows, key=lambda r: (float(r[2]) - float(r[3]), -float(r[1])))
    stored = http.get(f"{ROUTE}/mood-all").json()["calibration"]
    assert (stored["layer"], stored["dose"]) == (int(best[0]), float(best[1])), result.stdout
    assert stored["concept"] == "projection" and stored["budget"] == 100 and stored["samples"] == 1


def _prompts_file(tiny_server):
    path = tiny_server.store.parent / "cli-prompts.txt"
    path.write_text(PROMPTS[0] + "\n")
    return path


def test_bad_calibrations_are_refused_and_change_nothing(tiny_server, http, mood):
    other = SqliteVectorStore(tiny_server.store)
    foreign = other.put(StoredVector(VectorMeta("OtherModel-h128-l3-0000000000000000", 128, "constant", "upload"),
                                     {1: torch.ones(1, 128)}))
    other.set_name("foreign", foreign)
    uploaded = http.post(ROUTE, json={"name": "plain-upload", "layers": {"1": [[0.5] * 128]}})
    assert uploaded.status_code == 201, uploaded.text
    cases = [
        ("foreign", {}, 400, "name", "was made for model OtherModel"),
        ("mood", {"doses": [0.0]}, 400, "doses[0]", "above 0"),
        ("mood", {"doses": [0.1, float("nan")]}, 400, "doses[1]", "above 0"),
        ("mood", {"layers": [1, 2, 3], "doses": [0.1 * i for i in range(1, 10)]}, 400, "body", "at most 24"),
        ("mood", {"layers": [9]}, 400, "layers[0]", "outside 0..3"),
        ("mood", {"budget": -1}, 400, "budget", "greater than 0"),
        ("plain-upload", {}, 400, "lexicon", "not made from contrast pairs"),
        ("nobody", {}, 404, "name", "no vector named or with id 'nobody'"),
        ("mood", {"layers": [1], "doses": [2.5], "budget": 1e-9, "samples": 1, "max_tokens": 4, "prompts": PROMPTS[:1]},
         422, "doses", "no cell costs at most 1e-09 nats/token"),
    ]
    before = http.get(f"{ROUTE}/mood").json()["calibration"]
    for name, body, status, param, words in cases:
        response = http.post(f"{ROUTE}/{name}/calibrate", content=json.dumps(body),
                             headers={"Content-Type": "application/json"})
        assert response.status_code == status, (name, body, response.text)
        error = error_of(response)
        assert error["param"] == param and words in error["message"], (name, body, error)
    assert http.get(f"{ROUTE}/mood").json()["calibration"] == before
    bare = http.post("/v1/completions", json={"model": tiny_server.model, "prompt": "Hi", "max_tokens": 2,
                                              "steering": {"additions": [{"vector": "plain-upload"}]}})
    assert bare.status_code == 400
    assert error_of(bare)["param"] == "steering.additions[0].coeff" and "no calibrated default" in error_of(bare)["message"]


def test_an_interrupted_calibration_leaves_the_vector_as_it_was(tiny_server, http, mood):
    before = http.get(f"{ROUTE}/mood").json()["calibration"]
    body = {**SWEEP, "layers": [1, 2], "doses": [0.1, 0.2, 0.4], "samples": 2, "max_tokens": 24, "budget": 100.0,
            "stream": True}
    with http.stream("POST", f"{ROUTE}/mood/calibrate", json=body) as stream:
        assert stream.status_code == 200
        for line in stream.iter_lines():
            if line.startswith("event: progress"):
                break  # the client goes away after the first progress event
    time.sleep(3)  # what the server would have done by now, had it gone on
    assert http.get(f"{ROUTE}/mood").json()["calibration"] == before

    # A server killed mid-calibration (every process of it, as a crash would): restarted on the
    # same store and port, the vector is as it was.
    running = tiny_server.running
    with httpx.Client(base_url=tiny_server.url, headers={"Authorization": f"Bearer {API_KEY}"}, timeout=300) as raw:
        with raw.stream("POST", f"{ROUTE}/mood/calibrate", json=body) as stream:
            for line in stream.iter_lines():
                if line.startswith("event: progress"):
                    os.killpg(running.process.pid, signal.SIGKILL)
                    break
    running.process.wait(timeout=60)
    port = int(tiny_server.url.rsplit(":", 1)[1])
    tiny_server.running = start_steer_server(tiny_server.log.with_name("restarted.log"),
                                             tiny_server_args(tiny_server.model_dir, tiny_server.store), port=port)
    with http_client(tiny_server) as after:
        assert after.get(f"{ROUTE}/mood").json()["calibration"] == before
