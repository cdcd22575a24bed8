"""/v1/steering/vectors: create, list, get (+norms), delete, GGUF export and import, and
the API key in front of them."""
from __future__ import annotations

import tempfile
from pathlib import Path

import gguf
import httpx
import numpy as np
import pytest
import torch
from api_helpers import error_of, raw_post
from safetensors.torch import save as save_safetensors

pytestmark = pytest.mark.slow

HIDDEN, LAYERS = 576, 30
ROUTE = "/v1/steering/vectors"


def rows(seed: int, k: int = 1, scale: float = 1.0) -> torch.Tensor:
    return torch.randn(k, HIDDEN, generator=torch.Generator().manual_seed(seed)) * scale


def test_api_key_protects_vector_routes(server):
    for method, path in [("GET", ROUTE), ("POST", ROUTE), ("GET", ROUTE + "/x"), ("DELETE", ROUTE + "/x"),
                         ("GET", ROUTE + "/x/gguf"), ("POST", ROUTE + "/import/gguf")]:
        assert httpx.request(method, server.url + path).status_code == 401, (method, path)
        wrong = httpx.request(method, server.url + path, headers={"Authorization": "Bearer nope"})
        assert wrong.status_code == 401


def test_upload_json_get_norms_list_delete(http, server):
    six, seven = rows(1, k=3, scale=2.0), rows(2, k=3)
    created = http.post(ROUTE, json={"name": "uploaded", "layers": {"6": six.tolist(), "7": seven.tolist()}})
    assert created.status_code == 201, created.text
    meta = created.json()
    assert meta["names"] == ["uploaded"] and meta["id"].startswith("v-")
    assert meta["kind"] == "actadd" and meta["method"] == "upload" and meta["served_model"]
    assert meta["layers"] == [6, 7] and meta["shape"] == {"6": [3, HIDDEN], "7": [3, HIDDEN]}
    assert meta["norm"]["6"] == pytest.approx(float(six.norm()), rel=1e-5)

    detail = http.get(f"{ROUTE}/uploaded", params={"norms": "true"}).json()
    assert detail["row_norms"]["6"] == pytest.approx(six.norm(dim=-1).tolist(), rel=1e-5)
    assert detail["row_norms"]["7"] == pytest.approx(seven.norm(dim=-1).tolist(), rel=1e-5)
    typical = detail["typical_token_norm"]
    assert set(typical) == {"6", "7"} and all(0 < typical[k] < 1e4 for k in typical)
    assert http.get(f"{ROUTE}/{meta['id']}").json()["names"] == ["uploaded"]  # by content id too

    listed = http.get(ROUTE, params={"limit": 1000}).json()
    assert listed["object"] == "list"
    assert [v for v in listed["data"] if v["id"] == meta["id"]][0]["names"] == ["uploaded"]

    deleted = http.delete(f"{ROUTE}/uploaded")
    assert deleted.status_code == 200 and deleted.json()["deleted"] == meta["id"]
    assert http.get(f"{ROUTE}/uploaded").status_code == 404
    assert http.get(f"{ROUTE}/{meta['id']}").status_code == 404
    assert meta["id"] not in [v["id"] for v in http.get(ROUTE, params={"all": "true", "limit": 1000}).json()["data"]]


