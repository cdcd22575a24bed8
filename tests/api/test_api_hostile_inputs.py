"""Hostile files and bodies on the vector routes (``/v1/steering/vectors...``), through a real
server (the session's tiny Llama, SQLite store):

- every vector route fuzzed from the server's own ``/openapi.json`` with schemathesis, bodies
  that fit the schema and bodies that do not: never a 5xx or a hang, every 4xx in the steering
  error format with a message, and the store unchanged by every refused request;
- crafted GGUF and safetensors files (``hostile_files``) that declare gigabytes, lie about
  counts and offsets, carry wrong dtypes or NaN/Inf: each refused with a 400 saying what is
  wrong, while the API server's peak memory stays far below what they declare;
- names with ``../``, NUL, 10k characters and Unicode confusables on every route that takes one;
- afterwards the server still answers a steered request.
"""
from __future__ import annotations

import json
import re
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import quote

import httpx
import numpy as np
import psutil
import pytest
import requests
import schemathesis
from api_helpers import error_of
from conftest import API_KEY, TinyServer, http_client
from hostile_files import control_vector, hostile_ggufs, hostile_safetensors, safetensors_file
from hypothesis import HealthCheck, Phase, given, reject, settings
from hypothesis import strategies as st
from schemathesis import GenerationMode
from schemathesis.transport.serialization import Binary

from models import HIDDEN, LAYERS

pytestmark = pytest.mark.slow

ROUTE = "/v1/steering/vectors"
OCTET = {"Content-Type": "application/octet-stream"}
JSONL = "application/jsonl"
TIMEOUT_S = 60  # a hang is a failure, not a stuck test
EXAMPLES = 100  # per operation and generation mode
MEMORY_BOUND = 200 * 2**20  # the API server's peak may grow by this much while files declare gigabytes

# Every operation under the vector prefix, as the server's schema lists them: the fuzz test
# checks this list against the schema, so a new vector route cannot go unfuzzed.
FUZZED = [
    ("POST", ROUTE),
    ("GET", ROUTE),
    ("POST", ROUTE + "/import/gguf"),
    ("GET", ROUTE + "/{name_or_id}"),
    ("DELETE", ROUTE + "/{name_or_id}"),
    ("GET", ROUTE + "/{name_or_id}/gguf"),
    ("POST", ROUTE + "/{name}/calibrate"),
    ("PUT", ROUTE + "/{name}/calibration"),
]
# Routes that change or spend on the vector their path names: fuzzed only on names that name
# no vector, so that neither another module's vectors nor a calibration sweep is touched.
GUARDED = {("DELETE", ROUTE + "/{name_or_id}"), ("POST", ROUTE + "/{name}/calibrate"),
           ("PUT", ROUTE + "/{name}/calibration")}


@pytest.fixture(scope="module")
def http(tiny_server: TinyServer) -> Iterator[httpx.Client]:
    with http_client(tiny_server) as client:
        client.timeout = httpx.Timeout(TIMEOUT_S)
        yield client


@pytest.fixture(scope="module")
def openapi(http: httpx.Client) -> dict:
    """The server's schema, less the binary member of the create route's JSON ``oneOf`` (the
    safetensors file, which comes as raw bytes and is fuzzed as application/octet-stream):
    schemathesis cannot generate a JSON body from it (ValueError: Unsupported type: 'Binary')."""
    spec = http.get("/openapi.json").raise_for_status().json()
    json_body = spec["paths"][ROUTE]["post"]["requestBody"]["content"]["application/json"]["schema"]
    json_body["oneOf"] = [member for member in json_body["oneOf"] if member.get("format") != "binary"]
    return spec


def listing(http: httpx.Client) -> list[tuple[str, list[str]]]:
    """Every stored vector (named or not) and its names."""
    response = http.get(ROUTE, params={"all": "true", "limit": 1000})
    assert response.status_code == 200, response.text
    return sorted((entry["id"], sorted(entry["names"])) for entry in response.json()["data"])


