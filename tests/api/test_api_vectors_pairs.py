"""Vectors from datasets of contrast pairs, through a real server: every method (mean_diff,
pca_diff, pca_center) at the last token and the mean over tokens, at several layers, with and
without the chat template, compared with ``steer_server.reference.contrast_vectors`` on the same
weights in plain transformers; the JSONL upload, the CLI, and the 400s of bad input.

The server is the session's tiny random Llama in float32 (``tiny_server``: 3 layers, so "all" is
0..3), where the engine and transformers agree to float32 rounding, so the comparison can be tight.
"""
from __future__ import annotations

import json
from collections.abc import Iterator

import httpx
import pytest
import torch
from api_helpers import SENTIMENT_PAIRS as PAIRS
from api_helpers import cli, error_of
from conftest import TinyServer, http_client

from models import LAYERS

pytestmark = pytest.mark.slow

ROUTE = "/v1/steering/vectors"
JSONL = "application/jsonl"


@pytest.fixture(scope="module")
def http(tiny_server: TinyServer) -> Iterator[httpx.Client]:
    with http_client(tiny_server) as client:
        yield client


@pytest.fixture(scope="module")
def reference(tiny_server: TinyServer):
    """The tiny model in transformers, and its tokenizer (the default model's)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    return (AutoModelForCausalLM.from_pretrained(tiny_server.model_dir, dtype=torch.float32).eval(),
            AutoTokenizer.from_pretrained(tiny_server.model_dir))


def example_ids(tokenizer, text: str, template: str | None) -> list[int]:
    if template is None:
        return tokenizer(text)["input_ids"]
    rendered = tokenizer.apply_chat_template([{"role": "user", "content": text}], add_generation_prompt=True,
                                             tokenize=True)
    return list(rendered["input_ids"])


def jsonl(pairs: list[dict]) -> bytes:
    return "".join(json.dumps(pair) + "\n" for pair in pairs).encode()


@pytest.mark.parametrize("method, position, layers, template", [
    ("mean_diff", "last", [0, 2, 3], None),
    ("mean_diff", "mean", "all", None),
    ("pca_diff", "last", "all", None),
    ("pca_diff", "mean", [1, 3], None),
    ("pca_center", "last", "all", None),
    ("pca_center", "mean", [2], None),
    ("pca_center", "last", "all", "chat"),
    ("mean_diff", "mean", [0, 3], "chat"),
])
def test_vectors_match_the_transformers_reference(tiny_server, http, reference, method, position, layers, template):
    from steer_server.reference import contrast_vectors
    from vector_store import open_store

    body = {"layers": layers, "pairs": PAIRS, "method": method, "position": position}
    if template is not None:
        body["template"] = template
    made = http.post(ROUTE, json=body)
    assert made.status_code == 201, made.text
    vector = made.json()
    model, tokenizer = reference
    want_layers = list(range(LAYERS + 1)) if layers == "all" else layers
    assert vector["kind"] == "constant" and vector["method"] == method and vector["layers"] == want_layers
    pairs = [(example_ids(tokenizer, p["positive"], template), example_ids(tokenizer, p["negative"], template))
             for p in PAIRS]
    assert vector["source"]["pairs"] == [list(pair) for pair in pairs]  # rendered as transformers renders a chat
    want = contrast_vectors(model, pairs, want_layers, method, position)
    stored = open_store(str(tiny_server.store)).get(vector["id"])  # the server's own store, read directly
    for layer in want_layers:
        direction, stats = want[layer]
        got = stored.directions[layer][0]
        torch.testing.assert_close(got, direction, rtol=1e-4, atol=1e-4 * float(direction.abs().max()))
        measured = vector["stats"][str(layer)]
        assert measured["norm"] == pytest.approx(stats["norm"], rel=1e-4)
        assert measured["norm"] == pytest.approx(vector["norm"][str(layer)], rel=1e-5)
        assert measured["separation"] == stats["separation"]
        # Absent: no explained variance for mean_diff; neither it nor a midpoint where the
        # examples do not vary (layer 0 under the chat template: one last token for all).
        assert set(measured) == set(stats)
        for key in set(stats) & {"midpoint", "explained_variance"}:
            assert measured[key] == pytest.approx(stats[key], rel=1e-4, abs=1e-4), key


def test_a_pairs_file_makes_the_vector_the_json_body_makes_and_listings_show_its_stats(http):
    body = {"name": "pairs-json", "layers": [1, 2], "pairs": PAIRS, "method": "pca_center", "position": "mean"}
    from_json = http.post(ROUTE, json=body)
    assert from_json.status_code == 201, from_json.text
    # Blank lines are skipped and keys other than the pair's are ignored.
    data = jsonl(PAIRS[:2]) + b"\n" + jsonl([{**pair, "id": i} for i, pair in enumerate(PAIRS[2:])])
    from_file = http.post(ROUTE, params={"name": "pairs-file", "layers": "1,2", "method": "pca_center",
                                         "position": "mean"}, content=data, headers={"Content-Type": JSONL})
    assert from_file.status_code == 201, from_file.text
    made = from_file.json()
    assert made["id"] == from_json.json()["id"] and made["names"] == ["pairs-file", "pairs-json"]
    assert set(made["stats"]) == {"1", "2"} and made["source"]["position"] == "mean"
    listed = {v["id"]: v for v in http.get(ROUTE).json()["data"]}
    assert listed[made["id"]]["stats"] == made["stats"] == http.get(f"{ROUTE}/pairs-file").json()["stats"]


def test_the_shipped_sentiment_pairs_make_a_vector_under_the_chat_template(http):
    from steer_server.measure.data import sentiment_pairs_file

    data = sentiment_pairs_file().read_bytes()
    pairs = [json.loads(line) for line in data.decode("utf-8").splitlines()]
    assert len(pairs) >= 64 and all(set(pair) == {"positive", "negative"} for pair in pairs)
    assert len({pair["positive"] for pair in pairs}) == len({pair["negative"] for pair in pairs}) == len(pairs)
    made = _file(http, data, name="pairs-sentiment", method="pca_center", layers="all", template="chat")
    assert made.status_code == 201, made.text
    assert len(made.json()["source"]["pairs"]) == len(pairs) and made.json()["source"]["template"] == "chat"


def test_todays_pairs_body_is_still_a_last_token_mean_difference(http, reference):
    from steer_server.reference import contrast_vectors

    made = http.post(ROUTE, json={"layer": 2, "pairs": PAIRS[:2]})
    assert made.status_code == 201, made.text
    vector = made.json()
    assert vector["method"] == "mean_diff" and vector["layers"] == [2]
    assert set(vector["source"]) == {"pairs", "pairs_text"}
    explicit = http.post(ROUTE, json={"layers": [2], "pairs": PAIRS[:2], "method": "mean_diff", "position": "last"})
    assert explicit.json()["id"] == vector["id"]
    model, tokenizer = reference
    pairs = [(example_ids(tokenizer, p["positive"], None), example_ids(tokenizer, p["negative"], None))
             for p in PAIRS[:2]]
    want = contrast_vectors(model, pairs, [2], "mean_diff", "last")[2][1]
    assert vector["stats"]["2"]["norm"] == pytest.approx(want["norm"], rel=1e-4)
    one = http.post(ROUTE, json={"layer": 2, "pairs": PAIRS[:1]})  # one pair: as before, its difference
    assert one.status_code == 201 and one.json()["method"] == "last_token_diff"


def test_cli_computes_from_a_pairs_file_and_shows_the_stats(tiny_server, tmp_path):
    server = tiny_server
    path = tmp_path / "pairs.jsonl"
    path.write_bytes(jsonl(PAIRS))
    computed = cli(server, "vectors", "compute", "cli-pairs", "--pairs-file", str(path), "--method", "pca_diff",
                   "--layers", "all", "--position", "mean")
    assert "cli-pairs" in computed.stdout and "pca_diff" in computed.stdout
    shown = cli(server, "vectors", "show", "cli-pairs").stdout
    assert "separation" in shown and "explained variance" in shown
    by_pair = cli(server, "vectors", "compute", "cli-pair", "--pair", "I am glad", "I am sad", "--pair", "So good",
                  "So bad", "--layers", "1,3", "--method", "pca_center")
    assert "cli-pair" in by_pair.stdout and "pca_center" in by_pair.stdout
    refused = cli(server, "vectors", "compute", "cli-bad", "--pairs-file", str(path), "--method", "pca_center",
                  "--layers", "1,9", check=False)
    assert refused.returncode == 1 and "HTTP 400" in refused.stderr and "layers[1]" in refused.stderr


def _file(http: httpx.Client, data: bytes, **params) -> httpx.Response:
    return http.post(ROUTE, params=params, content=data, headers={"Content-Type": JSONL})


def _json(http: httpx.Client, **body) -> httpx.Response:
    return http.post(ROUTE, json={"pairs": PAIRS, **body})


def test_bad_pairs_input_is_a_400_naming_the_field(http):
    two = jsonl(PAIRS[:2])
    methods = "Input should be 'mean_diff', 'pca_diff' or 'pca_center'"
    cases = [
        # a principal component needs two pairs; mean_diff takes one
        (_json(http, layer=1, pairs=PAIRS[:1], method="pca_diff"), "pairs", "pairs: pca_diff needs at least 2 pairs"),
        (_file(http, jsonl(PAIRS[:1]), layers="all", method="pca_center"), "pairs", "pca_center needs at least 2 pairs"),
        # an uploaded file whose positives and negatives do not pair up, or is not UTF-8, JSON or pairs
        (_file(http, two + json.dumps({"negative": "only a negative"}).encode() + b"\n", layer=1), "pairs",
         'the file has 2 positives and 3 negatives on 3 lines: line 3 has no "positive"'),
        (_file(http, two + "caf\xe9\n".encode("latin-1"), layer=1), "pairs", "line 3 is not UTF-8"),
        (_file(http, b"not json\n" + two, layer=1), "pairs", "line 1 is not valid JSON"),
        (_file(http, b"", layer=1), "body", "body: empty"),
        (_file(http, b"\n\n", layer=1), "pairs", "the file holds no pairs"),
        (_file(http, json.dumps({"positive": 1, "negative": "x"}).encode(), layer=1), "pairs",
         'line 1: "positive" must be a string'),
        (_file(http, json.dumps({"positive": "", "negative": "x"}).encode(), layer=1), "pairs[0].positive",
         "pairs[0].positive: line 1 of the file: the prompt is empty"),
        # unknown methods, positions and templates
        (_json(http, layer=1, method="mean"), "method", f"method: {methods}"),
        (_file(http, two, layer=1, method="svd"), "method", f"method: {methods}"),
        (_json(http, layer=1, position="first"), "position", "position: Input should be 'last' or 'mean'"),
        (_json(http, layer=1, template="raw"), "template", "template: Input should be 'chat'"),
        # layers out of range, or not layers
        (_json(http, layers=[1, 4]), "layers[1]", "layers[1]: 4 is outside 0..3"),
        (_json(http, layer=7), "layer", "layer: 7 is outside 0..3"),
        (_file(http, two, layers="0,9"), "layers[1]", "layers[1]: 9 is outside 0..3"),
        (_file(http, two, layers="one,two"), "layers", 'layers: expected "all" or layers separated by commas'),
        (_json(http, layers="every"), "layers", 'layers: expected a list of layers, or "all"'),
        (_json(http, layers=[]), "layers", "layers: empty"),
        (_json(http, layer=1, layers=[2]), "layers", 'give "layer" (one) or "layers"'),
        (_json(http), "layer", "layer: required"),
        (_file(http, two, layer="x"), "layer", "layer: Input should be a valid integer"),
        # the pairs body's query fields belong to a pairs file only
        (http.post(ROUTE, params={"method": "pca_diff"}, json={"layer": 1, "pairs": PAIRS}), "method",
         "method: a query parameter of a JSONL pairs upload"),
        (_json(http, name="v-taken", layer=1), None, "bad vector name"),
    ]
    for response, param, words in cases:
        assert response.status_code == 400, (words, response.text)
        error = error_of(response)
        assert error["param"] == param and words in error["message"], (words, response.text)
    assert _json(http, layer=1, pairs=PAIRS[:1], method="mean_diff").status_code == 201
