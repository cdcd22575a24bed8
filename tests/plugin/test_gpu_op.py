"""The steering op on a GPU, with torch alone (no vLLM needed): one command for whoever
next has a CUDA machine.

    PYTHONPATH=plugins python tests/plugin/test_gpu_op.py        # checks, then timings
    PYTHONPATH=plugins python -m pytest tests/plugin/test_gpu_op.py  # the checks only

Checks: the op replayed inside a CUDA graph, with the per-token buffers refilled in
place for a new batch before each replay, equals the formula computed directly, for
additions, ActAdd rows from an anchor, doses, position windows, ablation, clamping and
norm preservation, and
leaves unsteered tokens bit-identical. Timings (CUDA events, graphs replayed): the op
beside a Llama-shaped decoder layer (hidden 4096, 32 heads, 8 KV heads, MLP 14336, 256
tokens, bf16), and the per-step fill. Record the figures in BENCHMARKS.md.
"""
from __future__ import annotations

import sys
from types import SimpleNamespace

import pytest
import torch

from steer_vllm.batch import RequestRows, SteeringBatch
from steer_vllm.ops import add_steering, project_and_rescale
from steer_vllm.segments import ANCHOR, FRONT_END, NO_END, PROMPT_END, START, Segment

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA: replays the op in a CUDA graph")
pytestmark = [pytest.mark.gpu, needs_cuda]

HIDDEN, POINTS, TOKENS = 4096, 33, 256


def _table(rows: int, dtype: torch.dtype, generator: torch.Generator) -> torch.Tensor:
    table = torch.randn(rows, HIDDEN, generator=generator).to(dtype)
    table[0] = 0  # the zero row
    table[rows - 1] = table[rows - 1].float().div(table[rows - 1].float().norm()).to(dtype)  # a unit direction
    return table


PROMPT_LEN = 48


def _plan(segments, *, scale=0.0, dose=0.0, front_len=0, projection=None, direction_row=None, preserve=False):
    """A layer plan at point 1 whose rows start at table row 0 (what ``plans.LayerPlan`` gives the fill)."""
    return SimpleNamespace(layer=1, segments=tuple(Segment(*s) for s in segments), front_len=front_len,
                           projection=projection, direction_row=direction_row, relative=bool(dose),
                           scale=dose or scale, preserve_norm=preserve)


def _requests(table_rows: int) -> list[tuple[RequestRows | None, SimpleNamespace | None, int]]:
    """Five requests at point 1: ActAdd rows from an anchor; constant rows on the prompt and
    generated tokens with a clamp and norm; an ablation; a dose on a window of generated
    tokens beside an ablation of the prompt; unsteered."""
    unit = table_rows - 1
    clamp, ablate = SimpleNamespace(op="clamp", value=4.0), SimpleNamespace(op="ablate", value=0.0)
    specs = [
        (_plan([((ANCHOR, 0), (FRONT_END, 0), 1, 1, False)], scale=2.0, front_len=5), 3),
        (_plan([((START, 0), (PROMPT_END, 0), 6, 0, True), ((PROMPT_END, 0), (NO_END, 0), 7, 0, True)], scale=1.5,
               projection=clamp, direction_row=unit, preserve=True), 0),
        (_plan([((START, 0), (NO_END, 0), None, 0, True)], projection=ablate, direction_row=unit), 0),
        (_plan([((START, 0), (PROMPT_END, 0), None, 0, True), ((PROMPT_END, 2), (PROMPT_END, 6), 8, 0, False)], dose=0.3,
               projection=ablate, direction_row=unit), 0),
    ]
    requests = []
    for plan, anchor in specs:
        rows = RequestRows(POINTS, prompt_len=PROMPT_LEN, anchor=anchor)
        rows.set_layer(plan, 0)
        requests.append((rows, plan, anchor))
    return [*requests, (None, None, 0)]


