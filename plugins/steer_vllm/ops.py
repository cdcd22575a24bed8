"""The residual add. It only computes: every decision was made when the buffers were filled."""
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
    scale_of_token ``[>= tokens]`` (persistent buffers, sliced to the batch). Unsteered
    tokens point at the all-zero row with scale 0, which adds exactly 0.
    """
    num_tokens = stream.shape[0]
    rows = vector_table.index_select(0, row_of_token[:num_tokens])
    return stream + scale_of_token[:num_tokens, None] * rows
