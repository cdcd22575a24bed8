"""The store at scale: steered TTFT with names resolved from a store of 100,000 vectors held by
several tenants, against the same server on an empty store, and what a tenant's listing page,
name lookup and usage cost there.

For each backend (SQLite, Redis) two stores are made: *empty* holds only the few vectors the
requests steer with, referenced and named by one tenant that is not the default one (the
*bench tenant*); *full* holds the same plus N filler vectors spread over T tenants (the default
one and ``team1``..; vector i belongs to tenant i mod T, and one in twenty of each tenant's is
also referenced by the next tenant, so that content is stored once and shared), each tenant
naming nine in ten of its references ``lib.v<j>`` by its own count j (so the same names exist
in every tenant, pointing at different vectors; the rest stay unnamed as computed vectors
are). A steer server is started on each store, both running at once, with an API keys file
that puts the key the requests use in the bench tenant (``inference KEY TENANT``), so each
steered request resolves its name as that tenant. Rounds alternate between the servers
(E F, F E, ...): each round sends Q streamed one-token completions, one after another, each
steered by a name no server has resolved before (so every request resolves its name from the
store; the vectors' tensors are cached after their first use, as in steady serving),
alternating with Q unsteered ones. The figure is the ratio of full's median steered TTFT to
empty's, with a 95 % bootstrap interval over rounds and the per-round ratios' range; the same
ratio divided by the unsteered one removes what the two servers differ by without any name to
resolve. In process, for every tenant of the full store (and the bench tenant of the empty
one): a listing page (first and half-way through the tenant's vectors, all and named only),
``names_of`` of a shared vector, ``resolve`` of a name and ``usage`` are timed, and their
answers checked against what the fill wrote; a page is also fetched through each server's
route as the bench tenant (and checked to be that tenant's), and a steered request by a bench
tenant's name sent with the default tenant's key is checked to be refused.

The filler is written in bulk (one SQLite transaction; Redis pipelines) into exactly the rows,
files and keys the stores' own ``put``/``add_reference``/``set_name`` write
(``tests/bench/test_bench_store_scale.py`` compares the two).

    python -m steer_server.bench.store_scale --vectors 100000 --tenants 8 --json bench-out/store-scale.json
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
from typing import NamedTuple

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
from vector_store.base import DEFAULT_TENANT, VectorStore, order_key
from vector_store.codec import EncodedVector, encode
from vector_store.redis import LAYOUT, RedisVectorStore
from vector_store.sqlite import SqliteVectorStore

PROMPT = "The museum opens at nine in the morning and"
STEERING_VECTORS = 4  # distinct contents the requests steer with (cached after first use)
SHARED_EVERY = 20  # one in this many of a tenant's filler vectors is also the next tenant's


# ---------------------------------------------------------------- filling a store


def tenant_names(count: int) -> list[str]:
    """The filler's tenants: the default one, then ``team1`` .. ``team<count-1>``."""
    if count < 2:
        raise BenchError("--tenants must be at least 2 (the default tenant and the bench tenant)")
    return [DEFAULT_TENANT, *(f"team{t}" for t in range(1, count))]


class Filler(NamedTuple):
    """Vectors and what each tenant holds of them."""

    vectors: list[StoredVector]
    refs: dict[str, list[str]]  # tenant -> the content ids it references, oldest first
    names: dict[str, dict[str, str]]  # tenant -> its names -> content id
    shared: dict[str, str]  # tenant -> one content id it shares with another tenant and names

    @property
    def references(self) -> int:
        return sum(len(ids) for ids in self.refs.values())


