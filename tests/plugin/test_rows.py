"""Plans, rows and per-token buffers against a direct reading of the steering semantics."""
import json
import re

import pytest
import torch

from steer_vllm.batch import RequestRows, SteeringBatch
from steer_vllm.ops import add_steering, project_and_rescale
from steer_vllm.plans import plan_layers
from steer_vllm.slots import RowsExhausted, RowTable
from steer_vllm.spec import EngineSteering, SteeringSpecError, steering_of, steering_text

HIDDEN, POINTS = 8, 4
gen = torch.Generator().manual_seed(0)
VECTORS = {
    "v-seq5": torch.randn(5, HIDDEN, generator=gen),
    "v-seq3": torch.randn(3, HIDDEN, generator=gen),
    "v-const": torch.randn(1, HIDDEN, generator=gen),
    "v-const2": torch.randn(1, HIDDEN, generator=gen),
    "v-seq31": torch.randn(31, HIDDEN, generator=gen),
}


def expected_delta(additions: list[dict], layer: int, pos: int, prompt_len: int) -> torch.Tensor:
    """What each addition adds to the stream entering ``layer`` at ``pos``, written out from
    the semantics: an ActAdd sequence its row ``pos`` (front-aligned, nothing past its end), a
    constant vector its one row at every position its ``positions`` selects."""
    delta = torch.zeros(HIDDEN)
    for a in additions:
        if a["layer"] != layer:
            continue
        v = VECTORS[a["vector"]]
        if a.get("mode", "actadd") == "actadd":
            if pos < v.shape[0]:
                delta += a["coeff"] * v[pos]
        else:
            where = a.get("positions", "all")
            if where == "all" or (where == "prompt") == (pos < prompt_len):
                delta += a["coeff"] * v[0]
    return delta


def place_steering(table: RowTable, spec: dict, prompt_len: int) -> tuple[RequestRows, list[str]]:
    steering = EngineSteering.model_validate(spec)
    rows = RequestRows(POINTS, prompt_len, steering.anchor)
    keys = []
    for plan in plan_layers(steering, lambda a: VECTORS[a.vector].shape[0]):
        rows.set_layer(plan, table.acquire(plan, lambda a: VECTORS[a.vector]).start)
        keys.append(plan.key)
    return rows, keys


def place(table: RowTable, additions: list[dict], prompt_len: int) -> tuple[RequestRows, list[str]]:
    return place_steering(table, {"additions": additions}, prompt_len)


REQUESTS = [
    ([{"vector": "v-seq5", "layer": 1, "coeff": 5.0}, {"vector": "v-seq3", "layer": 1, "coeff": -5.0}], 9),
    ([{"vector": "v-const", "layer": 2, "coeff": 2.5, "mode": "constant", "positions": "prompt"},
      {"vector": "v-seq3", "layer": 2, "coeff": 1.0}], 6),
    ([{"vector": "v-const", "layer": 0, "coeff": -1.5, "mode": "constant", "positions": "generated"},
      {"vector": "v-const2", "layer": 3, "coeff": 0.5, "mode": "constant", "positions": "all"},
      {"vector": "v-const2", "layer": 3, "coeff": 0.25, "mode": "constant", "positions": "prompt"}], 4),
    (None, 7),  # unsteered
]


def test_filled_buffers_add_exactly_what_the_spec_says():
    table = RowTable(64, HIDDEN, torch.float32, torch.device("cpu"))
    batch = SteeringBatch(POINTS, max_tokens=64, max_reqs=8, dtype=torch.float32, device=torch.device("cpu"))
    in_batch, req_index, positions, expected = [], [], [], []
    for slot, (additions, prompt_len) in enumerate(REQUESTS):
        in_batch.append(place(table, additions, prompt_len)[0] if additions else None)
        # a prefill chunk from position 2 through past the prompt (generated positions too)
        for pos in range(2, prompt_len + 3):
            req_index.append(slot)
            positions.append(pos)
            expected.append([expected_delta(additions or [], layer, pos, prompt_len) for layer in range(POINTS)])
    batch.fill(in_batch, torch.tensor(req_index, dtype=torch.int32), torch.tensor(positions))
    assert batch.points_in_use.tolist() == [True] * POINTS
    stream = torch.zeros(len(positions), HIDDEN)
    for layer in range(POINTS):
        got = add_steering(stream, table.vector_table, batch.row_of_token[layer], batch.scale_of_token[layer])
        want = torch.stack([e[layer] for e in expected])
        torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)


