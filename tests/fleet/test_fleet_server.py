"""One server as a shared deployment runs it: two API processes (vLLM's --api-server-count 2),
inference keys and an admin key, scraped by a real Prometheus.

- roles over HTTP: inference keys use vectors but may not create, import or delete them (403
  naming the role); admin keys may, and open inference too;
- /metrics in vLLM's multiprocess mode: N steered requests, spread over both API processes,
  read back as N from any of them;
- a real `prometheus` scrapes the server every second with the shipped config, and every query
  of the shipped Grafana dashboard returns data through its HTTP API.
"""
from __future__ import annotations

import json
import re
import time
import uuid
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import openai
import pytest
from fleet_processes import INFERENCE_KEY, REPO, metric_samples, prometheus_query, start_prometheus, start_tiny_server, stop
from models import make_tiny_llama

pytestmark = pytest.mark.slow

ADMIN_KEY = "admin-" + uuid.uuid4().hex
FILE_INFERENCE_KEY = "inference-" + uuid.uuid4().hex
ENV_ADMIN_KEY = "env-admin-" + uuid.uuid4().hex  # $STEER_ADMIN_API_KEY, beside the keys file's
DASHBOARD = REPO / "deploy" / "grafana" / "steer-server.json"
SCRAPE_WAIT_S = 60


@pytest.fixture(scope="module")
def fleet(tmp_path_factory: pytest.TempPathFactory) -> Iterator:
    workdir = tmp_path_factory.mktemp("fleet-server")
    model = make_tiny_llama(tmp_path_factory.mktemp("fleet-tiny") / "llama")
    keys = workdir / "keys"
    keys.write_text(f"# role key\nadmin {ADMIN_KEY}\n\ninference {FILE_INFERENCE_KEY}\n")
    handle = start_tiny_server(model, workdir, str(workdir / "store"),
                               ["--api-server-count", "2", "--api-keys-file", str(keys)],
                               env={"STEER_ADMIN_API_KEY": ENV_ADMIN_KEY})
    try:
        yield handle
    finally:
        stop(handle)


def _http(fleet, key: str | None) -> httpx.Client:
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    return httpx.Client(base_url=fleet.url, headers=headers, timeout=120)


def _vector_body(name: str) -> dict:
    return {"name": name, "layers": {"1": [0.01 * (i % 7) for i in range(128)]}}


# ---------------------------------------------------------------- roles


@pytest.mark.parametrize("key_source", ["--api-key", "keys file"])
def test_inference_keys_use_vectors_but_cannot_write_them(fleet, key_source):
    inference_key = INFERENCE_KEY if key_source == "--api-key" else FILE_INFERENCE_KEY
    name = f"roles-{uuid.uuid4().hex[:8]}"
    with _http(fleet, ADMIN_KEY) as admin, _http(fleet, inference_key) as user:
        assert admin.post("/v1/steering/vectors", json=_vector_body(name)).status_code == 201

        refused = [
            ("POST", "/v1/steering/vectors", user.post("/v1/steering/vectors", json=_vector_body(name + "-x"))),
            ("POST", "/v1/steering/vectors/import/gguf",
             user.post("/v1/steering/vectors/import/gguf", params={"name": name + "-g"}, content=b"GGUF")),
            ("POST", "/v1/steering/vectors (safetensors)",
             user.post("/v1/steering/vectors", params={"name": name + "-s"}, content=b"x",
                       headers={"Content-Type": "application/octet-stream"})),
            ("DELETE", f"/v1/steering/vectors/{name}", user.delete(f"/v1/steering/vectors/{name}")),
        ]
        for method, path, response in refused:
            assert response.status_code == 403, (method, path, response.text)
            error = response.json()["error"]
            assert "'admin' role" in error["message"] and "'inference' role" in error["message"], error
            assert error["type"] == "PermissionDeniedError"

        # Reading and steering with the vector stay open to the inference key.
        assert user.get(f"/v1/steering/vectors/{name}").status_code == 200
        assert name in {n for v in user.get("/v1/steering/vectors").json()["data"] for n in v["names"]}
        client = openai.OpenAI(base_url=fleet.url + "/v1", api_key=inference_key, max_retries=0, timeout=120)
        steered = client.completions.create(model="tiny", prompt="The river", max_tokens=2,
                                            extra_body={"steering": {"mode": "constant", "additions": [
                                                {"vector": name, "coeff": 1.0}]}})
        assert steered.choices[0].text

        # Nothing a refused write asked for happened.
        assert user.get(f"/v1/steering/vectors/{name}-x").status_code == 404
        assert admin.delete(f"/v1/steering/vectors/{name}").status_code == 200


