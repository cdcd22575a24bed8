"""Real processes for the fleet tests (not a test module): tiny-model steer-server replicas,
nginx and Prometheus.

Replicas are started and stopped with the project's own ``steer_server.server_process``; each
serves a tiny model eagerly with a 64 MiB KV cache and ``INFERENCE_KEY`` as vLLM's ``--api-key``.
nginx and Prometheus run as the test user on free loopback ports, with every path they write (pid, logs,
temp files, the TSDB) in a temp dir, and are stopped by the caller (``stop``). Their configs
are the shipped ones (``deploy/nginx/steer-server.conf``, ``deploy/prometheus/prometheus.yml``)
with only the replicas' addresses, the listen port and the scrape interval changed.
"""
from __future__ import annotations

import contextlib
import os
import re
import shutil
import subprocess
import threading
import time
import uuid
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

import httpx
import pytest
import yaml
from prometheus_client.parser import text_string_to_metric_families

from steer_server import server_process
from steer_server.server_process import ServerProcess, free_port, stop

REPO = Path(__file__).resolve().parents[1]
SHIPPED_NGINX = REPO / "deploy" / "nginx" / "steer-server.conf"
SHIPPED_PROMETHEUS = REPO / "deploy" / "prometheus" / "prometheus.yml"
START_TIMEOUT_S = 30

INFERENCE_KEY = "inference-" + uuid.uuid4().hex  # every tiny server's vLLM --api-key
TINY_SERVER_ARGS = ["--enforce-eager", "--max-model-len", "512", "--kv-cache-memory-bytes", str(64 << 20),
                    "--served-model-name", "tiny", "--api-key", INFERENCE_KEY]
SERVER_START_TIMEOUT_S = 900  # generous: the machine is shared


def start_tiny_server(model_dir: str, workdir: Path, store: str, extra_args: Sequence[str] = (),
                      env: dict | None = None) -> ServerProcess:
    """`steer-server serve` on ``model_dir`` (served as "tiny", ``INFERENCE_KEY`` as its key)."""
    environment = dict(os.environ, **(env or {}))
    environment.pop("VLLM_PLUGINS", None)  # `steer-server serve` sets its own
    environment.pop("VLLM_CPU_KVCACHE_SPACE", None)  # the flag sizes the KV cache; vLLM lets the variable win
    return server_process.start_steer_server(
        ["--model", model_dir, "--store", store, *TINY_SERVER_ARGS, *extra_args],
        port=free_port(), log=workdir / "server.log", env=environment, timeout_s=SERVER_START_TIMEOUT_S)


_UPSTREAM_SERVER = re.compile(r"^(\s*server\s+)replica-\d+:\d+(\s)", re.MULTILINE)
_LISTEN = re.compile(r"^(\s*listen\s+)\d+;", re.MULTILINE)


def binary(name: str) -> str:
    path = shutil.which(name) or (f"/usr/sbin/{name}" if os.access(f"/usr/sbin/{name}", os.X_OK) else None)
    if path is None:
        pytest.skip(f"{name} is not installed (apt-get install {name})")
    return path


def nginx_config(workdir: Path, upstreams: list[str], listen_port: int) -> Path:
    """A main nginx.conf that includes the shipped snippet, its replicas replaced by ``upstreams``
    (host:port, as many as the snippet names) and its port by ``listen_port``."""
    workdir.mkdir(parents=True, exist_ok=True)
    snippet = SHIPPED_NGINX.read_text()
    shipped_servers = _UPSTREAM_SERVER.findall(snippet)
    assert len(shipped_servers) == len(upstreams), f"the shipped config names {len(shipped_servers)} replicas"
    addresses = iter(upstreams)
    snippet = _UPSTREAM_SERVER.sub(lambda m: f"{m.group(1)}{next(addresses)}{m.group(2)}", snippet)
    snippet, listens = _LISTEN.subn(rf"\g<1>127.0.0.1:{listen_port};", snippet)
    assert listens == 1, "the shipped config should listen once"
    (workdir / "steer-server.conf").write_text(snippet)
    temp_paths = "\n".join(f"    {kind}_temp_path {workdir / kind};" for kind in ("client_body", "proxy", "fastcgi", "uwsgi", "scgi"))
    main = workdir / "nginx.conf"
    main.write_text(
        ("user root;\n" if os.geteuid() == 0 else "")  # as root nginx would switch its workers to `nobody`
        + f"pid {workdir / 'nginx.pid'};\n"
        f"error_log {workdir / 'error.log'} info;\n"
        "worker_processes 1;\n"
        "events { worker_connections 256; }\n"
        "http {\n"
        f"    access_log {workdir / 'access.log'};\n"
        f"{temp_paths}\n"
        f"    include {workdir / 'steer-server.conf'};\n"
        "}\n"
    )
    return main


