"""The steering op. It only computes: every decision was made when the buffers were filled.
Importable and testable with torch alone (no vLLM).

Per token t at one stream point, with ``r`` the row to add, ``u`` the unit direction,
``s`` the scale, ``d`` the dose, ``a`` the projection weight, ``c`` the target and ``p``
the norm flag::

    h1 = h + (s + d·‖h‖)·r            add (a coefficient, or a dose relative to the stream)
    h2 = h1 − a·((h1·u) − c)·u        project: a = 1, c = 0 ablates; a = 1, c = v clamps to v
    h' = h2 · (p ? ‖h‖/‖h2‖ : 1)      restore the norm the stream had before steering

An unsteered token has r = u = 0 and s = d = a = c = p = 0: every term is an exact zero
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
    dose_of_token: torch.Tensor | None = None,
    stream_norm: torch.Tensor | None = None,
) -> torch.Tensor:
    """``stream[t] + (scale[t] + dose[t] * stream_norm[t]) * vector_table[row_of_token[t]]``.

    stream ``[tokens, hidden]``; vector_table ``[rows, hidden]``; the per-token buffers
    ``[>= tokens]`` (persistent, sliced to the batch); ``stream_norm`` ``[tokens]`` float32,
    the whole stream's norm before steering (None where no token has a dose).
    """
    num_tokens = stream.shape[0]
    rows = vector_table.index_select(0, row_of_token[:num_tokens])
    scale = scale_of_token[:num_tokens]
    if stream_norm is not None:
        # A coefficient is exact in the model's dtype, so tokens without a dose keep it bit for bit.
        scale = (scale.float() + dose_of_token[:num_tokens] * stream_norm).to(stream.dtype)
    return stream + scale[:, None] * rows


def project_and_rescale(
    original_norm: torch.Tensor,
    added: torch.Tensor,
    vector_table: torch.Tensor,
    direction_row_of_token: torch.Tensor,
    projection_of_token: torch.Tensor,
    target_of_token: torch.Tensor,
    preserve_of_token: torch.Tensor,
) -> torch.Tensor:
    """The projection and norm terms applied to ``added`` (the stream plus the additions);
    ``original_norm`` ``[tokens]`` float32 is the stream's norm before steering.

    ``added`` ``[tokens, hidden]``; the per-token buffers ``[>= tokens]``."""
    num_tokens = added.shape[0]
    unit = vector_table.index_select(0, direction_row_of_token[:num_tokens]).float()
    added32 = added.float()
    along = (added32 * unit).sum(-1)
    weight = projection_of_token[:num_tokens] * (along - target_of_token[:num_tokens])
    projected = added32 - weight[:, None] * unit
    preserve = preserve_of_token[:num_tokens]
    ratio = original_norm / projected.norm(dim=-1).clamp_min(torch.finfo(torch.float32).tiny)
    factor = torch.where(preserve > 0, ratio, torch.ones_like(ratio))
    return (projected * factor[:, None]).to(added.dtype)