def _expected(stream: torch.Tensor, table: torch.Tensor, plan, anchor: int, position: int) -> torch.Tensor:
    """float64, from the plan read directly: the segment holding the position, then the formula."""
    h = stream.double()
    if plan is None:
        return h
    where = {START: 0, ANCHOR: anchor, FRONT_END: anchor + plan.front_len, PROMPT_END: PROMPT_LEN, NO_END: 1 << 40}
    held = [s for s in plan.segments if where[s.lo[0]] + s.lo[1] <= position < where[s.hi[0]] + s.hi[1]]
    if not held:
        return h
    (segment,) = held
    y = h
    if segment.row is not None:
        row = table[segment.row + segment.stride * (position - where[segment.lo[0]] - segment.lo[1])].double()
        y = h + (plan.scale * h.norm() if plan.relative else plan.scale) * row
    if segment.project:
        u = table[plan.direction_row].double()
        y = y - ((y @ u) - (plan.projection.value if plan.projection.op == "clamp" else 0.0)) * u
    return y * (h.norm() / y.norm()) if plan.preserve_norm else y


def _op(stream, table, batch, point=1):
    norm = stream.float().norm(dim=-1)
    added = add_steering(stream, table, batch.row_of_token[point], batch.scale_of_token[point], batch.dose_of_token[point],
                         norm)
    return project_and_rescale(norm, added, table, batch.direction_row_of_token[point], batch.projection_of_token[point],
                               batch.target_of_token[point], batch.preserve_of_token[point])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_op_replays_in_a_cuda_graph_with_refilled_buffers(dtype):
    device = torch.device("cuda")
    gen = torch.Generator().manual_seed(0)
    table = _table(64, dtype, gen).to(device)
    batch = SteeringBatch(POINTS, max_tokens=TOKENS, max_reqs=8, dtype=dtype, device=device)
    stream = torch.zeros(64, HIDDEN, dtype=dtype, device=device)
    warmup = torch.cuda.Stream()
    warmup.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(warmup):
        _op(stream, table, batch)
    torch.cuda.current_stream().wait_stream(warmup)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = _op(stream, table, batch)
    requests = _requests(64)
    tol = dict(rtol=1e-4, atol=1e-4) if dtype == torch.float32 else dict(rtol=2e-2, atol=8e-2)
    for order in ([0, 1, 2, 4], [4, 3, 1, 0], [1, 3, 0, 4]):  # each replay: a new batch, same addresses
        # even slots start at position 0 (ActAdd rows from the anchor), odd ones cross the prompt's end
        positions = [p for slot in range(len(order)) for p in (range(0, 16) if slot % 2 == 0 else range(40, 56))]
        req_index = [slot for slot in range(len(order)) for _ in range(16)]
        batch.fill([requests[i][0] for i in order], torch.tensor(req_index, device=device),
                   torch.tensor(positions, device=device))
        stream.copy_((torch.randn(64, HIDDEN, generator=gen) * 3).to(dtype))
        graph.replay()
        for t, (slot, position) in enumerate(zip(req_index, positions)):
            _, plan, anchor = requests[order[slot]]
            if plan is None:
                assert torch.equal(out[t], stream[t])
            else:
                want = _expected(stream[t].cpu(), table.cpu(), plan, anchor, position)
                torch.testing.assert_close(out[t].double().cpu(), want, **tol)