def test_compute_actadd_and_constant(http, client, server):
    additions = [{"prompt": " wedding party", "coeff": 1}, {"prompt": " ", "coeff": -1}]
    actadd = http.post(ROUTE, json={"name": "wedding-party-l20", "layer": 20, "additions": additions})
    assert actadd.status_code == 201, actadd.text
    meta = actadd.json()
    # " wedding party" is 2 tokens; " " is 1, padded with the server's pad (" ") to 2.
    assert meta["kind"] == "actadd" and meta["method"] == "combined" and meta["shape"] == {"20": [2, HIDDEN]}
    assert meta["source"]["prompts"] == [" wedding party", " "] and meta["source"]["coeffs"] == [1.0, -1.0]
    # Without padding, row 1 is " party"'s stream alone (nothing subtracted): another vector.
    unpadded = http.post(ROUTE, json={"name": "wedding-party-l20-nopad", "layer": 20, "pad": None, "additions": additions})
    assert unpadded.status_code == 201, unpadded.text
    assert unpadded.json()["id"] != meta["id"] and unpadded.json()["shape"] == {"20": [2, HIDDEN]}
    assert unpadded.json()["norm"]["20"] != meta["norm"]["20"]
    # Computing the same thing again stores nothing new.
    again = http.post(ROUTE, json={"name": "wedding-party-again", "layer": 20, "additions": additions})
    assert again.json()["id"] == meta["id"] and again.json()["names"] == ["wedding-party-again", "wedding-party-l20"]

    constant = http.post(ROUTE, json={"name": "happy-sad", "layer": 8,
                                      "pairs": [{"positive": "I am happy", "negative": "I am sad"},
                                                {"positive": "What joy", "negative": "What grief"}]})
    assert constant.status_code == 201, constant.text
    c_meta = constant.json()
    assert c_meta["kind"] == "constant" and c_meta["method"] == "mean_diff" and c_meta["shape"] == {"8": [1, HIDDEN]}
    steered = client.completions.create(model=server.model, prompt="Today I feel", max_tokens=8, temperature=0,
                                        extra_body={"steering": {"mode": "constant", "additions": [
                                            {"vector": "happy-sad", "coeff": 4}]}})
    plain = client.completions.create(model=server.model, prompt="Today I feel", max_tokens=8, temperature=0)
    assert steered.choices[0].text != plain.choices[0].text


def test_safetensors_upload(http):
    data = rows(3, k=2)
    response = http.post(ROUTE, params={"name": "from-safetensors"},
                         content=save_safetensors({"layer.5": data}), headers={"Content-Type": "application/octet-stream"})
    assert response.status_code == 201, response.text
    meta = response.json()
    assert meta["names"] == ["from-safetensors"] and meta["shape"] == {"5": [2, HIDDEN]}
    assert meta["norm"]["5"] == pytest.approx(float(data.norm()), rel=1e-5)


def test_gguf_export_import_round_trip(http):
    directions = {4: rows(4), 12: rows(5, scale=3.0)}
    created = http.post(ROUTE, json={"name": "cv", "layers": {str(k): v.tolist() for k, v in directions.items()}})
    assert created.status_code == 201 and created.json()["kind"] == "constant"

    exported = http.get(f"{ROUTE}/cv/gguf")
    assert exported.status_code == 200
    assert exported.headers["content-type"] == "application/octet-stream"
    assert 'filename="cv.gguf"' in exported.headers["content-disposition"]
    # Read independently with the gguf library: llama.cpp's direction.N is the output of
    # block N, i.e. our layer N + 1.
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "cv.gguf"
        path.write_bytes(exported.content)
        reader = gguf.GGUFReader(path)
        assert reader.get_field("general.architecture").contents() == "controlvector"
        tensors = {t.name: np.array(t.data) for t in reader.tensors}
    assert set(tensors) == {"direction.3", "direction.11"}
    np.testing.assert_allclose(tensors["direction.3"], directions[4][0].numpy(), rtol=1e-6)
    np.testing.assert_allclose(tensors["direction.11"], directions[12][0].numpy(), rtol=1e-6)

    imported = http.post(f"{ROUTE}/import/gguf", params={"name": "cv-back"}, content=exported.content,
                         headers={"Content-Type": "application/octet-stream"})
    assert imported.status_code == 201, imported.text
    back = imported.json()
    assert back["names"] == ["cv-back"] and back["method"] == "gguf" and back["layers"] == [4, 12]
    assert back["norm"] == pytest.approx(created.json()["norm"])
    assert http.get(f"{ROUTE}/cv-back/gguf").content == exported.content


