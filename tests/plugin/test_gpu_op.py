"""The steering op on a GPU, with torch alone (no vLLM needed): one command for whoever
next has a CUDA machine.

    PYTHONPATH=plugins python tests/plugin/test_gpu_op.py        # checks, then timings
    PYTHONPATH=plugins python -m pytest tests/plugin/test_gpu_op.py  # the checks only

Checks: the op replayed inside a CUDA graph, with the per-token buffers refilled in
place for a new batch before each replay, equals the formula computed directly, for
additions, ActAdd rows from an anchor, ablation, clamping and norm preservation, and
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

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA: replays the op in a CUDA graph")
pytestmark = [pytest.mark.gpu, needs_cuda]

HIDDEN, POINTS, TOKENS = 4096, 33, 256


def _table(rows: int, dtype: torch.dtype, generator: torch.Generator) -> torch.Tensor:
    table = torch.randn(rows, HIDDEN, generator=generator).to(dtype)
    table[0] = 0  # the zero row
    table[rows - 1] = table[rows - 1].float().div(table[rows - 1].float().norm()).to(dtype)  # a unit direction
    return table


def _requests(table_rows: int) -> list[tuple[RequestRows | None, dict]]:
    """Four requests at point 1: add with anchor, clamp + norm, ablate, unsteered."""
    unit = table_rows - 1
    specs = [
        dict(front_start=1, front_len=5, prompt_rest_row=0, generated_row=0, direction_row=0, scale=2.0, projection=0.0,
             target=0.0, preserve=False, anchor=3),
        dict(front_start=0, front_len=0, prompt_rest_row=6, generated_row=7, direction_row=unit, scale=1.5, projection=1.0,
             target=4.0, preserve=True, anchor=0),
        dict(front_start=0, front_len=0, prompt_rest_row=0, generated_row=0, direction_row=unit, scale=0.0, projection=1.0,
             target=0.0, preserve=False, anchor=0),
    ]
    requests = []
    for spec in specs:
        rows = RequestRows(POINTS, prompt_len=48, anchor=spec["anchor"])
        rows.set_layer(1, SimpleNamespace(**spec), spec["scale"], spec["projection"], spec["target"], spec["preserve"])
        requests.append((rows, spec))
    return [*requests, (None, {})]


def _expected(stream: torch.Tensor, table: torch.Tensor, spec: dict, position: int) -> torch.Tensor:
    h = stream.double()
    if not spec:
        return h
    rel = position - spec["anchor"]
    if 0 <= rel < spec["front_len"]:
        row = spec["front_start"] + rel
    else:
        row = spec["prompt_rest_row"] if position < 48 else spec["generated_row"]
    y = h + spec["scale"] * table[row].double()
    u = table[spec["direction_row"]].double()
    y = y - spec["projection"] * ((y @ u) - spec["target"]) * u
    return y * (h.norm() / y.norm()) if spec["preserve"] else y


def _op(stream, table, batch, point=1):
    added = add_steering(stream, table, batch.row_of_token[point], batch.scale_of_token[point])
    return project_and_rescale(stream, added, table, batch.direction_row_of_token[point], batch.projection_of_token[point],
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
    for order in ([0, 1, 2, 3], [3, 2, 1, 0], [1, 3, 0, 0]):  # each replay: a new batch, same addresses
        # even slots start at position 0 (ActAdd rows from the anchor), odd ones cross the prompt's end
        positions = [p for slot in range(len(order)) for p in (range(0, 16) if slot % 2 == 0 else range(40, 56))]
        req_index = [slot for slot in range(len(order)) for _ in range(16)]
        batch.fill([requests[i][0] for i in order], torch.tensor(req_index, device=device),
                   torch.tensor(positions, device=device))
        stream.copy_((torch.randn(64, HIDDEN, generator=gen) * 3).to(dtype))
        graph.replay()
        for t, (slot, position) in enumerate(zip(req_index, positions)):
            spec = requests[order[slot]][1]
            if not spec:
                assert torch.equal(out[t], stream[t])
            else:
                torch.testing.assert_close(out[t].double().cpu(), _expected(stream[t].cpu(), table.cpu(), spec, position),
                                           **tol)


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
    exit_code = pytest.main([__file__, "-q"])
    device, dtype = torch.device("cuda"), torch.bfloat16
    gen = torch.Generator().manual_seed(1)
    table = _table(4096, dtype, gen).to(device)
    batch = SteeringBatch(POINTS, max_tokens=TOKENS, max_reqs=64, dtype=dtype, device=device)
    requests = [r for r, _ in _requests(4096)[:3]] * 16  # 48 steered requests
    req_index = torch.arange(TOKENS, device=device) % len(requests)
    positions = torch.arange(TOKENS, device=device) % 64
    batch.fill(requests, req_index, positions)
    stream = torch.randn(TOKENS, HIDDEN, device=device).to(dtype)
    layer = LlamaDecoderLayer().to(device, dtype).eval()
    with torch.no_grad():
        layer_us = _graph_time_us(lambda: layer(stream))
        add_us = _graph_time_us(lambda: add_steering(stream, table, batch.row_of_token[1], batch.scale_of_token[1]))
        full_us = _graph_time_us(lambda: _op(stream, table, batch))
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
    print(f"op, add + project + norm     {full_us:9.1f} us  ({100 * full_us / layer_us:.2f} % of a layer)")
    print(f"fill, {len(requests)} steered requests, one point steered  {fill_us:9.1f} us per step")
    return int(exit_code)


if __name__ == "__main__":
    sys.exit(main())