def nginx_check(config: Path) -> subprocess.CompletedProcess:
    """``nginx -t`` on ``config``."""
    return subprocess.run([binary("nginx"), "-t", "-c", str(config), "-p", str(config.parent), "-e", str(config.parent / "error.log")],
                          capture_output=True, text=True, timeout=60)


def start_nginx(config: Path, url: str) -> ServerProcess:
    command = [binary("nginx"), "-c", str(config), "-p", str(config.parent), "-e", str(config.parent / "error.log"),
               "-g", "daemon off;"]
    return server_process.start("nginx", command, url=url, ready=_answers(url + "/nginx-test-probe"),
                                log=config.parent / "nginx.out", timeout_s=START_TIMEOUT_S, poll_s=0.1)


def start_prometheus(workdir: Path, targets: list[str], scrape_interval: str = "1s") -> ServerProcess:
    """Prometheus with the shipped config, its targets replaced by ``targets`` (host:port) and
    its intervals by ``scrape_interval``."""
    workdir.mkdir(parents=True, exist_ok=True)
    settings = yaml.safe_load(SHIPPED_PROMETHEUS.read_text())
    settings["global"].update(scrape_interval=scrape_interval, evaluation_interval=scrape_interval)
    (job,) = settings["scrape_configs"]
    job["static_configs"] = [{"targets": targets}]
    config = workdir / "prometheus.yml"
    config.write_text(yaml.safe_dump(settings))
    url = f"http://127.0.0.1:{free_port()}"
    command = [binary("prometheus"), f"--config.file={config}", f"--storage.tsdb.path={workdir / 'tsdb'}",
               f"--web.listen-address={url.removeprefix('http://')}"]
    return server_process.start("prometheus", command, url=url, ready=_answers(url + "/-/ready", ok=200),
                                log=workdir / "prometheus.log", timeout_s=START_TIMEOUT_S, poll_s=0.1)


def _answers(url: str, ok: int | None = None):
    """Probe: ``url`` answers HTTP (with status ``ok`` when given)."""
    def ready() -> bool:
        try:
            status = httpx.get(url, timeout=2).status_code
        except httpx.HTTPError:
            return False
        return ok is None or status == ok

    return ready


def prometheus_query(url: str, expr: str) -> list[dict]:
    """An instant query through Prometheus's HTTP API: the result vector."""
    response = httpx.get(url + "/api/v1/query", params={"query": expr}, timeout=30)
    body = response.json()
    assert body.get("status") == "success", f"{expr}: {body}"
    return body["data"]["result"]


def metric_samples(text: str) -> dict[str, float]:
    """Prometheus text (a /metrics page) -> {'name{label="value",...}': value}, labels sorted;
    a label with an empty value is left out, as Prometheus stores it."""
    samples = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            labels = ",".join(f'{k}="{v}"' for k, v in sorted(sample.labels.items()) if v != "")
            samples[sample.name + (f"{{{labels}}}" if labels else "")] = sample.value
    return samples


@contextlib.contextmanager
def stream_held_open(client: httpx.Client, body: dict) -> Iterator[int]:
    """A streamed completion started with ``body`` and held open (its first event read, the rest
    unread until the block ends) while the with-block runs: the server is answering it all the
    while. Yields its HTTP status."""
    first_event, finish = threading.Event(), threading.Event()
    status: list[int] = []

    def hold() -> None:
        try:
            with client.stream("POST", "/v1/completions", json={**body, "stream": True}) as response:
                status.append(response.status_code)
                for _ in response.iter_lines():
                    first_event.set()
                    finish.wait(60)
        finally:
            first_event.set()

    holder = threading.Thread(target=hold)
    holder.start()
    try:
        assert first_event.wait(120) and status, "the held stream never started"
        yield status[0]
    finally:
        finish.set()
        holder.join(120)


def held_body(model: str, prompt: str, steering: dict) -> dict:
    """A steered completion for ``stream_held_open`` that keeps its ``steered_in_flight`` slot
    while held. The slot goes back once the server has sent the last byte, read or not, so it asks
    for 3 MB (16 sampled completions of 200 tokens, 20 log-probabilities each), more than the
    sockets buffer while nothing reads it. On a loaded machine, hold it up to 3 times still."""
    return {"model": model, "prompt": prompt, "n": 16, "max_tokens": 200, "ignore_eos": True, "logprobs": 20,
            "temperature": 1.0, "steering": steering}


def after_the_slot_returns(send: Callable[[], httpx.Response], within_s: float = 20.0) -> httpx.Response:
    """``send()`` repeated while it is refused for ``steered_in_flight``, for up to ``within_s``:
    a held request's slot goes back just after its last byte is sent, so the next request can
    still meet it for a moment."""
    deadline = time.monotonic() + within_s
    while True:
        response = send()
        if response.status_code != 429 or "steered_in_flight" not in response.text or time.monotonic() > deadline:
            return response
        time.sleep(0.2)