def named(entries: list[tuple[str, list[str]]]) -> list[tuple[str, list[str]]]:
    return [entry for entry in entries if entry[1]]


def assert_refused(response: httpx.Response, words: str, statuses: tuple[int, ...] = (400,)) -> None:
    """A refusal in the steering error format whose message says ``words``."""
    assert response.status_code in statuses, (words, response.status_code, response.text[:500])
    error = error_of(response)
    assert words in error["message"], (words, response.text[:500])


def api_server(tiny_server: TinyServer) -> psutil.Process:
    """The process that listens on the server's port (it parses the bodies)."""
    port = int(tiny_server.url.rsplit(":", 1)[1])
    root = psutil.Process(tiny_server.running.process.pid)
    for process in [root, *root.children(recursive=True)]:
        if any(c.status == psutil.CONN_LISTEN and c.laddr.port == port for c in process.net_connections("tcp")):
            return process
    raise AssertionError(f"no process of the server listens on {port}")


def peak_rss(process: psutil.Process) -> int:
    """The process's resident peak (VmHWM) since the last ``reset_peak``, in bytes."""
    status = Path(f"/proc/{process.pid}/status").read_text()
    return int(re.search(r"VmHWM:\s+(\d+) kB", status).group(1)) * 1024


def reset_peak(process: psutil.Process) -> None:
    Path(f"/proc/{process.pid}/clear_refs").write_text("5")  # 5: reset the peak RSS to the current RSS


# -- property-based fuzzing from the server's own schema -----------------------------------------


def test_every_vector_route_is_fuzzed(openapi: dict) -> None:
    listed = {(method.upper(), path) for path, item in openapi["paths"].items() if path.startswith(ROUTE)
              for method in item if method in ("get", "put", "post", "delete", "patch")}
    assert listed == set(FUZZED)


def generation_modes(operation: dict) -> list[GenerationMode]:
    """Data that fits the schema, and data that breaks it where the schema can be broken (a
    JSON body, a query; raw bytes and path names are strings whatever they hold)."""
    content = operation.get("requestBody", {}).get("content", {})
    breakable = "application/json" in content or any(p["in"] == "query" for p in operation.get("parameters", []))
    return [GenerationMode.POSITIVE, *([GenerationMode.NEGATIVE] if breakable else [])]


class StoreWatch:
    """Checks fuzzed answers: never a 5xx; a 4xx in the steering format with a message, and
    the store as it was before it; a vector the fuzz created (201) is deleted again."""

    def __init__(self, http: httpx.Client):
        self.http = http
        self.start = self.now = listing(http)

    def answered(self, response: httpx.Response | requests.Response, reproduce: str) -> None:
        assert response.status_code < 500, f"{response.status_code} {response.text[:500]}\n{reproduce}"
        if response.status_code == 201:
            assert self.http.delete(f"{ROUTE}/{response.json()['id']}").status_code == 200
            self.now = listing(self.http)  # a computed vector's unnamed parts stay, as for any client
        elif response.status_code >= 400:
            error = response.json().get("error")
            assert isinstance(error, dict) and error.get("message"), f"{response.text[:500]}\n{reproduce}"
            assert listing(self.http) == self.now, f"a refused request changed the store\n{reproduce}"

    def finish(self) -> None:
        assert named(listing(self.http)) == named(self.start)


FUZZ_SETTINGS = settings(max_examples=EXAMPLES, deadline=None, derandomize=True, database=None,
                         phases=[Phase.explicit, Phase.generate, Phase.shrink],
                         suppress_health_check=list(HealthCheck))


