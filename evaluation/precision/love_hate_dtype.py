"""The Love - Hate paper smoke's requests (2 x 16 hostile openings x 8 samples x 40 tokens)
against a default-model server started with the given --dtype ("auto": none given, vLLM's
choice before steer-server chose float32 on CPUs without bfloat16 instructions): wall time,
then the mean VADER sentiment unsteered and steered.

    python evaluation/precision/love_hate_dtype.py float32
    python evaluation/precision/love_hate_dtype.py bfloat16
"""
from __future__ import annotations

import os
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx

from steer_server import server_process
from steer_server.measure.data import hostile_prompts
from steer_server.measure.metrics import sentiment

BOS = "<|endoftext|>"
STEERING = {"additions": [{"prompt": BOS + "Love", "coeff": 5, "layer": 0},
                          {"prompt": BOS + "Hate", "coeff": -5, "layer": 0}]}


def main(dtype: str) -> None:
    workdir = Path(tempfile.mkdtemp(prefix=f"dtype-{dtype}-"))
    args = ["--enforce-eager", "--store", str(workdir / "store"), "--max-model-len", "2048", "--seed", "0",
            "--dtype", dtype]
    server = server_process.start_steer_server(args, port=server_process.free_port(), log=workdir / "server.log",
                                               env=dict(os.environ, VLLM_CPU_KVCACHE_SPACE="1"), timeout_s=900)
    try:
        def sample(job):
            prompt, steering = job
            body = {"model": "SmolLM2-135M-Instruct", "prompt": BOS + prompt, "n": 8, "max_tokens": 40,
                    "temperature": 1.0, "top_p": 0.3, "repetition_penalty": 1.2}
            if steering:
                body["steering"] = steering
            response = httpx.post(server.url + "/v1/completions", json=body, timeout=3600)
            response.raise_for_status()
            return [choice["text"] for choice in response.json()["choices"]]

        jobs = [(prompt, steering) for steering in (None, STEERING) for prompt in hostile_prompts()]
        started = time.perf_counter()
        with ThreadPoolExecutor(len(jobs)) as pool:
            texts = list(pool.map(sample, jobs))
        print(f"{dtype}: {time.perf_counter() - started:.0f} s; generation throughput in {workdir / 'server.log'}")
        half = len(jobs) // 2
        for label, part in (("unsteered", texts[:half]), ("steered", texts[half:])):
            flat = [text for group in part for text in group]
            print(f"{label}: mean VADER {sum(map(sentiment, flat)) / len(flat):+.3f}")
    finally:
        server_process.stop(server)


if __name__ == "__main__":
    main(sys.argv[1])