def test_unsteered_batch_adds_exact_zero_and_clears_old_rows():
    table = RowTable(16, HIDDEN, torch.float32, torch.device("cpu"))
    batch = SteeringBatch(POINTS, 16, 4, torch.float32, torch.device("cpu"))
    rows, _ = place(table, REQUESTS[0][0], 9)
    batch.fill([rows], torch.zeros(6, dtype=torch.int64), torch.arange(6))
    assert batch.scale_of_token.abs().sum() > 0
    assert batch.points_in_use.tolist() == [False, True, False, False]  # eager steps skip the rest
    batch.fill([None, None], torch.tensor([0, 0, 1, 1, 1, 1]), torch.arange(6))
    assert not batch.points_in_use.any()
    stream = torch.randn(6, HIDDEN)
    for layer in range(POINTS):
        out = add_steering(stream, table.vector_table, batch.row_of_token[layer], batch.scale_of_token[layer])
        assert torch.equal(out, stream)


def test_coefficient_change_shares_rows_and_rows_come_back():
    table = RowTable(32, HIDDEN, torch.float32, torch.device("cpu"))
    love_hate = lambda c: [{"vector": "v-seq5", "layer": 1, "coeff": c}, {"vector": "v-seq3", "layer": 1, "coeff": -c}]
    _, keys5 = place(table, love_hate(5.0), 9)
    used = table.rows_in_use
    assert used == 5
    _, keys7 = place(table, love_hate(7.0), 9)
    assert keys7 == keys5 and table.rows_in_use == used  # same rows, other scale
    _, other = place(table, [{"vector": "v-seq3", "layer": 1, "coeff": 1.0}], 9)
    assert table.rows_in_use == used + 3
    for key in keys5 + keys7 + other:
        table.release(key)
    assert table.rows_in_use == 0 and table.num_plans == 0
    # everything came back as one free block: a plan as large as the table fits
    place(table, [{"vector": "v-seq31", "layer": 1, "coeff": 1.0}], 40)
    with pytest.raises(RowsExhausted, match="table is full"):
        place(table, [{"vector": "v-seq3", "layer": 2, "coeff": 1.0}], 9)


def test_fragmented_table_is_compacted_and_moved_plans_keep_their_rows():
    table = RowTable(1 + 5 + 3 + 5 + 1, HIDDEN, torch.float32, torch.device("cpu"))
    _, first = place(table, [{"vector": "v-seq5", "layer": 1, "coeff": 1.0}], 9)
    _, middle = place(table, [{"vector": "v-seq3", "layer": 1, "coeff": 1.0}], 9)
    kept_rows, kept = place(table, [{"vector": "v-seq5", "layer": 2, "coeff": 2.0}], 9)
    for key in first:
        table.release(key)
    # 5 + 1 rows are free, but in two runs (5 at the front, 1 at the end): a 6-row plan needs
    # them together, so the table moves the held plans down first.
    generation = table.generation
    grown, _ = place(table, [{"vector": "v-seq5", "layer": 3, "coeff": 1.0},
                             {"vector": "v-const", "layer": 3, "coeff": 1.0, "mode": "constant", "positions": "generated"}], 9)
    assert table.generation == generation + 1 and table.rows_in_use == table.capacity
    batch = SteeringBatch(POINTS, max_tokens=64, max_reqs=8, dtype=torch.float32, device=torch.device("cpu"))
    moved = RequestRows(POINTS, 9)  # the held plan's rows, re-read after the move
    (kept_plan,) = plan_layers(EngineSteering.model_validate({"additions": [{"vector": "v-seq5", "layer": 2, "coeff": 2.0}]}),
                               lambda a: VECTORS[a.vector].shape[0])
    moved.set_layer(kept_plan, table.placed(kept[0]).start)
    positions = list(range(7)) + list(range(12))
    batch.fill([moved, grown], torch.tensor([0] * 7 + [1] * 12), torch.tensor(positions))
    stream = torch.zeros(len(positions), HIDDEN)
    for layer, additions in ((2, [{"vector": "v-seq5", "layer": 2, "coeff": 2.0}]),
                             (3, [{"vector": "v-seq5", "layer": 3, "coeff": 1.0},
                                  {"vector": "v-const", "layer": 3, "coeff": 1.0, "mode": "constant", "positions": "generated"}])):
        got = add_steering(stream, table.vector_table, batch.row_of_token[layer], batch.scale_of_token[layer])
        want = torch.stack([expected_delta(additions if (i >= 7) == (layer == 3) else [], layer, pos, 9)
                            for i, pos in enumerate(positions)])
        torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)
    assert kept_rows.segments[2].tolist() != moved.segments[2].tolist()  # it did move