@pytest.mark.parametrize("method, path", FUZZED, ids=[f"{m} {p}" for m, p in FUZZED])
def test_fuzzed_from_openapi(http: httpx.Client, tiny_server: TinyServer, openapi: dict, method: str,
                             path: str) -> None:
    """Bodies, queries and path names generated from the route's schema, fitting it and not."""
    operation = schemathesis.openapi.from_dict(openapi)[path][method]
    watch = StoreWatch(http)
    headers = {"Authorization": f"Bearer {API_KEY}"}

    def check(case) -> None:
        name = (case.path_parameters or {}).get("name") or (case.path_parameters or {}).get("name_or_id")
        if (method, path) in GUARDED and isinstance(name, str):  # schemathesis sends path names percent-encoded
            if http.get(f"{ROUTE}/{name}").status_code != 404:
                reject()
        response = case.call(base_url=tiny_server.url, headers=headers, timeout=TIMEOUT_S, allow_redirects=False)
        watch.answered(response, case.as_curl_command(headers=headers))
        if (method, path) == ("POST", ROUTE) and isinstance(case.body, Binary):
            # schemathesis sends every binary body as octet-stream; the same bytes as a pairs file:
            watch.answered(http.post(ROUTE, params=case.query, content=case.body.data, headers={"Content-Type": JSONL}),
                           f"the body of {case.as_curl_command(headers=headers)} as {JSONL}")

    for mode in generation_modes(openapi["paths"][path][method.lower()]):
        FUZZ_SETTINGS(given(case=operation.as_strategy(mode))(check))()
    watch.finish()


_JSON_VALUES = st.recursive(st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=20),
                            lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=8), inner,
                                                                                        max_size=3), max_leaves=8)
_PAIR = st.fixed_dictionaries({"positive": st.text(max_size=30), "negative": st.text(max_size=30)}).map(json.dumps)
_PAIRS_FILES = st.one_of(
    st.lists(_PAIR.map(str.encode), min_size=1, max_size=4),  # pairs, as a client means them
    st.lists(st.one_of(
        _PAIR,
        st.dictionaries(st.sampled_from(["positive", "negative", "name"]), _JSON_VALUES, max_size=3).map(json.dumps),
        _JSON_VALUES.map(json.dumps),
        st.text(max_size=30),
    ).map(str.encode) | st.binary(max_size=30), max_size=6),
).map(b"\n".join)
_PAIRS_QUERIES = st.fixed_dictionaries({"layer": st.sampled_from(["1", "1", "99", "-1", "x", "\u00b2"])}, optional={
    "name": st.text(max_size=12), "layers": st.sampled_from(["all", "1,2", "1,,2", "9" * 5000]),
    "method": st.sampled_from(["mean_diff", "pca_diff", "x"]), "position": st.sampled_from(["last", "mean", "x"]),
    "template": st.sampled_from(["chat", "x"])})


def test_fuzzed_pairs_files(http: httpx.Client) -> None:
    """JSONL pairs files (the schema says only "binary" of them): lines of pairs, of other JSON,
    of text and of bytes, with the query's fields, fitting and not."""
    watch = StoreWatch(http)

    @FUZZ_SETTINGS
    @given(body=_PAIRS_FILES, query=_PAIRS_QUERIES)
    def check(body: bytes, query: dict) -> None:
        response = http.post(ROUTE, params=query, content=body, headers={"Content-Type": JSONL})
        watch.answered(response, f"POST {ROUTE} {query!r} {body!r}")

    check()
    watch.finish()


# -- crafted files --------------------------------------------------------------------------------


def crafted_files() -> list[tuple[str, str, bytes, str]]:
    """(route, what it is, body, words of its refusal) for every crafted file."""
    return ([(ROUTE + "/import/gguf", f"GGUF: {name}", body, words)
             for name, (body, words) in hostile_ggufs(HIDDEN, LAYERS).items()]
            + [(ROUTE, f"safetensors: {name}", body, words)
               for name, (body, words) in hostile_safetensors(HIDDEN).items()])


def test_crafted_files_are_refused_and_memory_stays_bounded(http: httpx.Client, tiny_server: TinyServer) -> None:
    before = listing(http)
    server = api_server(tiny_server)
    reset_peak(server)
    resident = server.memory_info().rss
    wrong = []
    for _ in range(3):  # again and again: what one file leaks would add up
        for route, what, body, words in crafted_files():
            response = http.post(route, params={"name": "crafted"}, content=body, headers=OCTET)
            try:
                assert_refused(response, words)
            except AssertionError as exc:
                wrong.append(f"{what}: {exc}")
    assert not wrong, "\n".join(wrong)
    grown = peak_rss(server) - resident
    assert grown < MEMORY_BOUND, f"the API server's peak grew by {grown / 2**20:.0f} MiB"
    assert listing(http) == before


