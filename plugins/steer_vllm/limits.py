"""Sizes every steering process agrees on: the API server checks against them, the
scheduler admits by them and the workers allocate them, each computing the same numbers
from the same configuration (``steer-server serve`` passes its flags in these variables).
"""
from __future__ import annotations

import os

TABLE_ROWS_ENV = "STEER_TABLE_ROWS"  # --steering-table-rows
MAX_ADDITIONS_ENV = "STEER_MAX_ADDITIONS"  # --max-additions
MAX_PROMPT_TOKENS_ENV = "STEER_MAX_PROMPT_TOKENS"  # --max-steering-prompt-tokens

DEFAULT_MAX_ADDITIONS = 16
DEFAULT_MAX_PROMPT_TOKENS = 64
# Memory the default table may take beyond its floor of 8 largest requests.
DEFAULT_TABLE_BUDGET_BYTES = 64 * 1024 * 1024


def positive_int_env(name: str, default: int) -> int:
    raw = os.environ.get(name)
    if raw is None or raw == "":
        return default
    try:
        value = int(raw)
    except ValueError:
        raise ValueError(f"${name} must be a positive integer, got {raw!r}") from None
    if value <= 0:
        raise ValueError(f"${name} must be a positive integer, got {raw!r}")
    return value


def largest_request_rows(num_points: int) -> int:
    """Table rows of the largest steering the server accepts: every addition on its own
    layer, each an ActAdd sequence of the longest steering prompt (+2 rows for constants)."""
    max_additions = positive_int_env(MAX_ADDITIONS_ENV, DEFAULT_MAX_ADDITIONS)
    max_prompt_tokens = positive_int_env(MAX_PROMPT_TOKENS_ENV, DEFAULT_MAX_PROMPT_TOKENS)
    return min(max_additions, num_points) * (max_prompt_tokens + 2)


def table_rows(num_points: int, max_num_seqs: int, hidden_size: int, dtype_bytes: int) -> int:
    """Rows of the vector table, the zero row included: ``$STEER_TABLE_ROWS`` when set,
    else room for ``max_num_seqs`` requests of the largest size, within 64 MiB, but
    never less than 8 of them."""
    explicit = os.environ.get(TABLE_ROWS_ENV)
    if explicit:
        rows = positive_int_env(TABLE_ROWS_ENV, 0)
        if rows < 2:
            raise ValueError(f"${TABLE_ROWS_ENV} must be at least 2 (row 0 is the zero row)")
        return rows
    largest = largest_request_rows(num_points)
    budget_rows = DEFAULT_TABLE_BUDGET_BYTES // (hidden_size * dtype_bytes)
    return 1 + max(8 * largest, min(max_num_seqs * largest, budget_rows))


def table_rows_for_config(vllm_config) -> int:
    model_config = vllm_config.model_config
    return table_rows(
        num_points=model_config.hf_text_config.num_hidden_layers + 1,
        max_num_seqs=vllm_config.scheduler_config.max_num_seqs,
        hidden_size=model_config.get_hidden_size(),
        dtype_bytes=model_config.dtype.itemsize,
    )
