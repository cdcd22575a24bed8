"""The one validator (steer_vllm.validate) on hand-built steerings: each refusal names the
field and the reason; what fits the model passes."""
import math

import pytest
import torch

from steer_vllm.spec import EngineSteering
from steer_vllm.validate import ModelLimits, SteeringInvalid, validate
from vector_store import StoredVector, VectorMeta

HIDDEN, LAYERS = 8, 4
LIMITS = ModelLimits(num_layers=LAYERS, hidden_size=HIDDEN, fingerprint="Tiny-h8-l4", dtype_max=65504.0,
                     table_capacity=20)


def vector(rows_by_layer: dict[int, int], fill: float = 1.0, fingerprint: str = "Tiny-h8-l4",
           hidden: int = HIDDEN) -> StoredVector:
    kind = "constant" if all(rows == 1 for rows in rows_by_layer.values()) else "actadd"
    return StoredVector(VectorMeta(fingerprint, hidden, kind),
                        {layer: torch.full((rows, hidden), fill) for layer, rows in rows_by_layer.items()})


VECTORS = {
    "v-const": vector({1: 1, 2: 1}),
    "v-seq6": vector({2: 6}),
    "v-zero": vector({1: 1}, fill=0.0),
    "v-nan": vector({1: 1}, fill=math.nan),
    "v-other": vector({1: 1}, fingerprint="Other-h8-l4"),
    "v-wide": vector({1: 1}, hidden=HIDDEN * 2),
}


def steering(**fields) -> EngineSteering:
    return EngineSteering.model_validate(fields)


def add(vector_id: str, layer: int, coeff: float = 1.0, **fields) -> dict:
    return {"vector": vector_id, "layer": layer, "coeff": coeff, **fields}


REFUSED = [
    # (steering, prompt_len, field, words in the reason)
    (steering(additions=[add("v-const", 1, mode="constant"), add("v-const", 5, mode="constant")]), None,
     "additions[1].layer", ["5 is outside 0..4", "this model has 4 blocks"]),
    (steering(additions=[add("v-other", 1, mode="constant")]), None,
     "additions[0].vector", ["made for model Other-h8-l4", "not the served Tiny-h8-l4"]),
    (steering(additions=[add("v-wide", 1, mode="constant")]), None, "additions[0].vector", ["hidden size 16"]),
    (steering(additions=[add("v-const", 3, source_layer=3, mode="constant")]), None,
     "additions[0].source_layer", ["no direction for layer 3", "[1, 2]"]),
    (steering(additions=[add("v-nan", 1, mode="constant")]), None, "additions[0].vector", ["NaN or infinite"]),
    (steering(additions=[add("v-seq6", 2, mode="constant")]), None,
     "additions[0].vector", ["one row per layer", "sequence of 6 rows at layer 2"]),
    (steering(additions=[add("v-seq6", 2, coeff=70000.0)]), None, "additions[0].coeff", ["overflows"]),
    (steering(additions=[add("v-seq6", 2)]), 5, "additions[0].vector", ["has 6 tokens", "only 5"]),
    (steering(additions=[add("v-seq6", 2)], anchor=2), 7, "additions[0].vector", ["only 5 from its anchor at position 2"]),
    (steering(additions=[add("v-const", 1, mode="constant")], anchor=9), 9, "anchor", ["position 9 is past the prompt's 9"]),
    (steering(projections=[{"vector": "v-zero", "layer": 1, "op": "ablate"}]), None,
     "projections[0].vector", ["ablate needs one non-zero direction"]),
    (steering(projections=[{"vector": "v-seq6", "layer": 2, "op": "clamp", "value": 1.0}]), None,
     "projections[0].vector", ["not 6 rows"]),
    # a sequence of 6 rows on each of 4 layers: 24 rows > 20 (one layer's additions share rows)
    (steering(additions=[add("v-seq6", layer, source_layer=2) for layer in range(4)]), None,
     "additions", ["rows of the steering table, which has 20"]),
]


@pytest.mark.parametrize(("spec", "prompt_len", "field", "words"), REFUSED)
def test_refusals_name_the_field(spec, prompt_len, field, words):
    with pytest.raises(SteeringInvalid) as caught:
        validate(spec, VECTORS, LIMITS, prompt_len)
    assert caught.value.field == field
    assert str(caught.value).startswith(f"steering.{field}: ")
    for word in words:
        assert word in caught.value.reason, (word, caught.value.reason)


def test_what_fits_passes():
    spec = steering(additions=[add("v-seq6", 2, coeff=-3.0), add("v-const", 1, coeff=2.0, mode="constant")],
                    projections=[{"vector": "v-const", "layer": 2, "op": "clamp", "value": 0.5}],
                    preserve_norm=[1, 2], anchor=1)
    validate(spec, VECTORS, LIMITS, prompt_len=7)  # 6 rows from position 1 fit a 7-token prompt
    validate(spec, VECTORS, LIMITS)  # no prompt yet: only the prompt's checks wait


def test_the_prompt_checks_wait_for_the_prompt():
    spec = steering(additions=[add("v-seq6", 2)])
    validate(spec, VECTORS, LIMITS)
    with pytest.raises(SteeringInvalid, match="has 6 tokens"):
        validate(spec, VECTORS, LIMITS, prompt_len=3)