def test_the_well_formed_twins_of_the_crafted_files_are_accepted(http: httpx.Client) -> None:
    """The crafted files are refused for what they break, not for being built by hand."""
    gguf = http.post(ROUTE + "/import/gguf", content=control_vector(HIDDEN, np.full(HIDDEN, 0.5)), headers=OCTET)
    assert gguf.status_code == 201, gguf.text
    row = np.full(HIDDEN, 0.25, np.float32).tobytes()
    upload = http.post(ROUTE, content=safetensors_file(
        {"layer.1": {"dtype": "F32", "shape": [1, HIDDEN], "data_offsets": [0, len(row)]}}, row), headers=OCTET)
    assert upload.status_code == 201, upload.text
    for created in (gguf, upload):
        assert created.json()["shape"] == {"1": [1, HIDDEN]}
        assert http.delete(f"{ROUTE}/{created.json()['id']}").status_code == 200


def test_hostile_json_bodies(http: httpx.Client) -> None:
    """Bodies that fit the schema's types but not the route's meaning."""
    before = listing(http)
    row = [0.5] * HIDDEN
    deep = "[" * 100_000 + "]" * 100_000
    cases = [
        ({"layers": {"1": [row, row[:-1]]}}, "layers.1: rows of one length expected"),
        ({"layers": {"\u00b2": [row]}}, "layers.\u00b2: layer keys are decimal integers"),
        ({"layers": {"\u0661": [row]}}, "layer keys are decimal integers"),  # Arabic-Indic one
        ({"layers": {"9" * 5000: [row]}}, "layer keys are decimal integers"),
        ({"layers": {"1": [[1e300] * HIDDEN]}}, "NaN or infinite"),
        ({"layers": {"1": [[]]}}, "rows have 0 values"),
        ({"layers": {"1": []}}, "rows have 0 values"),
        ({"layers": {"1": [row]}, "kind": "../constant"}, "kind: expected 'actadd' or 'constant'"),
        ({"layer": 1, "additions": [{"prompt": "\u0000", "coeff": 1}], "pad": "\u200d"}, "pad"),
        ({"layer": 2**70, "additions": [{"prompt": "a", "coeff": 1}]}, "layer"),
        ({"layer": 1, "pairs": [{"positive": "a", "negative": "b"}], "template": "../chat"}, "template"),
    ]
    for body, words in cases:
        assert_refused(http.post(ROUTE, json=body), words)
    raw = [
        ('{"layers": {"1": [' + ",".join(["NaN"] * HIDDEN) + "]}}", "NaN"),
        ('{"layers": {"1": ' + deep + "}}", "body: JSON nested deeper"),
        (deep, "body: JSON nested deeper"),
        (b'{"name": "\xff"}', "body: not valid JSON ('utf-8' codec can't decode"),
    ]
    for body, words in raw:
        assert_refused(http.post(ROUTE, content=body, headers={"Content-Type": "application/json"}), words)
    assert_refused(http.post(ROUTE, content=deep, headers={"Content-Type": "text/plain"}), "body: JSON nested deeper")
    assert_refused(http.post(ROUTE, content=deep, headers={"Content-Type": JSONL}),
                   "line 1 is JSON nested deeper")
    assert_refused(http.post(ROUTE, content=deep, headers=OCTET), "safetensors")
    assert_refused(http.post(ROUTE, content=b"\xff\xfe" * 1000, headers={"Content-Type": JSONL}),
                   "line 1 is not UTF-8")
    assert listing(http) == before


def test_deeply_nested_json_that_mentions_steering_is_refused(http: httpx.Client) -> None:
    deep = "[" * 100_000 + "]" * 100_000
    response = http.post(ROUTE, content='{"steering": ' + deep + "}", headers={"Content-Type": "application/json"})
    assert_refused(response, "nested deeper")