def test_vector_route_errors(http):
    cases = [
        (http.get(f"{ROUTE}/never-made"), 404, "never-made"),
        (http.delete(f"{ROUTE}/never-made"), 404, "never-made"),
        (http.get(f"{ROUTE}/never-made/gguf"), 404, "never-made"),
        (http.post(ROUTE, json={"name": "x", "layer": 31, "additions": [{"prompt": "a", "coeff": 1}]}), 400, "layer: 31"),
        (http.post(ROUTE, json={"name": "x", "layer": 3, "additions": []}), 400, "additions"),
        (http.post(ROUTE, json={"name": "x", "layer": 3, "pairs": [{"positive": "a"}]}), 400, "pairs[0].negative"),
        (http.post(ROUTE, json={"name": "x", "layers": {"3": [1.0, 2.0]}}), 400, f"hidden size is {HIDDEN}"),
        (http.post(ROUTE, json={"name": "x", "layers": {"three": rows(0)[0].tolist()}}), 400, "layers.three"),
        (http.post(ROUTE, json={"name": "v-bad", "layers": {"3": rows(0)[0].tolist()}}), 400, "bad vector name"),
        (http.post(ROUTE, json={"name": "x"}), 400, "additions"),
        (http.post(ROUTE, content=b"not json", headers={"Content-Type": "application/json"}), 400, "not valid JSON"),
        (http.post(ROUTE, content=b"garbage", headers={"Content-Type": "application/octet-stream"}), 400, "safetensors"),
        (http.post(f"{ROUTE}/import/gguf", content=b"GGUF garbage"), 400, "GGUF"),
        (http.post(f"{ROUTE}/import/gguf", content=b""), 400, "empty"),
    ]
    for response, status, words in cases:
        assert response.status_code == status, (words, response.text)
        assert words in error_of(response)["message"], (words, response.text)
    # An ActAdd sequence has no llama.cpp form.
    http.post(ROUTE, json={"name": "seq", "layers": {"6": rows(6, k=2).tolist()}})
    refused = http.get(f"{ROUTE}/seq/gguf")
    assert refused.status_code == 400 and "constant" in error_of(refused)["message"]


def test_vector_route_errors_name_the_field_in_the_steering_format(http):
    """Request validation on the vector routes answers 400 in the steering error format,
    never FastAPI's 422, and names the field down to the key."""
    cases = [
        (raw_post(http, ROUTE, {"layer": 3, "additions": [{"prompt": "a", "coeff": float("nan")}]}),
         "additions[0].coeff", "additions[0].coeff: must be a finite number"),
        (http.post(ROUTE, json={"layer": 3, "additions": [{"prompt": "a", "coeff": 1, "extra": 2}]}),
         "additions[0].extra", "additions[0].extra: unknown field"),
        (http.post(ROUTE, json={"layers": {"3": rows(0)[0].tolist()}, "colour": "red"}), "colour", "colour: unknown field"),
        (http.post(ROUTE, json={"name": "x"}), "body", 'expected "additions" (actadd), "pairs" (constant) or "layers" (upload)'),
        (http.post(ROUTE, json=[1, 2]), "body", "body: expected a JSON object"),
        (http.post(ROUTE, content="{", headers={"Content-Type": "application/json"}), "body", "body: not valid JSON (Expecting property name enclosed in double quotes"),
        (http.get(ROUTE, params={"all": "maybe"}), "all", "all: Input should be a valid boolean"),
    ]
    for response, param, words in cases:
        assert response.status_code == 400, (words, response.text)
        error = error_of(response)
        assert set(error) == {"message", "type", "param", "code"}, response.text
        assert error["type"] == "BadRequestError" and error["code"] == 400 and error["param"] == param, response.text
        assert words in error["message"], (words, response.text)


def test_create_takes_json_under_any_non_safetensors_content_type(http):
    """``curl -d`` sends a JSON body as a form; it is still read as JSON."""
    body = '{"name": "from-form-type", "layers": {"3": %s}}' % rows(7)[0].tolist()
    created = http.post(ROUTE, content=body, headers={"Content-Type": "application/x-www-form-urlencoded"})
    assert created.status_code == 201, created.text
    assert created.json()["names"] == ["from-form-type"] and created.json()["shape"] == {"3": [1, HIDDEN]}


