"""Reference ActAdd (activation addition; Turner et al. 2023, arXiv 2308.10248) on plain
Hugging Face transformers models, written independently of the engine under test: it imports
nothing from the project, only ``torch`` (and the model object it is given).

Conventions (shared with the engine's specification):

* **Layer L** means the residual stream *entering* decoder block L, for 0 <= L <= N (N = number
  of blocks). L = 0 is the embedding output (plus position embeddings for GPT-2, times
  sqrt(hidden) for Gemma — whatever the model feeds block 0); 0 < L < N is HF's
  ``output_hidden_states`` entry ``hidden_states[L]``; L = N is the last block's output
  *before* the final norm (HF's ``hidden_states[N]`` is *after* the final norm for Llama, Qwen2,
  GPT-2). Reading and steering use hooks: a forward pre-hook on block L for L < N, a forward hook
  on the last block's output for L = N.
* **Positions are absolute**: token index in the sequence, 0 = first prompt token. Inside a hook
  they come from the ``position_ids`` the model passes to its blocks (Llama, Qwen2 and GPT-2 in
  transformers 5 do); otherwise from a pre-hook on the top-level model which reads
  ``position_ids`` or the KV cache length. So steering works the same for one full forward pass
  and for incremental decoding with a KV cache.
* **Additions** (dicts; several on one layer are summed, in float32, then added once):

  - ``{"mode": "actadd", "layer": L, "vector": Tensor[k, hidden], "coeff": c[, "anchor": a]}``:
    adds ``c * vector[p - a]`` at absolute positions ``a <= p < a + k`` only (a = 0 by default). During decoding with a KV cache the
    prompt pass steers positions < k (their keys/values in layers >= L carry the change); later
    passes see positions >= k and get nothing — unless the prompt is shorter than k, in which
    case the first generated positions < k are steered too.
  - ``{"mode": "constant", "layer": L, "vector": Tensor[hidden] or [1, hidden], "coeff": c,
    "positions": "all" | "prompt" | "generated" | "after_anchor" | {"start": i[, "end": j]},
    "prompt_len": n[, "anchor": a]}``: adds ``c * vector`` at every position / positions ``< n`` /
    positions ``>= n`` / positions ``>= a`` / positions ``n + i <= p < n + j`` (generated tokens
    i..j-1). ("generated" therefore first affects the logits of the *second* generated token: the
    first one is predicted at position n - 1.) ``prompt_len`` may be omitted in
    ``greedy_with_logprobs`` / ``prompt_logprobs``, which fill in the prompt length.
  - ``"dose": d`` instead of ``coeff`` on an actadd or constant entry: at each position it covers,
    the entry adds ``d * ‖h‖ * row / ‖row‖`` (h the stream before the layer's steering, row the
    entry's row there; a row under 1e-4 of the vector's largest row norm adds nothing), so that
    entry alone moves the stream by ``d`` relative to its norm.
  - ``{"mode": "ablate", "layer": L, "vector": Tensor[hidden]}`` and ``{"mode": "clamp", "layer": L,
    "vector": Tensor[hidden], "value": v}``: with u the unit vector along ``vector``, after the
    layer's additions the stream becomes ``h - (h.u) u`` (ablate) or ``h + (v - h.u) u`` (clamp)
    at the positions ``positions`` names (default every position; the same choices as constant).
  - any entry may carry ``"norm": "preserve"``: after everything at that layer, each position
    something acted on is rescaled to the norm it had before the layer's steering.

Public API: ``decoder_blocks``, ``final_norm``, ``num_layers``, ``capture_residual``, ``residual_stream``,
``actadd_vector``, ``steering``, ``forward_logits``, ``prompt_logprobs``,
``greedy_with_logprobs``.
"""

from __future__ import annotations

import contextlib
from typing import Iterable, Iterator, Sequence

import torch
from torch import nn

__all__ = [
    "decoder_blocks",
    "final_norm",
    "num_layers",
    "capture_residual",
    "residual_stream",
    "actadd_vector",
    "steering",
    "forward_logits",
    "prompt_logprobs",
    "greedy_with_logprobs",
]