def test_fill_reads_the_runners_buffers_without_writing_them():
    table = RowTable(64, HIDDEN, torch.float32, torch.device("cpu"))
    batch = SteeringBatch(POINTS, max_tokens=64, max_reqs=8, dtype=torch.float32, device=torch.device("cpu"))
    rows, _ = place(table, REQUESTS[0][0], 9)
    req_indices = torch.tensor([0, 0, 0, 5, 7], dtype=torch.int64)  # padding slots beyond the batch
    positions = torch.arange(5)
    before = (req_indices.clone(), positions.clone())
    batch.fill([rows], req_indices, positions)
    assert torch.equal(req_indices, before[0]) and torch.equal(positions, before[1])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_projections_and_norm_follow_their_formulas_and_leave_others_bit_identical(dtype):
    table = RowTable(64, HIDDEN, dtype, torch.device("cpu"))
    batch = SteeringBatch(POINTS, max_tokens=64, max_reqs=8, dtype=dtype, device=torch.device("cpu"))
    requests = [
        {"projections": [{"vector": "v-const2", "layer": 1, "op": "ablate"}]},
        {"additions": [{"vector": "v-const", "layer": 1, "coeff": 1.5, "mode": "constant"}],
         "projections": [{"vector": "v-const2", "layer": 1, "op": "clamp", "value": 2.0}], "preserve_norm": [1]},
        {"additions": [{"vector": "v-seq3", "layer": 1, "coeff": 2.0}], "anchor": 2},
        None,
    ]
    in_batch = []
    for spec in requests:
        if spec is None:
            in_batch.append(None)
            continue
        in_batch.append(place_steering(table, spec, 6)[0])
    positions = list(range(8))
    req_index = [slot for slot in range(len(requests)) for _ in positions]
    batch.fill(in_batch, torch.tensor(req_index), torch.tensor(positions * len(requests)))
    stream = (torch.randn(len(req_index), HIDDEN, generator=gen) * 3).to(dtype)
    added = add_steering(stream, table.vector_table, batch.row_of_token[1], batch.scale_of_token[1])
    out = project_and_rescale(stream.float().norm(dim=-1), added, table.vector_table, batch.direction_row_of_token[1],
                              batch.projection_of_token[1], batch.target_of_token[1], batch.preserve_of_token[1])
    h = stream.double()
    unit = VECTORS["v-const2"][0].double() / VECTORS["v-const2"][0].double().norm()
    tol = dict(rtol=1e-5, atol=1e-5) if dtype == torch.float32 else dict(rtol=2e-2, atol=5e-2)
    for t, (slot, pos) in enumerate(zip(req_index, positions * len(requests))):
        x = h[t]
        if slot == 0:
            want = x - (x @ unit) * unit
        elif slot == 1:
            y = x + 1.5 * VECTORS["v-const"][0].double()
            y = y + (2.0 - y @ unit) * unit
            want = y * (x.norm() / y.norm())
        elif slot == 2:
            want = x + 2.0 * VECTORS["v-seq3"][pos - 2].double() if 2 <= pos < 5 else x
        else:
            assert torch.equal(out[t], stream[t])  # bit-identical, whatever else the batch does
            continue
        torch.testing.assert_close(out[t].double(), want, **tol, msg=f"request {slot}, position {pos}")


@pytest.mark.parametrize(
    "payload, message",
    [
        ('{"additions": []}', "steering: at least one addition or projection is needed"),
        ({"additions": [{"vector": "v-1", "layer": -1, "coeff": 1}]}, "steering.additions[0].layer"),
        ({"additions": [{"vector": "v-1", "layer": 1, "coeff": float("nan")}]}, "steering.additions[0].coeff: must be a finite number"),
        ({"projections": [{"vector": "v-1", "layer": 1, "op": "ablate"}, {"vector": "v-2", "layer": 1, "op": "clamp"}]},
         "at most one projection (ablate or clamp) per layer"),
        ({"additions": [{"vector": "v-1", "layer": 1, "coeff": 1, "mode": "sideways"}]}, "steering.additions[0].mode"),
        ({"additions": [{"vector": "v-1", "layer": 1, "coeff": 1, "colour": 3}]}, "steering.additions[0].colour"),
        ("{not json", "steering: not valid JSON"),
    ],
)
def test_malformed_payloads_name_the_field(payload, message):
    with pytest.raises(SteeringSpecError, match=re.escape(message)):
        steering_of({"steering": payload})


