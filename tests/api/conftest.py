"""ONE real `steer-server serve` process for the whole tests/api session.

It serves the default model (SmolLM2-135M-Instruct) eagerly on a free loopback port with
an `--api-key` (so every test also exercises vLLM's auth in front of our routes), a fresh
vector store in a temp dir, prefix caching on (vLLM's default) and prompt-token details
in `usage` (a vLLM flag passed through). Tests reach it with the real openai SDK and httpx.
"""
from __future__ import annotations

import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import openai
import pytest

from shared_starts import close_with_group
from steer_server import server_process
from steer_server.server_process import ServerProcess
from steer_server.server_process import free_port as free_loopback_port  # noqa: F401  (tests import it from here)

API_KEY = "test-key-4d1f"
MAX_ADDITIONS = 8
MAX_BODY_BYTES = 2_000_000
TABLE_ROWS = 6000
STARTUP_TIMEOUT_S = 900  # a loaded 2-core machine can take minutes


@dataclass(frozen=True)
class Server:
    url: str  # http://127.0.0.1:PORT
    api_key: str
    model: str  # served model name
    store: Path
    log: Path

    @property
    def base_url(self) -> str:
        return self.url + "/v1"


def session_args(store: Path) -> list[str]:
    """The session server's flags (besides host, port, --enforce-eager and --api-key)."""
    return [
        "--store", str(store),
        "--max-additions", str(MAX_ADDITIONS),
        "--max-body-bytes", str(MAX_BODY_BYTES),
        "--steering-table-rows", str(TABLE_ROWS),
        # vLLM's own flags, passed through:
        "--enable-prompt-tokens-details", "--max-model-len", "2048", "--seed", "0",
    ]


@pytest.fixture(scope="session")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    reuse = os.environ.get("STEER_API_TEST_URL")  # a server already started with session_args()
    if reuse:
        models = httpx.get(reuse + "/v1/models", headers={"Authorization": f"Bearer {API_KEY}"}).json()
        yield Server(url=reuse, api_key=API_KEY, model=models["data"][0]["id"], store=Path(os.environ["STEER_API_TEST_STORE"]), log=Path("/dev/null"))
        return
    workdir = tmp_path_factory.mktemp("steer-server")
    store, log = workdir / "store", workdir / "server.log"
    running = start_steer_server(log, session_args(store))
    close_with_group("server", lambda: stop_steer_server(running))
    try:
        models = httpx.get(running.url + "/v1/models", headers={"Authorization": f"Bearer {API_KEY}"}).json()
        yield Server(url=running.url, api_key=API_KEY, model=models["data"][0]["id"], store=store, log=log)
    finally:
        stop_steer_server(running)


@dataclass
class RunningServer(ServerProcess):
    """A `steer-server serve` process started by a test module (not the session's server)."""

    def engine_pid(self) -> int:
        """The EngineCore process under this server (vLLM names it ``VLLM::EngineCore``)."""
        import psutil

        for child in psutil.Process(self.process.pid).children(recursive=True):
            if "EngineCore" in child.name() or any("EngineCore" in part for part in child.cmdline()):
                return child.pid
        raise RuntimeError("no EngineCore process under the server")


def start_steer_server(log: Path, args: list[str], env: dict | None = None, port: int | None = None) -> RunningServer:
    """`steer-server serve ARGS` on ``port`` (default: a free one) with the test API key (unless
    ARGS give a keys file, which then holds it), eager; waits for /health."""
    env = dict(os.environ, VLLM_CPU_KVCACHE_SPACE="1", **(env or {}))
    env.pop("VLLM_PLUGINS", None)
    key_args = [] if "--api-keys-file" in args else ["--api-key", API_KEY]
    started = server_process.start_steer_server(["--enforce-eager", *key_args, *args],
                                                port=port or free_loopback_port(), log=log, env=env,
                                                timeout_s=STARTUP_TIMEOUT_S)
    return RunningServer(started.name, started.url, started.process, started.log, started.start_s)