# (path to the block list, path to the final norm) for the families we know.
_LAYOUTS = (
    ("model.layers", "model.norm"),  # Llama, Qwen2, Mistral, Gemma, Phi-3, ...
    ("transformer.h", "transformer.ln_f"),  # GPT-2, GPT-J, Falcon, Bloom-style
    ("gpt_neox.layers", "gpt_neox.final_layer_norm"),  # GPT-NeoX, Pythia
    ("model.decoder.layers", "model.decoder.final_layer_norm"),  # OPT
)


def _get(obj, dotted: str):
    for part in dotted.split("."):
        obj = getattr(obj, part, None)
        if obj is None:
            return None
    return obj


def decoder_blocks(model: nn.Module) -> nn.ModuleList:
    """The model's list of decoder blocks."""
    for blocks_path, _ in _LAYOUTS:
        blocks = _get(model, blocks_path)
        if isinstance(blocks, nn.ModuleList):
            return blocks
    raise TypeError(f"don't know where the decoder blocks of {type(model).__name__} are")


def final_norm(model: nn.Module) -> nn.Module:
    """The norm applied after the last block (not part of the residual stream at layer N)."""
    for blocks_path, norm_path in _LAYOUTS:
        if isinstance(_get(model, blocks_path), nn.ModuleList):
            norm = _get(model, norm_path)
            if norm is not None:
                return norm
    raise TypeError(f"don't know where the final norm of {type(model).__name__} is")


def num_layers(model: nn.Module) -> int:
    return len(decoder_blocks(model))


# ---------------------------------------------------------------------------------------------
# Absolute positions inside hooks.


class _Positions:
    """Absolute positions of the tokens in the current forward call of ``model``."""

    def __init__(self, model: nn.Module):
        self.current: torch.Tensor | None = None
        self.handle = model.register_forward_pre_hook(self._pre, with_kwargs=True)

    def _pre(self, module, args, kwargs):
        pos = kwargs.get("position_ids")
        if pos is None:
            ids = kwargs.get("input_ids", args[0] if args else None)
            if ids is None:
                ids = kwargs.get("inputs_embeds")
            if ids is None:
                self.current = None
                return None
            past = kwargs.get("past_key_values")
            start = past.get_seq_length() if past is not None else 0
            pos = torch.arange(ids.shape[1]).unsqueeze(0) + start
        self.current = pos
        return None

    def remove(self):
        self.handle.remove()


def _positions_for(kwargs: dict, tracker: _Positions | None, hidden: torch.Tensor) -> torch.Tensor:
    """Positions as a [B, S] (or [1, S]) long tensor matching ``hidden`` [B, S, H]."""
    pos = kwargs.get("position_ids")
    if pos is None and tracker is not None:
        pos = tracker.current
    if pos is None:
        raise RuntimeError("cannot determine absolute positions in this forward call")
    pos = pos.to(hidden.device).long()
    if pos.dim() == 1:
        pos = pos.unsqueeze(0)
    if pos.shape[-1] != hidden.shape[1]:
        raise RuntimeError(f"positions {tuple(pos.shape)} do not match stream {tuple(hidden.shape)}")
    return pos


# ---------------------------------------------------------------------------------------------
# Reading and modifying the stream entering block L.


def _check_layer(model: nn.Module, layer: int) -> int:
    n = num_layers(model)
    if not 0 <= layer <= n:
        raise ValueError(f"layer {layer} outside [0, {n}]")
    return n


def _register(model: nn.Module, layer: int, fn) -> torch.utils.hooks.RemovableHandle:
    """Register ``fn(hidden, kwargs) -> new hidden or None`` on the stream entering ``layer``:
    a pre-hook on block ``layer``, or for layer == N a forward hook on the last block's output.
    Hooks on one point run in registration order, each seeing the previous ones' changes."""
    n = _check_layer(model, layer)
    blocks = decoder_blocks(model)
    if layer < n:

        def pre_hook(module, args, kwargs):
            if args:
                new = fn(args[0], kwargs)
                return None if new is None else ((new,) + tuple(args[1:]), kwargs)
            new = fn(kwargs["hidden_states"], kwargs)
            return None if new is None else (args, {**kwargs, "hidden_states": new})

        return blocks[layer].register_forward_pre_hook(pre_hook, with_kwargs=True)

    def post_hook(module, args, kwargs, output):
        hidden = output[0] if isinstance(output, tuple) else output
        new = fn(hidden, kwargs)
        if new is None:
            return None
        return (new,) + tuple(output[1:]) if isinstance(output, tuple) else new

    return blocks[n - 1].register_forward_hook(post_hook, with_kwargs=True)