def test_a_steering_text_is_parsed_once_per_process():
    sent = EngineSteering.model_validate({"additions": [{"vector": "v-seq5", "layer": 2, "coeff": 4.0}], "anchor": 3})
    text = steering_text(sent)
    assert json.loads(text) == {"additions": [{"vector": "v-seq5", "layer": 2, "coeff": 4.0}], "anchor": 3}
    assert steering_of({"steering": text}) is sent  # the sender's own object, not a re-parse
    # Text this process has not seen is parsed once, then shared by every later reader.
    other = '{"additions": [{"vector": "v-const", "layer": 1, "coeff": -2.0, "mode": "constant"}]}'
    first = steering_of({"steering": other})
    assert first.additions[0].coeff == -2.0 and first.additions[0].mode == "constant"
    assert steering_of({"steering": other}) is first
    # A bad text is refused every time it comes, never remembered as good.
    bad = '{"additions": [{"vector": "v-const", "layer": 1, "coeff": "lots"}]}'
    for _ in range(2):
        with pytest.raises(SteeringSpecError, match=r"steering\.additions\[0\]\.coeff"):
            steering_of({"steering": bad})


def _in_positions(positions, pos: int, prompt_len: int, anchor: int) -> bool:
    """The schedule semantics, read directly: which absolute positions an operation covers."""
    if isinstance(positions, dict):
        end = positions.get("end")
        return prompt_len + positions["start"] <= pos and (end is None or pos < prompt_len + end)
    return {"all": True, "prompt": pos < prompt_len, "generated": pos >= prompt_len,
            "after_anchor": pos >= anchor}[positions]


def _unit_rows(v: torch.Tensor) -> torch.Tensor:
    return v / v.norm(dim=-1, keepdim=True)


SCHEDULED = [  # (steering, prompt length)
    ({"additions": [{"vector": "v-const", "layer": 1, "coeff": 2.0, "mode": "constant", "positions": "after_anchor"},
                    {"vector": "v-const2", "layer": 1, "coeff": -1.0, "mode": "constant",
                     "positions": {"start": 1, "end": 3}},
                    {"vector": "v-seq3", "layer": 1, "coeff": 0.5}],
      "projections": [{"vector": "v-const2", "layer": 1, "op": "clamp", "value": 1.5, "positions": {"start": 2}}],
      "anchor": 2}, 6),
    ({"additions": [{"vector": "v-const", "layer": 1, "dose": 0.3, "mode": "constant", "positions": "generated"},
                    {"vector": "v-const2", "layer": 1, "dose": 0.1, "mode": "constant", "positions": "prompt"}],
      "projections": [{"vector": "v-const", "layer": 1, "op": "ablate", "positions": "prompt"}], "preserve_norm": [1]}, 5),
    ({"additions": [{"vector": "v-seq5", "layer": 1, "dose": 0.5}], "anchor": 1}, 7),
    (None, 6),
]


def _scheduled_expected(spec: dict, x: torch.Tensor, pos: int, prompt_len: int) -> torch.Tensor:
    """float64: the stream entering layer 1 at ``pos`` after the steering, from the semantics."""
    anchor = spec.get("anchor", 0)
    y = x.clone()
    for a in spec.get("additions", []):
        v = VECTORS[a["vector"]].double()
        if a.get("mode", "actadd") == "actadd":
            if not anchor <= pos < anchor + v.shape[0]:
                continue
            row = v[pos - anchor]
        elif _in_positions(a.get("positions", "all"), pos, prompt_len, anchor):
            row = v[0]
        else:
            continue
        y = y + (a["coeff"] * row if "coeff" in a else a["dose"] * x.norm() * row / row.norm())
    acted = not torch.equal(y, x)
    for p in spec.get("projections", []):
        if _in_positions(p.get("positions", "all"), pos, prompt_len, anchor):
            unit = VECTORS[p["vector"]][0].double() / VECTORS[p["vector"]][0].double().norm()
            y = y + (p.get("value", 0.0) - y @ unit) * unit
            acted = True
    if spec.get("preserve_norm") and acted:
        y = y * (x.norm() / y.norm())
    return y