def filler(count: int, hidden: int, layer: int, tenants: list[str], seed: int = 0) -> Filler:
    """``count`` random constant vectors, created one millisecond apart a day ago; vector i is
    tenant i mod T's, and one in ``SHARED_EVERY`` of each tenant's is the next tenant's too.
    Each tenant names nine in ten of its references ``lib.v<j>``, j counting its references."""
    rng = np.random.default_rng(seed)
    start = time.time() - 86400
    vectors: list[StoredVector] = []
    refs: dict[str, list[str]] = {tenant: [] for tenant in tenants}
    names: dict[str, dict[str, str]] = {tenant: {} for tenant in tenants}
    shared: dict[str, str] = {}

    def reference(tenant: str, content_id: str) -> None:
        j = len(refs[tenant])
        refs[tenant].append(content_id)
        if j % 10:
            names[tenant][f"lib.v{j}"] = content_id

    for i in range(count):
        direction = torch.from_numpy(rng.standard_normal((1, hidden), dtype=np.float32))
        vectors.append(StoredVector(VectorMeta("bench-filler", hidden, "constant", "upload", {}, start + i * 1e-3),
                                    {layer: direction}))
        content_id = vectors[-1].content_id
        owner = tenants[i % len(tenants)]
        reference(owner, content_id)
        if (i // len(tenants)) % SHARED_EVERY == 1:
            other = tenants[(i + 1) % len(tenants)]
            reference(other, content_id)
            for tenant in (owner, other):
                if tenant not in shared and names[tenant].get(f"lib.v{len(refs[tenant]) - 1}") == content_id:
                    shared[tenant] = content_id
    return Filler(vectors, refs, names, shared)


def fill_sqlite(store: SqliteVectorStore, entries: list[EncodedVector], plan: Filler) -> None:
    """The rows and blob files ``put``, ``add_reference`` and ``set_name`` write, in one
    transaction (the blobs unsynced: a bench's fill, not data to keep); the store's triggers
    count names and usage as they do for those writes."""
    created = {entry.content_id: (entry.created, len(entry.tensor_bytes)) for entry in entries}
    with contextlib.closing(sqlite3.connect(store.index_path, isolation_level=None)) as connection:
        connection.execute("BEGIN IMMEDIATE")
        for entry in entries:
            (store.blob_dir / f"{entry.content_id}.safetensors").write_bytes(entry.tensor_bytes)
        connection.executemany(
            "INSERT INTO vectors (content_id, meta, created, blob, blob_sha256, shapes, nbytes)"
            " VALUES (?, ?, ?, ?, ?, ?, ?)",
            [(e.content_id, e.meta_json, e.created, f"{e.content_id}.safetensors", e.tensor_sha256, e.shapes_json,
              len(e.tensor_bytes)) for e in entries])
        connection.executemany(
            "INSERT INTO refs (tenant, content_id, created, nbytes) VALUES (?, ?, ?, ?)",
            [(tenant, content_id, *created[content_id]) for tenant, ids in plan.refs.items() for content_id in ids])
        connection.executemany("INSERT INTO names (tenant, name, content_id) VALUES (?, ?, ?)",
                               [(tenant, name, content_id) for tenant, named in plan.names.items()
                                for name, content_id in named.items()])
        connection.execute("COMMIT")


def fill_redis(store: RedisVectorStore, entries: list[EncodedVector], plan: Filler, batch: int = 2000) -> None:
    """The keys ``put``, ``add_reference`` and ``set_name`` write, pipelined in batches."""
    by_id = {entry.content_id: entry for entry in entries}
    client = redis.Redis.from_url(store.url)
    for first in range(0, len(entries), batch):
        with client.pipeline(transaction=False) as pipe:
            for entry in entries[first:first + batch]:
                pipe.hset(store._vector_key(entry.content_id), mapping={  # noqa: SLF001 - the layout put writes
                    "meta": entry.meta_json, "tensors": entry.tensor_bytes, "sha256": entry.tensor_sha256,
                    "shapes": entry.shapes_json})
                pipe.sadd(store._ids_key, entry.content_id)  # noqa: SLF001
                pipe.hset(store._order_of_key, entry.content_id,  # noqa: SLF001
                          order_key(entry.created, entry.content_id))
            pipe.execute()
    for tenant, ids in plan.refs.items():
        keys = store._tenant(tenant)  # noqa: SLF001
        names_of: dict[str, list[str]] = {}
        for name, content_id in plan.names[tenant].items():
            names_of.setdefault(content_id, []).append(name)
        for first in range(0, len(ids), batch):
            with client.pipeline(transaction=False) as pipe:
                for content_id in ids[first:first + batch]:
                    entry = by_id[content_id]
                    order = order_key(entry.created, content_id)
                    pipe.hset(store._refs_key(content_id), tenant, len(entry.tensor_bytes))  # noqa: SLF001
                    pipe.zadd(keys.order, {order: 0})
                    pointing = names_of.get(content_id)
                    if pointing:
                        pipe.hset(keys.names, mapping=dict.fromkeys(pointing, content_id))
                        pipe.sadd(keys.names_of(content_id), *pointing)
                        pipe.zadd(keys.named, {order: 0})
                pipe.execute()
        if ids:
            client.hset(keys.usage, mapping={"vectors": len(ids),
                                              "bytes": sum(len(by_id[content_id].tensor_bytes) for content_id in ids)})
    client.set(store._layout_key, LAYOUT)  # noqa: SLF001


def fill(store: VectorStore, plan: Filler) -> None:
    """What ``put`` of every vector by its tenant, ``add_reference`` by the tenants sharing it
    and ``set_name`` of every name leave in ``store``, written in bulk."""
    entries = [encode(vector) for vector in plan.vectors]
    if isinstance(store, SqliteVectorStore):
        fill_sqlite(store, entries, plan)
    else:
        fill_redis(store, entries, plan)


class ModelShape:
    def __init__(self, model_dir: str, cache_home: str) -> None:
        from vector_store.keys import model_fingerprint

        config = json.loads((Path(model_dir) / "config.json").read_text())
        self.hidden = int(config["hidden_size"])
        self.layers = int(config["num_hidden_layers"])
        self.fingerprint = model_fingerprint(model_dir, cache_home=cache_home)


def add_steering_names(store: VectorStore, model: ModelShape, count: int, layer: int, tenant: str) -> list[str]:
    """The vectors requests steer with, through the store's own writes as ``tenant``, and
    ``count`` names of that tenant for them (one per request), the same in every store."""
    generator = torch.Generator().manual_seed(1)
    ids = []
    for _ in range(STEERING_VECTORS):
        direction = torch.randn(1, model.hidden, generator=generator)
        ids.append(store.put(StoredVector(VectorMeta(model.fingerprint, model.hidden, "constant"),
                                          {layer: direction / direction.norm()}), tenant=tenant))
    names = [f"bench.r{i}" for i in range(count)]
    for i, name in enumerate(names):
        store.set_name(name, ids[i % STEERING_VECTORS], tenant=tenant)
    return names


# ---------------------------------------------------------------- measuring


def median_ms(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        fn()
        times.append((time.perf_counter() - started) * 1e3)
    return statistics.median(times)


def store_timings(store: VectorStore, tenant: str, deep_cursor: str | None, some_id: str, some_name: str,
                  repeats: int) -> dict:
    """Median ms of the tenant's listing page (100) first and deep in its vectors, all and named
    only, ``names_of``, ``resolve`` and ``usage``."""
    return {
        "first_page_ms": median_ms(lambda: store.listing_page(100, tenant=tenant), repeats),
        "first_named_page_ms": median_ms(lambda: store.listing_page(100, named_only=True, tenant=tenant), repeats),
        "deep_page_ms": median_ms(lambda: store.listing_page(100, deep_cursor, tenant=tenant), repeats),
        "deep_named_page_ms": median_ms(lambda: store.listing_page(100, deep_cursor, named_only=True, tenant=tenant),
                                        repeats),
        "names_of_ms": median_ms(lambda: store.names_of(some_id, tenant=tenant), repeats),
        "resolve_ms": median_ms(lambda: store.resolve(some_name, tenant=tenant), repeats),
        "usage_ms": median_ms(lambda: store.usage(tenant=tenant), repeats),
    }


def check_tenant_views(store: VectorStore, plan: Filler, created: dict[str, float], extra: dict[str, int]) -> None:
    """BenchError unless every tenant's first and deep pages, names_of, resolve and usage say
    what the fill wrote for it (``extra``: vectors a tenant holds beyond the filler)."""
    for tenant, ids in plan.refs.items():
        wrong = f"the full store's tenant {tenant!r}"
        ordered = sorted(ids, key=lambda content_id: (created[content_id], content_id))
        if [e.content_id for e in store.listing_page(100, tenant=tenant).entries][:len(ordered)] != ordered[:100]:
            raise BenchError(f"{wrong}: its first page is not its first 100 vectors")
        if len(ordered) > 1:
            middle = ordered[len(ordered) // 2 - 1]
            deep = store.listing_page(100, order_key(created[middle], middle), tenant=tenant).entries
            if [e.content_id for e in deep][:len(ordered) - len(ordered) // 2] != ordered[len(ordered) // 2:][:100]:
                raise BenchError(f"{wrong}: its page half-way through is not its vectors from there")
        if store.usage(tenant=tenant).vectors != len(ids) + extra.get(tenant, 0):
            raise BenchError(f"{wrong}: usage counts {store.usage(tenant=tenant).vectors} vectors, "
                             f"not {len(ids) + extra.get(tenant, 0)}")
        named = plan.names[tenant]
        for content_id in ([plan.shared[tenant]] if tenant in plan.shared else []):
            expected = sorted(name for name, target in named.items() if target == content_id)
            if store.names_of(content_id, tenant=tenant) != expected:
                raise BenchError(f"{wrong}: names_of({content_id}) is not its own names {expected}")
        for name, content_id in list(named.items())[:3]:
            if store.resolve(name, tenant=tenant) != content_id:
                raise BenchError(f"{wrong}: {name!r} does not resolve to its own vector")


def tenant_probe(plan: Filler, tenant: str, created: dict[str, float]) -> tuple[str | None, str, str]:
    """A cursor half-way through the tenant's filler vectors, a content id it names (shared if
    it has one) and one of its names."""
    ids = sorted(plan.refs[tenant], key=lambda content_id: (created[content_id], content_id))
    middle = ids[len(ids) // 2] if ids else None
    named = plan.names[tenant]
    some_id = plan.shared.get(tenant) or (next(iter(named.values())) if named else ids[0])
    some_name = next((name for name, target in named.items() if target == some_id), "lib.v1")
    return (order_key(created[middle], middle) if middle else None), some_id, some_name


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


def measure_backend(backend: str, args: argparse.Namespace, model: ModelShape, plan: Filler, workdir: Path) -> dict:
    workdir.mkdir(parents=True, exist_ok=True)
    per_server = args.rounds * args.requests + args.warmup
    bench = args.tenant
    created = {vector.content_id: vector.meta.created for vector in plan.vectors}
    with store_pair(backend, workdir) as (empty_location, full_location):
        empty, full = open_store(empty_location), open_store(full_location)
        started = time.perf_counter()
        fill(full, plan)
        fill_s = time.perf_counter() - started
        names = add_steering_names(empty, model, per_server + 1, args.layer, bench)
        assert add_steering_names(full, model, per_server + 1, args.layer, bench) == names
        refused_name = names.pop()  # for the default tenant's key, which must not resolve it
        check_tenant_views(full, plan, created, {bench: STEERING_VECTORS})
        full_timings = {}
        for tenant in plan.refs:
            deep, some_id, some_name = tenant_probe(plan, tenant, created)
            full_timings[tenant] = store_timings(full, tenant, deep, some_id, some_name, args.timing_repeats)
        _, some_id, _ = tenant_probe(plan, bench, created)
        result: dict = {"fill_s": fill_s, "tenant": bench, "store": {
            "empty": store_timings(empty, bench, None, some_id, names[0], args.timing_repeats),
            "full": full_timings,
            "full_worst": {key: max(timings[key] for timings in full_timings.values())
                           for key in full_timings[bench]}}}

        bench_key = "bench-" + uuid.uuid4().hex[:12]
        keys_file = workdir / "api-keys"
        keys_file.write_text(f"# the key the requests use: the {bench} tenant's\ninference {bench_key} {bench}\n")
        options = ServerOptions(model=args.model, enforce_eager=args.enforce_eager, kv_cache_gib=1,
                                startup_timeout_s=args.startup_timeout,
                                server_args=("--api-keys-file", str(keys_file)))
        with contextlib.ExitStack() as servers:
            running = {which: servers.enter_context(running_server(
                "steer", options, store=Store(location, backend), log=workdir / f"server-{which}.log"))
                for which, location in (("empty", empty_location), ("full", full_location))}
            served = options.model_and_name()[1]
            clients = {which: servers.enter_context(httpx.Client(base_url=server.url, timeout=300,
                                                                 headers=auth_headers(bench_key)))
                       for which, server in running.items()}
            for which, server in running.items():  # each server answers as the tenant of the key
                refused = httpx.post(f"{server.url}/v1/completions", headers=auth_headers(server.api_key), timeout=300,
                                     json={"model": served, "prompt": PROMPT, "max_tokens": 1,
                                           "steering": steering_field(refused_name, "constant", args.coeff)})
                if refused.status_code != 404:
                    raise BenchError(f"the {which} server answered HTTP {refused.status_code}, not 404, to the default "
                                     f"tenant's key steering by the {bench} tenant's name {refused_name!r}")
                page = clients[which].get(VECTORS_PATH, params={"limit": 100})
                page.raise_for_status()
                listed = [entry["id"] for entry in page.json()["data"]]
                store = full if which == "full" else empty
                if listed != [e.content_id for e in store.listing_page(100, named_only=True, tenant=bench).entries]:
                    raise BenchError(f"the {which} server's listing for the {bench} key is not the {bench} tenant's")
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
        result["stored"] = {"empty": STEERING_VECTORS, "full": len(plan.vectors) + STEERING_VECTORS,
                            "references": {tenant: full.usage(tenant=tenant).vectors for tenant in plan.refs}}
    return result


def print_summary(backend: str, result: dict) -> None:
    ratio, normalized = result["ttft_ratio"]["steered"], result["ttft_ratio"]["steered_over_unsteered"]
    steered, unsteered = result["ttft"]["steered"], result["ttft"]["unsteered"]
    print(f"{backend}: filled in {result['fill_s']:.1f} s; names resolved as tenant {result['tenant']!r}; "
          f"steered TTFT p50 full/empty "
          f"{steered['full']['median_ms']:.1f}/{steered['empty']['median_ms']:.1f} ms, ratio {ratio['median']:.3f} "
          f"(95% {ratio['interval95'][0]:.3f}..{ratio['interval95'][1]:.3f}; rounds {ratio['per_round_min']:.3f}.."
          f"{ratio['per_round_max']:.3f}) -> {'PASS' if ratio['interval95'][1] <= 1.05 else 'CHECK'} (within 5%); "
          f"unsteered p50 full/empty {unsteered['full']['median_ms']:.1f}/{unsteered['empty']['median_ms']:.1f} ms; "
          f"steered ratio / unsteered ratio {normalized['median']:.3f} "
          f"(95% {normalized['interval95'][0]:.3f}..{normalized['interval95'][1]:.3f})")

    def line(timings: dict) -> str:
        return ", ".join(f"{key.removesuffix('_ms')} {value:.2f}" for key, value in timings.items())

    references = result["stored"]["references"]
    print(f"  empty ({result['tenant']}): {line(result['store']['empty'])} ms; "
          f"GET page through the server {result['route_page_ms']['empty']:.1f} ms")
    for tenant, timings in result["store"]["full"].items():
        print(f"  full, {tenant} ({references[tenant]} vectors): {line(timings)} ms")
    print(f"  full, worst tenant: {line(result['store']['full_worst'])} ms; "
          f"GET page through the server ({result['tenant']}) {result['route_page_ms']['full']:.1f} ms")


def main(argv: list[str] | None = None) -> int:
    from steer_server.bench.report import machine_info, write_json
    from steer_server.settings import load_settings

    p = argparse.ArgumentParser(prog="python -m steer_server.bench.store_scale", description=__doc__.split("\n\n")[0])
    p.add_argument("--vectors", type=int, default=100_000, help="filler vectors in the full store (default: %(default)s)")
    p.add_argument("--tenants", type=int, default=8,
                   help="tenants holding them: the default one and team1.. (default: %(default)s)")
    p.add_argument("--tenant", default="team1",
                   help="the tenant the steered requests resolve their names as (default: %(default)s)")
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
        tenants = tenant_names(args.tenants)
        if args.tenant not in tenants[1:]:
            raise BenchError(f"--tenant must be one of the filler's tenants other than the default: {tenants[1:]}")
        plan = filler(args.vectors, model.hidden, args.layer, tenants)
        data["make_s"] = time.perf_counter() - started
        data["tenants"] = {tenant: {"vectors": len(ids), "names": len(plan.names[tenant])}
                           for tenant, ids in plan.refs.items()}
        data["references"] = plan.references
        workdir = Path(args.workdir or tempfile.mkdtemp(prefix="steer-store-scale-"))
        for backend in args.stores:
            data["backends"][backend] = measure_backend(backend, args, model, plan, workdir / backend)
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