@contextlib.contextmanager
def capture_residual(model: nn.Module, layer: int) -> Iterator[list]:
    """Collect the stream entering ``layer`` ([B, S, H] float32 copies), one entry per forward
    call. Inside a ``steering`` context (entered first) the captured stream includes the
    steering added at that layer."""
    captured: list[torch.Tensor] = []

    def grab(hidden, kwargs):
        captured.append(hidden.detach().float().clone())
        return None

    handle = _register(model, layer, grab)
    try:
        yield captured
    finally:
        handle.remove()


@contextlib.contextmanager
def _eval(model: nn.Module):
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            yield
    finally:
        model.train(was_training)


def residual_stream(model: nn.Module, token_ids: Sequence[int], layer: int) -> torch.Tensor:
    """The residual stream entering decoder block ``layer`` for one sequence: [len, hidden]
    float32. One full forward pass without cache, positions 0..len-1."""
    ids = torch.tensor([list(token_ids)], dtype=torch.long)
    with _eval(model), capture_residual(model, layer) as got:
        model(input_ids=ids, use_cache=False)
    assert len(got) == 1
    return got[0][0]


def actadd_vector(
    model: nn.Module,
    prompt_token_ids: Sequence[Sequence[int]],
    coeffs: Sequence[float],
    layer: int,
    pad_token_id: int,
) -> torch.Tensor:
    """The ActAdd steering sequence [k, hidden] (float32), k = longest prompt: each prompt is
    right-padded with ``pad_token_id`` to length k, run on its own, and its stream entering
    ``layer`` is weighted by its coefficient; the weighted streams are summed per position."""
    prompts = [list(p) for p in prompt_token_ids]
    if len(prompts) != len(coeffs) or not prompts:
        raise ValueError("need one coefficient per prompt, and at least one prompt")
    k = max(len(p) for p in prompts)
    if k == 0:
        raise ValueError("empty prompts")
    total = None
    for ids, c in zip(prompts, coeffs):
        stream = residual_stream(model, ids + [pad_token_id] * (k - len(ids)), layer)
        term = float(c) * stream
        total = term if total is None else total + term
    return total


# ---------------------------------------------------------------------------------------------
# Steering.


_NAMED_POSITIONS = ("all", "prompt", "generated", "after_anchor")
# A dose's row below this share of its vector's largest row norm counts as zero (a position
# where a contrast pair cancels), as the engine's specification says.
_ZERO_ROW_RATIO = 1e-4


def _check_positions(a: dict) -> None:
    where = a.get("positions", "all")
    if isinstance(where, dict):
        if set(where) - {"start", "end"} or "start" not in where:
            raise ValueError(f"a position window is {{'start'[, 'end']}}, not {where!r}")
    elif where not in _NAMED_POSITIONS:
        raise ValueError(f"positions must be one of {_NAMED_POSITIONS} or a window, not {where!r}")
    needs_prompt = isinstance(where, dict) or where in ("prompt", "generated")
    if needs_prompt and a.get("prompt_len") is None:
        raise ValueError(f"positions={where!r} needs prompt_len")
    a["positions"] = where


def _normalise(addition: dict, hidden_size: int | None) -> dict:
    a = dict(addition)
    mode = a.get("mode")
    vec = torch.as_tensor(a["vector"]).detach().float()
    if mode == "actadd":
        if vec.dim() == 1:
            vec = vec.unsqueeze(0)
        if vec.dim() != 2 or vec.shape[0] == 0:
            raise ValueError("actadd vector must be [k, hidden] with k >= 1")
    elif mode in ("ablate", "clamp"):
        vec = vec.reshape(-1)
        a["value"] = float(a.get("value", 0.0)) if mode == "clamp" else 0.0
        _check_positions(a)
    elif mode == "constant":
        vec = vec.reshape(-1) if vec.dim() == 2 and vec.shape[0] == 1 else vec
        if vec.dim() != 1:
            raise ValueError("constant vector must be [hidden] or [1, hidden]")
        _check_positions(a)
    else:
        raise ValueError(f"unknown mode {mode!r}")
    if hidden_size is not None and vec.shape[-1] != hidden_size:
        raise ValueError(f"vector width {vec.shape[-1]} != hidden size {hidden_size}")
    if "dose" in a:
        a["dose"] = float(a["dose"])
        if not a["dose"] > 0:
            raise ValueError("a dose is above 0")
    a["vector"] = vec
    a["coeff"] = float(a.get("coeff", 1.0))
    a["layer"] = int(a["layer"])
    return a


