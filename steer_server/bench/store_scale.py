"""The store at scale: steered TTFT with names resolved from a store of 100,000 vectors, against
the same server on an empty store, and what a listing page and a name lookup cost there.

For each backend (SQLite, Redis) two stores are made: *empty* holds only the few vectors the
requests steer with, *full* holds the same plus N filler vectors (several name prefixes standing
in for teams, a tenth unnamed as computed vectors are). A steer server is started on each, both
running at once, and rounds alternate between them (E F, F E, ...): each round sends Q streamed
one-token completions, one after another, each steered by a name no server has resolved before
(so every request resolves its name from the store; the vectors' tensors are cached after their
first use, as in steady serving), alternating with Q unsteered ones. The figure is the ratio of
full's median steered TTFT to empty's, with a 95 % bootstrap interval over rounds and the
per-round ratios' range; the same ratio divided by the unsteered one removes what the two
servers differ by without any name to resolve. Listing a page (first and deep,
all and named only) and ``names_of`` are timed in process against both stores, and a page is
also fetched through each server's route.

The filler is written in bulk (one SQLite transaction; Redis pipelines) into exactly the rows,
files and keys the stores' own ``put``/``set_name`` write (``tests/bench/test_bench_store_scale.py``
compares the two).

    python -m steer_server.bench.store_scale --vectors 100000 --json bench-out/store-scale.json
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import random
import sqlite3
import statistics
import sys
import tempfile
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import httpx
import numpy as np
import redis
import torch

from steer_server.bench import BenchError
from steer_server.bench.servers import STORES, ServerOptions, Store, running_server
from steer_server.bench.vectors import steering_field
from steer_server.client import VECTORS_PATH, auth_headers, error_message
from steer_server.server_process import ServerStartError, start_redis, stop
from vector_store import StoredVector, VectorMeta, open_store
from vector_store.base import VectorStore, order_key
from vector_store.codec import EncodedVector, encode
from vector_store.redis import LAYOUT, RedisVectorStore
from vector_store.sqlite import SqliteVectorStore

PROMPT = "The museum opens at nine in the morning and"
STEERING_VECTORS = 4  # distinct contents the requests steer with (cached after first use)


# ---------------------------------------------------------------- filling a store


def filler(count: int, hidden: int, layer: int, teams: int, seed: int = 0) -> tuple[list[StoredVector], dict[str, str]]:
    """``count`` random constant vectors, created one millisecond apart a day ago, and their names:
    ``team<t>.v<i>`` for nine in ten, spread over ``teams`` prefixes (the rest unnamed)."""
    rng = np.random.default_rng(seed)
    start = time.time() - 86400
    vectors, names = [], {}
    for i in range(count):
        direction = torch.from_numpy(rng.standard_normal((1, hidden), dtype=np.float32))
        vectors.append(StoredVector(VectorMeta("bench-filler", hidden, "constant", "upload", {}, start + i * 1e-3),
                                    {layer: direction}))
        if i % 10:
            names[f"team{i % teams}.v{i}"] = vectors[-1].content_id
    return vectors, names


def fill_sqlite(store: SqliteVectorStore, entries: list[EncodedVector], names: dict[str, str]) -> None:
    """The rows and blob files ``put`` and ``set_name`` write, in one transaction (the blobs
    unsynced: a bench's fill, not data to keep)."""
    with contextlib.closing(sqlite3.connect(store.index_path, isolation_level=None)) as connection:
        connection.execute("BEGIN IMMEDIATE")
        for entry in entries:
            (store.blob_dir / f"{entry.content_id}.safetensors").write_bytes(entry.tensor_bytes)
        connection.executemany(
            "INSERT INTO vectors (content_id, meta, created, blob, blob_sha256, shapes) VALUES (?, ?, ?, ?, ?, ?)",
            [(e.content_id, e.meta_json, e.created, f"{e.content_id}.safetensors", e.tensor_sha256, e.shapes_json)
             for e in entries])
        connection.executemany("INSERT INTO names (name, content_id) VALUES (?, ?)", names.items())  # triggers count them
        connection.execute("COMMIT")


def fill_redis(store: RedisVectorStore, entries: list[EncodedVector], names: dict[str, str], batch: int = 2000) -> None:
    """The keys ``put`` and ``set_name`` write, pipelined in batches."""
    names_of: dict[str, list[str]] = {}
    for name, content_id in names.items():
        names_of.setdefault(content_id, []).append(name)
    client = redis.Redis.from_url(store.url)
    for first in range(0, len(entries), batch):
        with client.pipeline(transaction=False) as pipe:
            for entry in entries[first:first + batch]:
                order = order_key(entry.created, entry.content_id)
                pipe.hset(store._vector_key(entry.content_id), mapping={  # noqa: SLF001 - the layout put writes
                    "meta": entry.meta_json, "tensors": entry.tensor_bytes, "sha256": entry.tensor_sha256,
                    "shapes": entry.shapes_json})
                pipe.sadd(store._ids_key, entry.content_id)  # noqa: SLF001
                pipe.hset(store._order_of_key, entry.content_id, order)  # noqa: SLF001
                pipe.zadd(store._order_key, {order: 0})  # noqa: SLF001
                pointing = names_of.get(entry.content_id)
                if pointing:
                    pipe.hset(store._names_key, mapping=dict.fromkeys(pointing, entry.content_id))  # noqa: SLF001
                    pipe.sadd(store._names_of_key(entry.content_id), *pointing)  # noqa: SLF001
                    pipe.zadd(store._named_key, {order: 0})  # noqa: SLF001
            pipe.execute()
    client.set(store._layout_key, LAYOUT)  # noqa: SLF001


def fill(store: VectorStore, vectors: list[StoredVector], names: dict[str, str]) -> None:
    """What ``put`` of every vector and ``set_name`` of every name leave in ``store``, written in bulk."""
    entries = [encode(vector) for vector in vectors]
    if isinstance(store, SqliteVectorStore):
        fill_sqlite(store, entries, names)
    else:
        fill_redis(store, entries, names)


class ModelShape:
    def __init__(self, model_dir: str, cache_home: str) -> None:
        from vector_store.keys import model_fingerprint

        config = json.loads((Path(model_dir) / "config.json").read_text())
        self.hidden = int(config["hidden_size"])
        self.layers = int(config["num_hidden_layers"])
        self.fingerprint = model_fingerprint(model_dir, cache_home=cache_home)


def add_steering_names(store: VectorStore, model: ModelShape, count: int, layer: int) -> list[str]:
    """The vectors requests steer with, through the store's own writes, and ``count`` names for
    them (one per request), the same in every store."""
    generator = torch.Generator().manual_seed(1)
    ids = []
    for _ in range(STEERING_VECTORS):
        direction = torch.randn(1, model.hidden, generator=generator)
        ids.append(store.put(StoredVector(VectorMeta(model.fingerprint, model.hidden, "constant"),
                                          {layer: direction / direction.norm()})))
    names = [f"bench.r{i}" for i in range(count)]
    for i, name in enumerate(names):
        store.set_name(name, ids[i % STEERING_VECTORS])
    return names


# ---------------------------------------------------------------- measuring


def median_ms(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        fn()
        times.append((time.perf_counter() - started) * 1e3)
    return statistics.median(times)


def store_timings(store: VectorStore, deep_cursor: str | None, some_id: str, repeats: int) -> dict:
    """Median ms of a listing page (100) first and deep in the store, all and named only, and names_of."""
    return {
        "first_page_ms": median_ms(lambda: store.listing_page(100), repeats),
        "first_named_page_ms": median_ms(lambda: store.listing_page(100, named_only=True), repeats),
        "deep_page_ms": median_ms(lambda: store.listing_page(100, deep_cursor), repeats),
        "deep_named_page_ms": median_ms(lambda: store.listing_page(100, deep_cursor, named_only=True), repeats),
        "names_of_ms": median_ms(lambda: store.names_of(some_id), repeats),
    }


def ttft_ms(http: httpx.Client, served: str, name: str | None, coeff: float) -> float:
    """TTFT of one streamed one-token completion, steered by the vector ``name`` (None: unsteered)."""
    body = {"model": served, "prompt": PROMPT, "max_tokens": 1, "stream": True, "cache_salt": uuid.uuid4().hex}
    if name is not None:
        body["steering"] = steering_field(name, "constant", coeff)
    started = time.perf_counter()
    first = None
    with http.stream("POST", "/v1/completions", json=body) as response:
        if response.status_code != 200:
            response.read()
            raise BenchError(f"a request was refused: HTTP {response.status_code}: {error_message(response)}")
        for line in response.iter_lines():
            if first is None and line.startswith("data: ") and line != "data: [DONE]":
                first = time.perf_counter()
    if first is None:
        raise BenchError("a request streamed no token")
    return (first - started) * 1e3


def ttft_ratios(samples: dict, draws: int = 2000, seed: int = 0) -> dict:
    """Full's median TTFT over empty's, steered, and the same divided by the unsteered ratio (what
    the two servers differ by without any name to resolve), each with a 95 % bootstrap interval
    resampling whole rounds. ``samples[kind][store]``: one list of TTFTs per round."""
    rounds = len(samples["steered"]["full"])

    def ratios(picked: list[int]) -> tuple[float, float]:
        def median(kind: str, which: str) -> float:
            return statistics.median(x for i in picked for x in samples[kind][which][i])

        steered = median("steered", "full") / median("steered", "empty")
        return steered, steered / (median("unsteered", "full") / median("unsteered", "empty"))

    point = ratios(list(range(rounds)))
    rng = random.Random(seed)
    resampled = [ratios([rng.randrange(rounds) for _ in range(rounds)]) for _ in range(draws)]
    result = {}
    for index, key in enumerate(("steered", "steered_over_unsteered")):
        values = sorted(r[index] for r in resampled)
        result[key] = {"median": point[index], "interval95": [values[int(0.025 * draws)], values[int(0.975 * draws) - 1]]}
    per_round = [ratios([i])[0] for i in range(rounds)]
    result["steered"].update(per_round_min=min(per_round), per_round_max=max(per_round))
    return result


# ---------------------------------------------------------------- one backend


@contextlib.contextmanager
def store_pair(backend: str, workdir: Path) -> Iterator[tuple[str, str]]:
    """Locations of an empty and a (to be) full store: two SQLite directories, or two dbs of one redis-server."""
    if backend == "sqlite":
        yield str(workdir / "empty"), str(workdir / "full")
        return
    try:
        server = start_redis(workdir / "redis")
    except ServerStartError as exc:
        raise BenchError(str(exc)) from None
    try:
        yield server.url, server.url.removesuffix("/0") + "/1"
    finally:
        stop(server)


def measure_backend(backend: str, args: argparse.Namespace, model: ModelShape, vectors: list[StoredVector],
                    filler_names: dict[str, str], workdir: Path) -> dict:
    workdir.mkdir(parents=True, exist_ok=True)
    per_server = args.rounds * args.requests + args.warmup
    with store_pair(backend, workdir) as (empty_location, full_location):
        empty, full = open_store(empty_location), open_store(full_location)
        started = time.perf_counter()
        fill(full, vectors, filler_names)
        fill_s = time.perf_counter() - started
        names = add_steering_names(empty, model, per_server, args.layer)
        assert add_steering_names(full, model, per_server, args.layer) == names
        middle = vectors[len(vectors) // 2]
        deep = order_key(middle.meta.created, middle.content_id)
        some_id = vectors[len(vectors) // 3 + 1].content_id  # a named one
        result: dict = {"fill_s": fill_s, "store": {
            "empty": store_timings(empty, None, some_id, args.timing_repeats),
            "full": store_timings(full, deep, some_id, args.timing_repeats)}}

        options = ServerOptions(model=args.model, enforce_eager=args.enforce_eager, kv_cache_gib=1,
                                startup_timeout_s=args.startup_timeout)
        with contextlib.ExitStack() as servers:
            running = {which: servers.enter_context(running_server(
                "steer", options, store=Store(location, backend), log=workdir / f"server-{which}.log"))
                for which, location in (("empty", empty_location), ("full", full_location))}
            served = options.model_and_name()[1]
            clients = {which: servers.enter_context(httpx.Client(base_url=server.url, timeout=300,
                                                                 headers=auth_headers(server.api_key)))
                       for which, server in running.items()}
            pending = {which: iter(names) for which in running}
            for which, http in clients.items():  # warm-up: compile paths, load the steering vectors
                for _ in range(args.warmup):
                    ttft_ms(http, served, next(pending[which]), args.coeff)
            samples: dict = {kind: {"empty": [], "full": []} for kind in ("steered", "unsteered")}
            for i in range(args.rounds):
                for which in (("empty", "full") if i % 2 == 0 else ("full", "empty")):
                    for kind in samples:
                        samples[kind][which].append([])
                    for _ in range(args.requests):  # steered and unsteered alternate
                        samples["steered"][which][-1].append(
                            ttft_ms(clients[which], served, next(pending[which]), args.coeff))
                        samples["unsteered"][which][-1].append(ttft_ms(clients[which], served, None, args.coeff))
            result["route_page_ms"] = {
                which: median_ms(lambda http=http: http.get(VECTORS_PATH, params={"limit": 100}).raise_for_status(),
                                 args.timing_repeats) for which, http in clients.items()}
        result["ttft"] = {kind: {which: {"median_ms": statistics.median(pooled), "p90_ms": float(np.percentile(pooled, 90)),
                                         "n": len(pooled)}
                                 for which, rounds in by_store.items() for pooled in [[x for r in rounds for x in r]]}
                          for kind, by_store in samples.items()}
        result["ttft_ratio"] = ttft_ratios(samples)
        result["rounds_ms"] = samples
        result["stored"] = {"empty": STEERING_VECTORS, "full": len(vectors) + STEERING_VECTORS}
    return result


def print_summary(backend: str, result: dict) -> None:
    ratio, normalized = result["ttft_ratio"]["steered"], result["ttft_ratio"]["steered_over_unsteered"]
    steered, unsteered = result["ttft"]["steered"], result["ttft"]["unsteered"]
    print(f"{backend}: filled in {result['fill_s']:.1f} s; steered TTFT p50 full/empty "
          f"{steered['full']['median_ms']:.1f}/{steered['empty']['median_ms']:.1f} ms, ratio {ratio['median']:.3f} "
          f"(95% {ratio['interval95'][0]:.3f}..{ratio['interval95'][1]:.3f}; rounds {ratio['per_round_min']:.3f}.."
          f"{ratio['per_round_max']:.3f}) -> {'PASS' if ratio['interval95'][1] <= 1.05 else 'CHECK'} (within 5%); "
          f"unsteered p50 full/empty {unsteered['full']['median_ms']:.1f}/{unsteered['empty']['median_ms']:.1f} ms; "
          f"steered ratio / unsteered ratio {normalized['median']:.3f} "
          f"(95% {normalized['interval95'][0]:.3f}..{normalized['interval95'][1]:.3f})")
    for which in ("empty", "full"):
        timings = ", ".join(f"{key.removesuffix('_ms')} {value:.2f} ms" for key, value in result["store"][which].items())
        print(f"  {which}: {timings}; GET page through the server {result['route_page_ms'][which]:.1f} ms")


def main(argv: list[str] | None = None) -> int:
    from steer_server.bench.report import machine_info, write_json
    from steer_server.settings import load_settings

    p = argparse.ArgumentParser(prog="python -m steer_server.bench.store_scale", description=__doc__.split("\n\n")[0])
    p.add_argument("--vectors", type=int, default=100_000, help="filler vectors in the full store (default: %(default)s)")
    p.add_argument("--teams", type=int, default=8, help="name prefixes among them (default: %(default)s)")
    p.add_argument("--stores", nargs="+", choices=STORES, default=list(STORES))
    p.add_argument("--rounds", type=int, default=12, help="rounds, alternating E F / F E (default: %(default)s)")
    p.add_argument("--requests", type=int, default=20, help="steered requests per server and round (default: %(default)s)")
    p.add_argument("--warmup", type=int, default=8, help="untimed steered requests per server (default: %(default)s)")
    p.add_argument("--timing-repeats", type=int, default=30, help="repeats of each page/names_of timing")
    p.add_argument("--layer", type=int, default=1, help="layer the steering vectors add at (default: %(default)s)")
    p.add_argument("--coeff", type=float, default=4.0)
    p.add_argument("--model", help="Hugging Face model directory (default: the embedded SmolLM2-135M-Instruct)")
    p.add_argument("--enforce-eager", action="store_true")
    p.add_argument("--startup-timeout", type=float, default=900)
    p.add_argument("--workdir", help="stores and server logs (default: a new temporary directory)")
    p.add_argument("--json", metavar="PATH", help="write everything measured as JSON")
    args = p.parse_args(argv)

    data: dict = {"kind": "steer-server store scale", "machine": machine_info(), "argv": sys.argv, "backends": {}}
    try:
        model_dir = ServerOptions(model=args.model).model_and_name()[0]
        model = ModelShape(model_dir, load_settings().cache_home)
        started = time.perf_counter()
        vectors, names = filler(args.vectors, model.hidden, args.layer, args.teams)
        data["make_s"] = time.perf_counter() - started
        workdir = Path(args.workdir or tempfile.mkdtemp(prefix="steer-store-scale-"))
        for backend in args.stores:
            data["backends"][backend] = measure_backend(backend, args, model, vectors, names, workdir / backend)
            print_summary(backend, data["backends"][backend])
    except BenchError as exc:
        print(f"store scale: {exc}", file=sys.stderr)
        return 1
    data["machine"]["load_avg_end"] = list(os.getloadavg())
    if args.json:
        write_json(args.json, data)
    return 0


if __name__ == "__main__":
    sys.exit(main())