@pytest.mark.parametrize("key_source", ["keys file", "$STEER_ADMIN_API_KEY"])
def test_admin_key_writes_vectors_and_opens_inference(fleet, key_source):
    admin_key = ADMIN_KEY if key_source == "keys file" else ENV_ADMIN_KEY
    name = f"admin-{uuid.uuid4().hex[:8]}"
    with _http(fleet, admin_key) as admin:
        created = admin.post("/v1/steering/vectors", json=_vector_body(name))
        assert created.status_code == 201, created.text
        assert admin.get(f"/v1/steering/vectors/{name}").json()["id"] == created.json()["id"]
        assert admin.delete(f"/v1/steering/vectors/{name}").status_code == 200
    client = openai.OpenAI(base_url=fleet.url + "/v1", api_key=admin_key, max_retries=0, timeout=120)
    assert client.completions.create(model="tiny", prompt="Hello", max_tokens=2).choices[0].text


def test_the_role_check_reads_the_authorization_header_as_vllm_does(fleet):
    """The scheme in any case; a key under another scheme, or none, is no key."""
    name = f"scheme-{uuid.uuid4().hex[:8]}"
    with httpx.Client(base_url=fleet.url, timeout=120) as http:
        created = http.post("/v1/steering/vectors", json=_vector_body(name), headers={"Authorization": f"bearer {ADMIN_KEY}"})
        assert created.status_code == 201, created.text
        refused = http.delete(f"/v1/steering/vectors/{name}", headers={"Authorization": f"BEARER {FILE_INFERENCE_KEY}"})
        assert refused.status_code == 403 and "'inference' role" in refused.json()["error"]["message"]
        for header in (f"Basic {ADMIN_KEY}", ADMIN_KEY, "Bearer"):
            assert http.delete(f"/v1/steering/vectors/{name}", headers={"Authorization": header}).status_code == 401, header
        assert http.delete(f"/v1/steering/vectors/{name}", headers={"Authorization": f"Bearer {ADMIN_KEY}"}).status_code == 200


def test_unknown_keys_get_nothing(fleet):
    with _http(fleet, "not-a-key") as stranger, _http(fleet, None) as anonymous:
        for client in (stranger, anonymous):
            assert client.post("/v1/completions", json={"model": "tiny", "prompt": "x", "max_tokens": 1}).status_code == 401
            assert client.post("/v1/steering/vectors", json=_vector_body("nope")).status_code == 401
            assert client.get("/v1/steering/vectors").status_code == 401


def test_keys_from_the_file_appear_in_no_process_arguments_or_environment(fleet):
    processes = [p for p in Path("/proc").iterdir() if p.name.isdigit() and _session_of(p) == fleet.process.pid]
    assert len(processes) >= 4  # the launcher, two API processes, the engine core, the worker
    for process in processes:
        for view in ("cmdline", "environ"):
            try:
                text = (process / view).read_bytes()
            except OSError:
                continue  # exited meanwhile
            assert ADMIN_KEY.encode() not in text and FILE_INFERENCE_KEY.encode() not in text, (process, view)


def _session_of(process: Path) -> int | None:
    try:  # /proc/PID/stat: "pid (name) state ppid pgrp session ..."; the name may hold spaces
        return int((process / "stat").read_text().rsplit(")", 1)[1].split()[3])
    except (OSError, IndexError, ValueError):
        return None


# ---------------------------------------------------------------- metrics, multiprocess


def _metrics(fleet) -> dict[str, float]:
    with _http(fleet, None) as anonymous:  # /metrics is outside /v1: vLLM's key check does not guard it
        return metric_samples(anonymous.get("/metrics").text)


def test_steering_counters_sum_over_both_api_processes(fleet):
    vector = f"count-{uuid.uuid4().hex[:8]}"
    with _http(fleet, ADMIN_KEY) as admin:
        assert admin.post("/v1/steering/vectors", json=_vector_body(vector)).status_code == 201
    marker = uuid.uuid4().hex[:8]
    steered_key = 'steer_requests_total{endpoint="completions",mode="constant"}'
    operation_key = 'steer_operation_requests_total{endpoint="completions",operation="add"}'
    refused_key = 'steer_rejected_requests_total{reason="needs_admin_role",status="403"}'
    before = _metrics(fleet)
    clients, requests_per_client = 6, 3
    steered_requests = clients * requests_per_client

    def client_session(index: int) -> None:
        # Every request opens its own connection: the API processes share the listening
        # socket, and which one accepts a connection is the kernel's choice, so many
        # concurrent connections land on both.
        for i in range(requests_per_client):
            with _http(fleet, INFERENCE_KEY) as user:
                response = user.post("/v1/completions", headers={"X-Request-Id": f"{marker}-{index}-{i}"}, json={
                    "model": "tiny", "prompt": "The river", "max_tokens": 8,
                    "steering": {"mode": "constant", "additions": [{"vector": vector, "coeff": 1.0}]}})
                assert response.status_code == 200, response.text
                assert user.delete(f"/v1/steering/vectors/{vector}").status_code == 403

    with ThreadPoolExecutor(clients) as pool:
        list(pool.map(client_session, range(clients)))

    served_by = _api_processes_that_logged(fleet.log, marker)
    assert served_by == {"ApiServer_0", "ApiServer_1"}, f"the requests did not reach both API processes: {served_by}"
    for _ in range(6):  # whichever process answers the scrape reports the sum over both
        after = _metrics(fleet)
        assert after.get(steered_key, 0) - before.get(steered_key, 0) == steered_requests
        assert after.get(operation_key, 0) - before.get(operation_key, 0) == steered_requests
        assert after.get(refused_key, 0) - before.get(refused_key, 0) == steered_requests