def _position_mask(a: dict, pos: torch.Tensor) -> torch.Tensor:
    """Which absolute positions ``pos`` an entry's ``positions`` covers."""
    where = a["positions"]
    if isinstance(where, dict):
        start = int(a["prompt_len"]) + int(where["start"])
        end = None if where.get("end") is None else int(a["prompt_len"]) + int(where["end"])
        return (pos >= start) & (pos < end) if end is not None else pos >= start
    if where == "all":
        return torch.ones_like(pos, dtype=torch.bool)
    if where == "prompt":
        return pos < int(a["prompt_len"])
    if where == "generated":
        return pos >= int(a["prompt_len"])
    return pos >= int(a.get("anchor", 0))


def _delta(additions: list[dict], pos: torch.Tensor, before: torch.Tensor) -> torch.Tensor:
    """Sum of the additions at positions ``pos`` [B, S] on the float32 stream ``before``
    [B, S, H], as float32 [B, S, H]: ``coeff * row``, or with a dose ``dose * ‖h‖ * row / ‖row‖``."""
    total = torch.zeros_like(before)
    for a in additions:
        vec = a["vector"].to(before.device)
        if a["mode"] in ("ablate", "clamp"):
            continue
        if a["mode"] == "actadd":
            k = vec.shape[0]
            rel = pos - int(a.get("anchor", 0))
            mask = (rel >= 0) & (rel < k)
            rows = vec[rel.clamp(min=0, max=k - 1)]  # [B, S, H]
        else:
            mask = _position_mask(a, pos)
            rows = vec.expand(*pos.shape, -1)
        if "dose" in a:
            norms = rows.norm(dim=-1, keepdim=True)
            live = norms > _ZERO_ROW_RATIO * vec.reshape(-1, vec.shape[-1]).norm(dim=-1).max()
            rows = torch.where(live, rows / norms.clamp_min(1e-30), 0.0) * a["dose"] * before.norm(dim=-1, keepdim=True)
        else:
            rows = a["coeff"] * rows
        total += rows * mask.unsqueeze(-1)
    return total


@contextlib.contextmanager
def steering(model: nn.Module, additions: Iterable[dict]) -> Iterator[None]:
    """Apply ``additions`` (see the module docstring) to every forward call of ``model`` inside
    the context. Additions on one layer are summed in float32 and added once."""
    hidden_size = getattr(getattr(model, "config", None), "hidden_size", None)
    by_layer: dict[int, list[dict]] = {}
    for add in additions:
        a = _normalise(add, hidden_size)
        _check_layer(model, a["layer"])
        by_layer.setdefault(a["layer"], []).append(a)
    if not by_layer:
        yield
        return
    tracker = _Positions(model)
    handles = []
    try:
        for layer, adds in sorted(by_layer.items()):

            def add_fn(hidden, kwargs, adds=adds):
                pos = _positions_for(kwargs, tracker, hidden)
                before = hidden.float()
                delta = _delta(adds, pos, before)
                steered = before + delta
                acted = delta.ne(0).any(-1, keepdim=True)
                for a in adds:
                    if a["mode"] in ("ablate", "clamp"):
                        unit = a["vector"].to(hidden.device) / a["vector"].norm()
                        along = (steered * unit).sum(-1, keepdim=True)
                        mask = _position_mask(a, pos).unsqueeze(-1)
                        steered = steered + mask * (a["value"] - along) * unit
                        acted = acted | mask
                if any(a.get("norm") == "preserve" for a in adds):
                    rescaled = steered * (before.norm(dim=-1, keepdim=True) / steered.norm(dim=-1, keepdim=True))
                    steered = torch.where(acted, rescaled, steered)
                return steered.to(hidden.dtype)

            handles.append(_register(model, layer, add_fn))
        yield
    finally:
        for h in handles:
            h.remove()
        tracker.remove()


