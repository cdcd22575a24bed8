"""The steering op. It only computes: every decision was made when the buffers were filled.
Importable and testable with torch alone (no vLLM).

Per token t at one stream point, with ``r`` the row to add, ``u`` the unit direction,
``s`` the scale, ``a`` the projection weight, ``c`` the target and ``p`` the norm flag::

    h1 = h + s·r                      add
    h2 = h1 − a·((h1·u) − c)·u        project: a = 1, c = 0 ablates; a = 1, c = v clamps to v
    h' = h2 · (p ? ‖h‖/‖h2‖ : 1)      restore the norm the stream had before steering

An unsteered token has r = u = 0 and s = a = c = p = 0: every term is an exact zero
(or an exact factor 1), so its stream is bit-identical to an engine without steering.
Dot products and norms are taken in float32 whatever the model's dtype.
"""
from __future__ import annotations

import torch


def add_steering(
    stream: torch.Tensor,
    vector_table: torch.Tensor,
    row_of_token: torch.Tensor,
    scale_of_token: torch.Tensor,
) -> torch.Tensor:
    """``stream[t] + scale_of_token[t] * vector_table[row_of_token[t]]`` for every token.

    stream ``[tokens, hidden]``; vector_table ``[rows, hidden]``; row_of_token and
    scale_of_token ``[>= tokens]`` (persistent buffers, sliced to the batch).
    """
    num_tokens = stream.shape[0]
    rows = vector_table.index_select(0, row_of_token[:num_tokens])
    return stream + scale_of_token[:num_tokens, None] * rows


def project_and_rescale(
    original: torch.Tensor,
    added: torch.Tensor,
    vector_table: torch.Tensor,
    direction_row_of_token: torch.Tensor,
    projection_of_token: torch.Tensor,
    target_of_token: torch.Tensor,
    preserve_of_token: torch.Tensor,
) -> torch.Tensor:
    """The projection and norm terms applied to ``added`` (``original`` plus the additions).

    Tensors ``[tokens, hidden]``; the per-token buffers ``[>= tokens]``."""
    num_tokens = added.shape[0]
    unit = vector_table.index_select(0, direction_row_of_token[:num_tokens]).float()
    added32 = added.float()
    along = (added32 * unit).sum(-1)
    weight = projection_of_token[:num_tokens] * (along - target_of_token[:num_tokens])
    projected = added32 - weight[:, None] * unit
    preserve = preserve_of_token[:num_tokens]
    ratio = original.float().norm(dim=-1) / projected.norm(dim=-1).clamp_min(torch.finfo(torch.float32).tiny)
    factor = torch.where(preserve > 0, ratio, torch.ones_like(ratio))
    return (projected * factor[:, None]).to(added.dtype)