class LlamaDecoderLayer(torch.nn.Module):
    """A Llama-shaped decoder layer in plain torch (RMSNorm, GQA attention, SwiGLU MLP)."""

    def __init__(self, hidden=HIDDEN, heads=32, kv_heads=8, intermediate=14336):
        super().__init__()
        self.heads, self.kv_heads, self.head_dim = heads, kv_heads, hidden // heads
        self.norm1, self.norm2 = torch.nn.RMSNorm(hidden), torch.nn.RMSNorm(hidden)
        self.qkv = torch.nn.Linear(hidden, (heads + 2 * kv_heads) * self.head_dim, bias=False)
        self.o = torch.nn.Linear(hidden, hidden, bias=False)
        self.gate_up = torch.nn.Linear(hidden, 2 * intermediate, bias=False)
        self.down = torch.nn.Linear(intermediate, hidden, bias=False)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        tokens = h.shape[0]
        q, k, v = self.qkv(self.norm1(h)).split(
            [self.heads * self.head_dim, self.kv_heads * self.head_dim, self.kv_heads * self.head_dim], dim=-1)
        q = q.view(tokens, self.heads, self.head_dim).transpose(0, 1)
        k = k.view(tokens, self.kv_heads, self.head_dim).transpose(0, 1).repeat_interleave(self.heads // self.kv_heads, 0)
        v = v.view(tokens, self.kv_heads, self.head_dim).transpose(0, 1).repeat_interleave(self.heads // self.kv_heads, 0)
        attention = torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True)
        h = h + self.o(attention.transpose(0, 1).reshape(tokens, -1))
        gate, up = self.gate_up(self.norm2(h)).chunk(2, dim=-1)
        return h + self.down(torch.nn.functional.silu(gate) * up)


def _graph_time_us(fn, repeats: int = 200) -> float:
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(3):
            fn()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(repeats):
        graph.replay()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) * 1000 / repeats


def main() -> int:
    if not torch.cuda.is_available():
        print("no CUDA device: nothing to check", file=sys.stderr)
        return 1
    exit_code = pytest.main([__file__, "-q", "--noconftest"])  # the suite's conftest needs the whole server
    device, dtype = torch.device("cuda"), torch.bfloat16
    gen = torch.Generator().manual_seed(1)
    table = _table(4096, dtype, gen).to(device)
    batch = SteeringBatch(POINTS, max_tokens=TOKENS, max_reqs=64, dtype=dtype, device=device)
    requests = [r for r, _, _ in _requests(4096)[:4]] * 12  # 48 steered requests
    req_index = torch.arange(TOKENS, device=device) % len(requests)
    positions = torch.arange(TOKENS, device=device) % 64
    batch.fill(requests, req_index, positions)
    stream = torch.randn(TOKENS, HIDDEN, device=device).to(dtype)
    layer = LlamaDecoderLayer().to(device, dtype).eval()
    with torch.no_grad():
        layer_us = _graph_time_us(lambda: layer(stream))
        add_us = _graph_time_us(lambda: add_steering(stream, table, batch.row_of_token[1], batch.scale_of_token[1]))
        dose_us = _graph_time_us(lambda: add_steering(stream, table, batch.row_of_token[1], batch.scale_of_token[1],
                                                      batch.dose_of_token[1], stream.float().norm(dim=-1)))
        full_us = _graph_time_us(lambda: _op(stream, table, batch))
        fused = torch.compile(_op)  # as vLLM's compiled path runs it: inductor fuses the op's steps
        fused_us = _graph_time_us(lambda: fused(stream, table, batch))
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(50):
        batch.fill(requests, req_index, positions)
    end.record()
    torch.cuda.synchronize()
    fill_us = start.elapsed_time(end) * 1000 / 50
    print(f"device: {torch.cuda.get_device_name()}, torch {torch.__version__}, {TOKENS} tokens, hidden {HIDDEN}, bf16")
    print(f"Llama-shaped decoder layer   {layer_us:9.1f} us")
    print(f"op, add only                 {add_us:9.1f} us  ({100 * add_us / layer_us:.2f} % of a layer)")
    print(f"op, add with doses           {dose_us:9.1f} us  ({100 * dose_us / layer_us:.2f} % of a layer)")
    print(f"op, add + dose + project + norm {full_us:6.1f} us  ({100 * full_us / layer_us:.2f} % of a layer)")
    print(f"the same, torch.compile'd     {fused_us:9.1f} us  ({100 * fused_us / layer_us:.2f} % of a layer)")
    print(f"fill, {len(requests)} steered requests, one point steered  {fill_us:9.1f} us per step")
    return int(exit_code)


if __name__ == "__main__":
    sys.exit(main())