def _fill_prompt_len(additions: Iterable[dict], prompt_len: int) -> list[dict]:
    out = []
    for a in additions:
        if a.get("mode") != "actadd" and a.get("prompt_len") is None:
            a = {**a, "prompt_len": prompt_len}
        out.append(a)
    return out


# ---------------------------------------------------------------------------------------------
# Scoring and decoding.


def forward_logits(
    model: nn.Module, ids: Sequence[int], additions: Iterable[dict] = ()
) -> torch.Tensor:
    """Logits [len, vocab] (float32) of one full forward pass (no cache) over ``ids`` under
    ``additions`` (a constant addition without ``prompt_len`` gets ``len(ids)``)."""
    ids = list(ids)
    additions = _fill_prompt_len(additions, len(ids))
    with _eval(model), steering(model, additions):
        out = model(
            input_ids=torch.tensor([ids]),
            position_ids=torch.arange(len(ids)).unsqueeze(0),
            use_cache=False,
        )
    return out.logits[0].float()


def prompt_logprobs(
    model: nn.Module, ids: Sequence[int], additions: Iterable[dict] = ()
) -> list[float]:
    """``len(ids) - 1`` floats: entry i is log p(ids[i + 1] | ids[: i + 1]) under
    ``additions`` (vLLM's prompt_logprobs without its leading None)."""
    ids = list(ids)
    logp = torch.log_softmax(forward_logits(model, ids, additions), dim=-1)
    nxt = torch.tensor(ids[1:])
    return logp[:-1].gather(1, nxt.unsqueeze(1)).squeeze(1).tolist()


def greedy_with_logprobs(
    model: nn.Module,
    prompt_ids: Sequence[int],
    max_new_tokens: int,
    additions: Iterable[dict] = (),
    eos_token_id: int | None = None,
    margins: list | None = None,
) -> tuple[list[int], list[float]]:
    """Greedy decoding with a KV cache under ``additions``: one pass over the prompt, then one
    token per pass. Returns the chosen token ids and their log-probabilities (computed in
    float32). Stops after ``max_new_tokens``, or after emitting ``eos_token_id`` if given.
    Constant additions without ``prompt_len`` get ``len(prompt_ids)``. If ``margins`` is a list,
    the top-1 minus top-2 logit gap of every step is appended to it (a comparison with another
    engine should not expect the same token where that gap is within float noise)."""
    prompt = list(prompt_ids)
    if not prompt:
        raise ValueError("empty prompt")
    additions = _fill_prompt_len(additions, len(prompt))
    tokens: list[int] = []
    logprobs: list[float] = []
    with _eval(model), steering(model, additions):
        out = model(
            input_ids=torch.tensor([prompt]),
            position_ids=torch.arange(len(prompt)).unsqueeze(0),
            use_cache=True,
        )
        for step in range(max_new_tokens):
            logits = out.logits[0, -1].float()
            if margins is not None:
                top2 = logits.topk(2).values
                margins.append(float(top2[0] - top2[1]))
            logp = torch.log_softmax(logits, dim=-1)
            tok = int(torch.argmax(logp))
            tokens.append(tok)
            logprobs.append(float(logp[tok]))
            if tok == eos_token_id or step == max_new_tokens - 1:
                break
            out = model(
                input_ids=torch.tensor([[tok]]),
                position_ids=torch.tensor([[len(prompt) + step]]),
                past_key_values=out.past_key_values,
                use_cache=True,
            )
    return tokens, logprobs


# ---------------------------------------------------------------------------------------------
# Steering vectors from contrast pairs, written again from their definitions (vector_store/
# compute.py makes them from the engine's captures; this reads transformers' hidden states and
# finds principal components by an eigendecomposition of the scatter matrix, not an SVD).