def test_openapi_lists_the_vector_routes_and_their_bodies(server):
    spec = httpx.get(server.url + "/openapi.json").json()
    paths, schemas = spec["paths"], spec["components"]["schemas"]
    assert set(paths[ROUTE]) == {"get", "post"}
    assert set(paths[ROUTE + "/{name_or_id}"]) == {"get", "delete"}
    assert set(paths[ROUTE + "/{name_or_id}/gguf"]) == {"get"}
    assert set(paths[ROUTE + "/import/gguf"]) == {"post"}
    create = paths[ROUTE]["post"]["requestBody"]["content"]
    refs = {member.get("$ref") for member in create["application/json"]["schema"]["oneOf"]}
    assert {"#/components/schemas/ActAddVectorCreate", "#/components/schemas/ConstantVectorCreate",
            "#/components/schemas/UploadVectorCreate"} <= refs
    assert create["application/octet-stream"]["schema"] == {"type": "string", "format": "binary"}
    assert set(schemas["ActAddVectorCreate"]["required"]) == {"layer", "additions"}
    assert set(schemas["ActAddVectorCreate"]["properties"]) == {"name", "layer", "additions", "pad"}
    assert set(schemas["ConstantVectorCreate"]["properties"]) == {"name", "layer", "layers", "pairs", "method",
                                                                  "position", "template"}
    assert schemas["ConstantVectorCreate"]["required"] == ["pairs"]
    assert {"application/jsonl", "application/x-ndjson"} <= set(create)
    assert set(schemas["UploadVectorCreate"]["properties"]) == {"name", "layers", "kind"}
    assert set(schemas["PromptCoeff"]["properties"]) == {"prompt", "coeff"}
    gguf_body = paths[ROUTE + "/import/gguf"]["post"]["requestBody"]["content"]
    assert gguf_body["application/octet-stream"]["schema"]["format"] == "binary"
    list_params = {p["name"] for p in paths[ROUTE]["get"]["parameters"]}
    assert list_params == {"all", "limit", "after"}



def test_listing_reads_shapes_from_the_store_not_the_tensors(http, server):
    """Vectors written straight into the server's store (so not in its process cache): one
    whose tensor file is damaged still lists with its shape (the listing reads no tensors);
    one stored as earlier versions stored it, without shapes, lists with shapes read from its tensors."""
    import sqlite3

    from vector_store import StoredVector, VectorMeta, open_store

    fingerprint = http.get(ROUTE, params={"all": "true"}).json()["data"][0]["model"]
    store = open_store(str(server.store))
    damaged = store.put(StoredVector(VectorMeta(fingerprint, HIDDEN, "actadd"), {7: rows(8, k=3)}))
    old = store.put(StoredVector(VectorMeta(fingerprint, HIDDEN, "constant"), {2: rows(9), 9: rows(10)}))
    store.set_name("listed-damaged", damaged)
    store.set_name("listed-old", old)
    (server.store / "blobs" / f"{damaged}.safetensors").write_bytes(b"damaged")
    with sqlite3.connect(server.store / "index.sqlite3") as connection:
        connection.execute("UPDATE vectors SET shapes = NULL WHERE content_id = ?", (old,))
    try:
        listed = {v["id"]: v for v in http.get(ROUTE, params={"limit": 1000}).json()["data"]}
        assert listed[damaged]["layers"] == [7] and listed[damaged]["shape"] == {"7": [3, HIDDEN]}
        assert listed[old]["layers"] == [2, 9] and listed[old]["shape"] == {"2": [1, HIDDEN], "9": [1, HIDDEN]}
        assert listed[old]["names"] == ["listed-old"] and listed[old]["kind"] == "constant"
        assert http.get(f"{ROUTE}/listed-damaged").status_code == 503  # reading it is still refused
    finally:
        store.delete(damaged)
        store.delete(old)
