"""One process that starts engines one after another, for tests that only need an engine's
outputs (not a test module).

An offline ``vllm.LLM`` normally spawns an EngineCore process and a Worker process, each
importing vLLM and torch again: ~25 s per start here, most of it imports, and ~6 s to stop.
The host imports them once, and runs each engine in-process (vLLM's own
``VLLM_ENABLE_V1_MULTIPROCESSING=0`` mode: engine core and worker in this one process, the
same model runner, plugin hooks and kernels): ~5 s per start after the first. The tests keep
their engines' settings and compare what comes back with the reference in the pytest process;
the multiprocess topology itself stays covered by the other engine tests, which start their
engines with ``start_llm`` in the pytest process.

It is its own process (not the pytest process) because vLLM's CPU worker binds the OpenMP
threads and the memory of the process it runs in to its cores, which every process pytest
spawns afterwards (every server of the suite) would inherit.
"""
from __future__ import annotations

import multiprocessing
import os
import traceback
from typing import Any

# What conftest.start_llm starts, before its overrides.
ENGINE_SETTINGS = dict(dtype="float32", enforce_eager=True, enable_prefix_caching=True, max_model_len=256,
                       max_num_seqs=8, seed=0)
REPLY_TIMEOUT_S = 900  # one engine's start, compile and run on a loaded 2-core machine


def run_engine(request: dict) -> dict:
    """In the host: start an engine of ``request["model_dir"]`` with ``ENGINE_SETTINGS`` and
    ``request["overrides"]``, generate ``request["prompt"]`` once per steering payload in one
    batch (greedy, ``max_tokens``), optionally capture residuals at ``capture_layers`` and run
    the payload ``again`` alone; stop the engine. Tensors come back as numpy arrays."""
    from helpers import generate, params, tokens_and_logprobs

    from steer_server.check import start_offline_engine, stop_offline_engine

    prompt, max_tokens = request["prompt"], request["max_tokens"]
    llm = start_offline_engine(request["model_dir"], **{**ENGINE_SETTINGS, **request.get("overrides", {})})
    try:
        sampling = [params(max_tokens, payload) for payload in request["payloads"]]
        outputs = generate(llm, [prompt] * len(sampling), sampling)
        reply: dict[str, Any] = {"outputs": [tokens_and_logprobs(output) for output in outputs]}
        if request.get("capture_layers"):
            from steer_vllm.capture import capture_residuals

            [got] = capture_residuals(llm, [prompt], list(request["capture_layers"]))
            reply["captures"] = {layer: got[layer].detach().cpu().numpy() for layer in request["capture_layers"]}
        if request.get("again") is not None:
            again = generate(llm, [prompt], params(max_tokens, request["again"]))[0]
            reply["again"] = tokens_and_logprobs(again)
        return reply
    finally:
        stop_offline_engine(llm)


def _serve(conn, env: dict[str, str]) -> None:
    os.environ.update(env)
    while True:
        request = conn.recv()
        if request is None:
            return
        try:
            conn.send(("ok", run_engine(request)))
        except BaseException:  # noqa: BLE001  (the test reports it)
            conn.send(("error", traceback.format_exc()))


class EngineHost:
    """The pytest side: ``run(request)`` -> ``run_engine``'s reply, computed in the host."""

    def __init__(self, env: dict[str, str]):
        self.env = {**env, "VLLM_ENABLE_V1_MULTIPROCESSING": "0"}
        self._process = None
        self._conn = None

    def _start(self) -> None:
        context = multiprocessing.get_context("spawn")
        self._conn, child = context.Pipe()
        self._process = context.Process(target=_serve, args=(child, self.env), name="engine-host", daemon=True)
        self._process.start()
        child.close()

    def run(self, request: dict) -> dict:
        if self._process is None or not self._process.is_alive():
            self._start()
        self._conn.send(request)
        if not self._conn.poll(REPLY_TIMEOUT_S):
            self.close()
            raise TimeoutError(f"the engine host did not answer within {REPLY_TIMEOUT_S} s")
        try:
            status, reply = self._conn.recv()
        except EOFError:
            code = self._process.exitcode
            self._process = None
            raise RuntimeError(f"the engine host died (exit code {code})") from None
        if status != "ok":
            raise RuntimeError("in the engine host:\n" + reply)
        return reply

    def close(self) -> None:
        if self._process is None:
            return
        if self._process.is_alive():
            try:
                self._conn.send(None)
            except OSError:
                pass
            self._process.join(timeout=10)
            if self._process.is_alive():
                self._process.kill()
                self._process.join()
        self._process = None
