"""VectorComputer.from_pairs without an engine: a fake capture stands in for it, so what is
checked here is the batching of captures and the metadata, not the streams (tests/api
checks those against transformers)."""
from __future__ import annotations

import asyncio

import pytest
import torch

from vector_store import compute
from vector_store.async_access import AsyncStore
from vector_store.cache import VectorCache
from vector_store.compute import ModelInfo, VectorComputer, contrast_direction
from vector_store.keys import computation_key
from vector_store.sqlite import SqliteVectorStore

HIDDEN, LAYERS = 8, 4


def stream_of(ids: list[int], layer: int) -> torch.Tensor:
    """A made-up stream [len, hidden] that depends on the tokens and the layer."""
    generator = torch.Generator().manual_seed(hash((tuple(ids), layer)) % 2**31)
    return torch.randn(len(ids), HIDDEN, generator=generator)


class FakeCapture:
    def __init__(self) -> None:
        self.batches: list[int] = []

    async def __call__(self, prompts: list[list[int]], layers: list[int]) -> list[dict[int, torch.Tensor]]:
        self.batches.append(len(prompts))
        return [{layer: stream_of(ids, layer) for layer in layers} for ids in prompts]


def new_computer(directory) -> VectorComputer:
    store = AsyncStore(SqliteVectorStore(directory), vectors=VectorCache())
    return VectorComputer(store, FakeCapture(), ModelInfo("Fake-h8-l4-0123456789abcdef", HIDDEN, LAYERS))


@pytest.fixture
def computer(tmp_path) -> VectorComputer:
    return new_computer(tmp_path / "store")


PAIRS = [([1, 2, 3], [4, 5]), ([6, 7], [8, 9, 10, 11]), ([12], [13, 14]), ([15, 16, 17], [18])]


def test_captures_come_in_bounded_batches_and_give_the_same_vector(tmp_path, monkeypatch):
    whole = new_computer(tmp_path / "whole")
    made = asyncio.run(whole.from_pairs(PAIRS, [0, 2, 4], "pca_center", "mean", tenant="default"))
    assert whole._capture.batches == [8]
    # Room for 5 tokens at 3 layers a batch: the prompts' lengths go 3 2 | 2 | 4 1 | 2 3 | 1.
    monkeypatch.setattr(compute, "CAPTURE_BATCH_BYTES", 5 * 3 * HIDDEN * 4)
    batched = new_computer(tmp_path / "batched")
    assert asyncio.run(batched.from_pairs(PAIRS, [0, 2, 4], "pca_center", "mean", tenant="default")) == made
    assert batched._capture.batches == [2, 1, 2, 2, 1]


def test_directions_stats_and_source(computer):
    content_id = asyncio.run(computer.from_pairs(PAIRS, [3, 1], "pca_diff", "last", template="chat", tenant="default"))
    vector = computer.store.store.get(content_id)
    assert vector.layers == [1, 3] and vector.meta.kind == "constant" and vector.meta.method == "pca_diff"
    assert vector.meta.source == {"pairs": [list(p) for p in PAIRS], "template": "chat"}
    for layer in (1, 3):
        positives = torch.stack([stream_of(p, layer)[-1] for p, _ in PAIRS])
        negatives = torch.stack([stream_of(n, layer)[-1] for _, n in PAIRS])
        direction, stats = contrast_direction(positives, negatives, "pca_diff")
        assert torch.equal(vector.directions[layer][0], direction)
        assert vector.meta.stats[str(layer)] == stats.as_json() and set(stats.as_json()) == {
            "norm", "separation", "midpoint", "explained_variance"}
        unit = direction.double() / direction.double().norm()
        on_positives, on_negatives = positives.double() @ unit, negatives.double() @ unit
        assert stats.midpoint == pytest.approx(float(on_positives.mean() + on_negatives.mean()) / 2)
        assert on_positives.mean() > on_negatives.mean()  # turned so the positives project higher


def test_one_layer_last_token_mean_diff_keeps_its_old_key_and_metadata(computer):
    """The shape every earlier server made: its computation key, method name and source are
    the ones they always were, so vectors computed before are found again."""
    one = [PAIRS[0]]
    content_id = asyncio.run(computer.constant(one, 2, tenant="default"))
    assert asyncio.run(computer.store.cached_computation(
        computation_key(computer.model.fingerprint, 2, [PAIRS[0][0], PAIRS[0][1]], [], "last_token_diff", None)
    )) == content_id
    vector = computer.store.store.get(content_id)
    assert vector.meta.method == "last_token_diff" and vector.meta.source == {"pairs": [list(PAIRS[0])]}
    assert set(vector.meta.stats["2"]) == {"norm", "separation", "midpoint"}
    assert torch.equal(vector.directions[2][0], stream_of(PAIRS[0][0], 2)[-1] - stream_of(PAIRS[0][1], 2)[-1])