def test_schedules_and_doses_follow_the_semantics_per_position():
    table = RowTable(64, HIDDEN, torch.float32, torch.device("cpu"))
    batch = SteeringBatch(POINTS, max_tokens=128, max_reqs=8, dtype=torch.float32, device=torch.device("cpu"))
    in_batch, req_index, positions = [], [], []
    for slot, (spec, prompt_len) in enumerate(SCHEDULED):
        in_batch.append(place_steering(table, spec, prompt_len)[0] if spec else None)
        for pos in range(prompt_len + 5):  # the prompt and five generated positions
            req_index.append(slot)
            positions.append(pos)
    batch.fill(in_batch, torch.tensor(req_index), torch.tensor(positions))
    assert batch.doses_in_use[1] and not batch.doses_in_use[0]
    stream = torch.randn(len(positions), HIDDEN, generator=gen) * 2
    norm = stream.norm(dim=-1)
    added = add_steering(stream, table.vector_table, batch.row_of_token[1], batch.scale_of_token[1],
                         batch.dose_of_token[1], norm)
    out = project_and_rescale(norm, added, table.vector_table, batch.direction_row_of_token[1],
                              batch.projection_of_token[1], batch.target_of_token[1], batch.preserve_of_token[1])
    for t, (slot, pos) in enumerate(zip(req_index, positions)):
        spec, prompt_len = SCHEDULED[slot]
        if spec is None:
            assert torch.equal(out[t], stream[t])
            continue
        want = _scheduled_expected(spec, stream[t].double(), pos, prompt_len)
        torch.testing.assert_close(out[t].double(), want, rtol=1e-5, atol=1e-5, msg=f"request {slot}, position {pos}")


def test_a_dose_is_the_relative_change_of_every_steered_token():
    table = RowTable(64, HIDDEN, torch.float32, torch.device("cpu"))
    batch = SteeringBatch(POINTS, max_tokens=64, max_reqs=2, dtype=torch.float32, device=torch.device("cpu"))
    rows, _ = place_steering(table, {"additions": [{"vector": "v-seq5", "layer": 2, "dose": 0.25}]}, 8)
    batch.fill([rows], torch.zeros(8, dtype=torch.int64), torch.arange(8))
    stream = torch.randn(8, HIDDEN, generator=gen) * torch.arange(1, 9)[:, None]  # norms far apart
    out = add_steering(stream, table.vector_table, batch.row_of_token[2], batch.scale_of_token[2],
                       batch.dose_of_token[2], stream.norm(dim=-1))
    dose = (out - stream).norm(dim=-1) / stream.norm(dim=-1)
    torch.testing.assert_close(dose[:5], torch.full((5,), 0.25), rtol=1e-5, atol=1e-6)
    assert torch.equal(out[5:], stream[5:])  # past the five ActAdd rows


def test_doses_share_rows_across_strengths_and_never_with_coefficients():
    table = RowTable(64, HIDDEN, torch.float32, torch.device("cpu"))
    const = lambda **strength: {"additions": [{"vector": "v-const", "layer": 1, "mode": "constant", **strength}]}
    _, dose_a = place_steering(table, const(dose=0.2), 4)
    _, dose_b = place_steering(table, const(dose=0.7), 4)
    _, coeff = place_steering(table, const(coeff=0.2), 4)
    assert dose_a == dose_b and coeff != dose_a
    assert table.rows_in_use == 2


@pytest.mark.parametrize(
    "payload, message",
    [
        ({"additions": [{"vector": "v-1", "layer": 1, "dose": 0}]}, "steering.additions[0].dose: must be a finite number above 0"),
        ({"additions": [{"vector": "v-1", "layer": 1, "dose": float("inf")}]}, "steering.additions[0].dose: must be a finite"),
        ({"additions": [{"vector": "v-1", "layer": 1}]}, "give exactly one of coeff and dose"),
        ({"additions": [{"vector": "v-1", "layer": 1, "coeff": 1, "dose": 0.1}]}, "give exactly one of coeff and dose"),
        ({"additions": [{"vector": "v-1", "layer": 1, "coeff": 1, "mode": "constant"},
                        {"vector": "v-2", "layer": 1, "dose": 0.1, "mode": "constant"}]}, "layer 1 mixes coeff and dose"),
        ({"additions": [{"vector": "v-1", "layer": 1, "coeff": 1, "mode": "constant", "positions": {"start": 4, "end": 2}}]},
         "steering.additions[0].positions.end: must be greater than start (4), got 2"),
        ({"additions": [{"vector": "v-1", "layer": 1, "coeff": 1, "positions": "generated"}]},
         "actadd rows are front-aligned"),
        ({"projections": [{"vector": "v-1", "layer": 1, "op": "ablate", "positions": "later"}]},
         "steering.projections[0].positions"),
    ],
)
def test_malformed_doses_and_schedules_name_the_field(payload, message):
    with pytest.raises(SteeringSpecError, match=re.escape(message)):
        steering_of({"steering": payload})


def test_too_many_windows_at_one_layer_are_refused():
    windows = [{"vector": "v-const", "layer": 1, "coeff": 1.0, "mode": "constant", "positions": {"start": 2 * i, "end": 2 * i + 1}}
               for i in range(9)]
    with pytest.raises(SteeringSpecError, match="layer 1 cuts the positions into 9 steered segments"):
        plan_layers(EngineSteering.model_validate({"additions": windows}), lambda a: 1)