def hidden_state_streams(model: nn.Module, token_ids: Sequence[int], layers: Iterable[int]) -> dict[int, torch.Tensor]:
    """The stream entering each of ``layers`` for one sequence, {layer: [len, hidden] float32}:
    transformers' ``output_hidden_states`` entries 0..N-1; layer N from the last block's output
    (transformers reports ``hidden_states[N]`` after the final norm)."""
    n = num_layers(model)
    ids = torch.tensor([list(token_ids)], dtype=torch.long)
    with _eval(model), capture_residual(model, n) as after_last_block:
        hidden_states = model(input_ids=ids, use_cache=False, output_hidden_states=True).hidden_states
    streams = {}
    for layer in layers:
        _check_layer(model, layer)
        streams[layer] = (after_last_block[0] if layer == n else hidden_states[layer])[0].float()
    return streams


def contrast_vectors(
    model: nn.Module,
    pairs: Sequence[tuple[Sequence[int], Sequence[int]]],
    layers: Sequence[int],
    method: str,
    position: str,
) -> dict[int, tuple[torch.Tensor, dict]]:
    """{layer: (direction [hidden] float32, stats)} from (positive, negative) token id pairs.

    Each example is its stream at ``position``: ``"last"`` token or ``"mean"`` over its tokens
    after the first (the first alone for a one-token example).
    With P, N the [n, hidden] positives and negatives and d = mean(P) - mean(N):

    * ``mean_diff``: d;
    * ``pca_diff``: u = the top eigenvector of the scatter matrix of the differences P - N, centred
      on their mean; ``pca_center``: the same for the 2n points P - M and N - M, M = (P + N) / 2;
      the direction is (d . u) u: turned so positives project higher, as long as d along u (zero
      where the points do not vary);

    stats: ``norm`` of the direction; ``midpoint``, halfway between the positives' and the
    negatives' mean projection on the unit direction (none for a zero direction);
    ``separation``, the share of the 2n examples whose projection lies on their own side of it;
    ``explained_variance`` (PCA), the top eigenvalue's share of their sum."""
    import numpy as np

    def read(ids: Sequence[int]) -> dict[int, np.ndarray]:
        streams = hidden_state_streams(model, ids, layers)
        out = {}
        for layer, stream in streams.items():
            rows = stream.double().numpy()
            if position == "last":
                out[layer] = rows[len(rows) - 1]
            else:  # every token after the first; a one-token example is its one token
                out[layer] = rows[1:].sum(axis=0) / (len(rows) - 1) if len(rows) > 1 else rows[0]
        return out

    if position not in ("last", "mean"):
        raise ValueError(f"unknown position {position!r}")
    positives = [read(p) for p, _ in pairs]
    negatives = [read(n) for _, n in pairs]
    result = {}
    for layer in layers:
        pos = np.stack([x[layer] for x in positives])
        neg = np.stack([x[layer] for x in negatives])
        gap = pos.mean(axis=0) - neg.mean(axis=0)
        stats: dict = {}
        if method == "mean_diff":
            direction = gap
        elif method in ("pca_diff", "pca_center"):
            if method == "pca_diff":
                points = pos - neg
            else:
                middle = (pos + neg) / 2
                points = np.concatenate([pos - middle, neg - middle])
            centred = points - points.mean(axis=0)
            eigenvalues, eigenvectors = np.linalg.eigh(centred.T @ centred)  # ascending
            if eigenvalues.sum() > 0:
                top = eigenvectors[:, -1]
                direction = (gap @ top) * top
                stats["explained_variance"] = float(eigenvalues[-1] / eigenvalues.sum())
            else:  # points that do not vary have no component: no direction
                direction = np.zeros_like(gap)
        else:
            raise ValueError(f"unknown method {method!r}")
        stats["norm"] = float(np.linalg.norm(direction))
        unit = direction / stats["norm"] if stats["norm"] > 0 else direction
        on_pos, on_neg = pos @ unit, neg @ unit
        midpoint = (on_pos.mean() + on_neg.mean()) / 2
        stats["separation"] = float(((on_pos > midpoint).sum() + (on_neg < midpoint).sum()) / (2 * len(pos)))
        if stats["norm"] > 0:
            stats["midpoint"] = float(midpoint)
        result[layer] = (torch.from_numpy(direction).float(), stats)
    return result


__all__ += ["hidden_state_streams", "contrast_vectors"]