@pytest.mark.parametrize("call, message", [
    (lambda c: c.from_pairs(PAIRS[:1], [1], "pca_diff", tenant="default"), "pca_diff needs at least 2 pairs"),
    (lambda c: c.from_pairs(PAIRS, [1], "median_diff", tenant="default"), "method: expected one of mean_diff, pca_diff, pca_center"),
    (lambda c: c.from_pairs(PAIRS, [1], "mean_diff", "first", tenant="default"), "position: expected one of last, mean"),
    (lambda c: c.from_pairs(PAIRS, [1, 5], tenant="default"), "layer 5 is outside 0..4"),
])
def test_refusals(computer, call, message):
    from vector_store import VectorStoreError

    with pytest.raises(VectorStoreError, match=message):
        asyncio.run(call(computer))
    assert computer.store.store.list() == []


def test_examples_that_do_not_vary_have_a_zero_direction():
    """As at layer 0 under a chat template, where every example's last token is the same."""
    same = torch.ones(3, HIDDEN)
    for method in ("mean_diff", "pca_diff", "pca_center"):
        direction, stats = contrast_direction(same, same, method)
        assert not direction.any() and stats.as_json() == {"norm": 0.0, "separation": 0.0}


def test_mean_leaves_out_the_first_token(computer):
    """``mean`` is the mean over each example's tokens after the first (whose massive activation
    would swamp it on SmolLM2); a one-token example is its one token."""
    content_id = asyncio.run(computer.from_pairs(PAIRS, [2], "mean_diff", "mean", tenant="default"))
    vector = computer.store.store.get(content_id)

    def mean_after_first(ids: list[int]) -> torch.Tensor:
        rows = stream_of(ids, 2)
        return rows[0] if len(ids) == 1 else sum(rows[i] for i in range(1, len(ids))) / (len(ids) - 1)

    positives = torch.stack([mean_after_first(p) for p, _ in PAIRS])
    negatives = torch.stack([mean_after_first(n) for _, n in PAIRS])
    torch.testing.assert_close(vector.directions[2][0], positives.mean(dim=0) - negatives.mean(dim=0))
    assert vector.meta.source == {"pairs": [list(p) for p in PAIRS], "position": "mean"}


def test_mean_is_not_found_under_the_key_of_the_mean_over_every_token(computer):
    """A store that holds a vector made when ``mean`` still took in the first token does not
    hand it back for today's ``mean``."""
    OLD_ID = asyncio.run(computer.from_pairs(PAIRS, [2], "mean_diff", "last", tenant="default"))  # stands in for the old vector
    flat = [ids for pair in PAIRS for ids in pair]
    old_key = computation_key(computer.model.fingerprint, 2, flat, [], "mean_diff", None, {"position": "mean"})
    asyncio.run(computer.store.remember_computation(old_key, OLD_ID))
    assert asyncio.run(computer.from_pairs(PAIRS, [2], "mean_diff", "mean", tenant="default")) != OLD_ID


@pytest.mark.parametrize("method", ["mean_diff", "pca_diff", "pca_center"])
def test_mean_matches_the_transformers_reference(tmp_path_factory, method):
    """Captured by transformers (the reference's own streams) and reduced by VectorComputer,
    against ``steer_server.reference.contrast_vectors`` on a tiny Llama."""
    from models import make_tiny_llama
    from transformers import AutoModelForCausalLM

    from steer_server.reference import contrast_vectors, hidden_state_streams

    model = AutoModelForCausalLM.from_pretrained(make_tiny_llama(tmp_path_factory.mktemp("tiny") / "llama"),
                                                 dtype=torch.float32).eval()
    pairs = [([5, 90, 300, 7], [5, 91, 301]), ([42, 8], [42, 9, 11, 12]), ([700], [701, 702]), ([3, 4, 5], [6])]

    async def capture(prompts, layers):
        return [hidden_state_streams(model, ids, layers) for ids in prompts]

    store = AsyncStore(SqliteVectorStore(tmp_path_factory.mktemp("store")), vectors=VectorCache())
    made = VectorComputer(store, capture, ModelInfo("LlamaForCausalLM-h128-l3-0123456789abcdef", 128, 3))
    vector = store.store.get(asyncio.run(made.from_pairs(pairs, [0, 2, 3], method, "mean", tenant="default")))
    want = contrast_vectors(model, pairs, [0, 2, 3], method, "mean")
    for layer, (direction, stats) in want.items():
        torch.testing.assert_close(vector.directions[layer][0], direction, rtol=1e-4, atol=1e-5)
        got = vector.meta.stats[str(layer)]
        assert got["separation"] == stats["separation"]
        assert got["midpoint"] == pytest.approx(stats["midpoint"], rel=1e-4, abs=1e-5)