def _api_processes_that_logged(log: Path, marker: str) -> set[str]:
    """Which API processes logged a steered request whose id carries ``marker`` (vLLM prefixes
    each log line with the process's name)."""
    pattern = re.compile(r"\((ApiServer_\d+) pid=\d+\).*steered request " + re.escape(marker))
    return {m.group(1) for m in map(pattern.search, log.read_text(errors="replace").splitlines()) if m}


# ---------------------------------------------------------------- Prometheus + the Grafana dashboard


@pytest.fixture(scope="module")
def prometheus(fleet, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    prometheus = start_prometheus(tmp_path_factory.mktemp("prometheus"), [fleet.url.removeprefix("http://")])
    try:
        yield prometheus.url
    finally:
        stop(prometheus)


def _traffic(fleet) -> None:
    """Steered requests with prompt additions (a capture, then cache hits), unsteered ones,
    and refusals of two kinds."""
    client = openai.OpenAI(base_url=fleet.url + "/v1", api_key=INFERENCE_KEY, max_retries=0, timeout=120)
    word = f" zq{uuid.uuid4().hex[:6]}"
    steering = {"additions": [{"prompt": word, "coeff": 2, "layer": 1}, {"prompt": " the", "coeff": -2, "layer": 1}]}
    for _ in range(3):
        client.completions.create(model="tiny", prompt="Some prompt to steer, long enough for the steering rows", max_tokens=2, extra_body={"steering": steering})
        client.completions.create(model="tiny", prompt="Some prompt", max_tokens=2)
    with _http(fleet, INFERENCE_KEY) as user:
        assert user.post("/v1/completions", json={"model": "tiny", "prompt": "x", "steering": {"additions": []}}).status_code == 400
        assert user.post("/v1/steering/vectors", json=_vector_body("nope")).status_code == 403


def _wait_for_samples(prometheus: str, expr: str) -> list[dict]:
    deadline = time.monotonic() + SCRAPE_WAIT_S
    while True:
        result = prometheus_query(prometheus, expr)
        if result or time.monotonic() > deadline:
            return result
        time.sleep(1)


def test_prometheus_scrapes_the_steering_series(fleet, prometheus):
    before = _metrics(fleet)
    _traffic(fleet)
    after = _metrics(fleet)
    expected = after['steer_requests_total{endpoint="completions",mode="actadd"}']
    assert expected - before.get('steer_requests_total{endpoint="completions",mode="actadd"}', 0) == 3
    # Prometheus reads back what /metrics said once it has scraped past the traffic.
    result = _wait_for_samples(prometheus, f'steer_requests_total{{endpoint="completions",mode="actadd"}} >= {expected}')
    assert [float(r["value"][1]) for r in result] == [expected]
    refused = prometheus_query(prometheus, "sum by (reason, status) (steer_rejected_requests_total)")
    reasons = {(r["metric"]["reason"], r["metric"]["status"]) for r in refused}
    assert {("invalid", "400"), ("needs_admin_role", "403")} <= reasons


def _dashboard_queries() -> list[tuple[str, str]]:
    dashboard = json.loads(DASHBOARD.read_text())
    return [(panel["title"], target["expr"]) for panel in dashboard["panels"] for target in panel.get("targets", [])]


def test_every_dashboard_query_returns_data(fleet, prometheus):
    """Each panel's PromQL, with Grafana's $__rate_interval as a window that covers the traffic,
    returns at least one sample with a number through the real Prometheus."""
    _traffic(fleet)
    _wait_for_samples(prometheus, "steer_capture_seconds_count > 0")
    queries = _dashboard_queries()
    assert len(queries) >= 9
    for title, expr in queries:
        expr = expr.replace("$__rate_interval", "5m")
        result = _wait_for_samples(prometheus, f"({expr}) >= 0")  # a number: NaN compares false
        assert result, f"panel {title!r}: no data for {expr}"