# -- hostile names --------------------------------------------------------------------------------

HOSTILE_NAMES = {
    "dot-dot slash": "../escape",
    "dot-dot backslash": "..\\escape",
    "absolute path": "/etc/passwd",
    "NUL": "a\x00b",
    "10k characters": "a" * 10_000,
    "129 characters": "a" * 129,
    "Cyrillic a": "h\u0430ppy",
    "fullwidth": "\uff48\uff41\uff50\uff50\uff59",
    "zero-width joiner": "hap\u200dpy",
    "right-to-left override": "\u202eyppah",
    "combining accent": "happ\u0079\u0301",
    "trailing newline": "happy\n",
    "space": "happy sad",
    "percent-encoded dots": "%2e%2e%2f",
    "emoji": "\U0001f600",
    "content id that names nothing": "v-" + "0" * 40,
}


@pytest.mark.parametrize("name", HOSTILE_NAMES.values(), ids=HOSTILE_NAMES.keys())
def test_hostile_names_are_refused_on_every_route(http: httpx.Client, name: str) -> None:
    before = listing(http)
    row = np.full(HIDDEN, 0.5, np.float32)
    tensors = safetensors_file({"layer.1": {"dtype": "F32", "shape": [1, HIDDEN], "data_offsets": [0, 4 * HIDDEN]}},
                               row.tobytes())
    pairs = json.dumps({"positive": "good", "negative": "bad"}).encode()
    named = "bad vector name"
    creates = [
        http.post(ROUTE, json={"name": name, "layers": {"1": row.tolist()}}),
        http.post(ROUTE, json={"name": name, "layer": 1, "additions": [{"prompt": "a", "coeff": 1}]}),
        http.post(ROUTE, json={"name": name, "layer": 1, "pairs": [{"positive": "good", "negative": "bad"}]}),
        http.post(ROUTE, params={"name": name, "layer": 1}, content=pairs, headers={"Content-Type": JSONL}),
        http.post(ROUTE, params={"name": name}, content=tensors, headers=OCTET),
        http.post(ROUTE + "/import/gguf", params={"name": name}, content=control_vector(HIDDEN), headers=OCTET),
    ]
    for response in creates:
        assert_refused(response, named)
        assert len(error_of(response)["message"]) < 500  # a 10k-character name is not echoed whole
    # By path: nothing by this name exists (a name with "/" reaches no vector route at all).
    encoded = quote(name, safe="")
    lookups = [
        http.get(f"{ROUTE}/{encoded}"),
        http.delete(f"{ROUTE}/{encoded}"),
        http.get(f"{ROUTE}/{encoded}/gguf"),
        http.post(f"{ROUTE}/{encoded}/calibrate", json={"layers": [1], "doses": [0.5]}),
        http.put(f"{ROUTE}/{encoded}/calibration", json={"layer": 1, "dose": 0.5}),
    ]
    for response in lookups:
        assert response.status_code == 404, (response.request.method, response.request.url, response.text[:300])
        if "/" not in name:
            assert error_of(response)["message"]
    assert listing(http) == before


# -- afterwards -----------------------------------------------------------------------------------


def test_the_server_still_serves_steered_requests(http: httpx.Client, tiny_server: TinyServer) -> None:
    """Runs last in this module: the fuzz and the crafted files left a server that steers."""
    created = http.post(ROUTE, json={"name": "hostile-inputs-after", "layers": {"1": [[0.5] * HIDDEN]}})
    assert created.status_code == 201, created.text
    try:
        response = http.post("/v1/completions", json={
            "model": tiny_server.model, "prompt": "The weather", "max_tokens": 4, "temperature": 0,
            "steering": {"mode": "constant", "additions": [{"vector": "hostile-inputs-after", "dose": 0.5}]}})
        assert response.status_code == 200, response.text
        assert response.json()["usage"]["completion_tokens"] == 4
    finally:
        assert http.delete(f"{ROUTE}/hostile-inputs-after").status_code == 200