def stop_steer_server(server: RunningServer) -> None:
    server_process.stop(server)


def sdk_client(server: Server) -> openai.OpenAI:
    return openai.OpenAI(base_url=server.base_url, api_key=server.api_key, max_retries=0, timeout=300)


def http_client(server: Server, api_key: str | None = None) -> httpx.Client:
    """Raw HTTP with ``api_key`` (default: the server's), for bodies the SDK will not send."""
    return httpx.Client(base_url=server.url, headers={"Authorization": f"Bearer {api_key or server.api_key}"},
                        timeout=300)


@pytest.fixture(scope="session")
def client(server: Server) -> openai.OpenAI:
    return sdk_client(server)


@pytest.fixture(scope="session")
def http(server: Server) -> Iterator[httpx.Client]:
    """Authenticated raw HTTP (for bodies the SDK will not send, and the vector routes)."""
    with http_client(server) as c:
        yield c


@dataclass
class TinyServer:
    """The session's tiny server; ``running`` is the process now serving it (a test that
    kills it starts another on the same port and store, and puts it here)."""

    url: str
    api_key: str
    model: str
    store: Path
    log: Path
    model_dir: str
    running: RunningServer

    @property
    def base_url(self) -> str:
        return self.url + "/v1"


TINY_MAX_DOSE = 3.0
# The tiny server's keys: API_KEY is the default tenant's admin; more tenants, each with an admin
# and an inference key (tests/api/test_api_tenants.py); team-q and team-r have quotas
# (QUOTAS, tests/api/test_api_quotas.py), the others none.
TENANT_KEYS = {
    "team-a": {"admin": "a-admin-5c1e", "inference": "a-inference-77d0"},
    "team-b": {"admin": "b-admin-0f3a", "inference": "b-inference-e914"},
    "team-q": {"admin": "q-admin-81b2", "inference": "q-inference-3d6c"},
    "team-r": {"admin": "r-admin-c47e", "inference": "r-inference-59a1"},
}
QUOTAS = {
    "team-q": {"vectors": 3, "capture_tokens_per_minute": 60, "steered_in_flight": 1},
    "team-r": {"bytes": 1000},
}


def tiny_server_args(model_dir: str, store: Path) -> list[str]:
    """A tiny random Llama in float32 (where the engine and transformers agree to float32
    rounding, so comparisons with the reference can be tight), with the tenants' keys and
    quotas files (written beside the store)."""
    keys, quotas = store.parent / "keys", store.parent / "quotas"
    keys.write_text(f"admin {API_KEY}\n" + "".join(
        f"{role} {key} {tenant}\n" for tenant, roles in TENANT_KEYS.items() for role, key in roles.items()))
    quotas.write_text("".join(f"{tenant} " + " ".join(f"{quota}={limit}" for quota, limit in limits.items()) + "\n"
                              for tenant, limits in QUOTAS.items()))
    return ["--model", model_dir, "--store", str(store), "--dtype", "float32", "--max-model-len", "256",
            "--max-dose", str(TINY_MAX_DOSE), "--seed", "0", "--api-keys-file", str(keys), "--metrics-tenant-label",
            "--quotas-file", str(quotas)]


@pytest.fixture(scope="session")
def tiny_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[TinyServer]:
    """ONE server of a tiny random Llama for the modules that compare with the transformers
    reference (pairs, doses, schedules, calibration)."""
    from models import make_tiny_llama

    workdir = tmp_path_factory.mktemp("tiny-server")
    model_dir = make_tiny_llama(workdir / "llama")
    store, log = workdir / "store", workdir / "server.log"
    running = start_steer_server(log, tiny_server_args(model_dir, store))
    served = TinyServer(url=running.url, api_key=API_KEY, model=model_dir, store=store, log=log, model_dir=model_dir,
                        running=running)
    close_with_group("tiny_server", lambda: stop_steer_server(served.running))
    try:
        yield served
    finally:
        stop_steer_server(served.running)
