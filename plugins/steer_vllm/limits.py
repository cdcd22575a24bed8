"""Sizes every steering process agrees on: the API server checks against them, the
scheduler admits by them and the workers allocate them, each computing the same numbers
from the same settings (``steer_vllm.settings.EngineSettings``, which ``steer-server serve``
fills from its flags). Nothing here reads the environment: callers pass their settings.
"""
from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from steer_vllm.settings import EngineSettings

MAX_ADDITIONS = 64  # the engine's limit on additions (and on projected layers) in one request
DEFAULT_MAX_ADDITIONS = 16
DEFAULT_MAX_PROMPT_TOKENS = 64
# Memory the default table may take beyond its floor of 8 largest requests.
DEFAULT_TABLE_BUDGET_BYTES = 64 * 1024 * 1024


def largest_request_rows(num_points: int, settings: EngineSettings) -> int:
    """Table rows of the largest steering the server accepts: every addition on its own
    layer, each an ActAdd sequence of the longest steering prompt (+2 rows for constants)."""
    return min(settings.max_additions, num_points) * (settings.max_prompt_tokens + 2)


def table_rows(num_points: int, max_num_seqs: int, hidden_size: int, dtype_bytes: int,
               settings: EngineSettings) -> int:
    """Rows of the vector table, the zero row included: ``settings.table_rows``
    (``$STEER_TABLE_ROWS``) when set, else room for ``max_num_seqs`` requests of the largest
    size, within 64 MiB, but never less than 8 of them."""
    if settings.table_rows is not None:
        return settings.table_rows
    largest = largest_request_rows(num_points, settings)
    budget_rows = DEFAULT_TABLE_BUDGET_BYTES // (hidden_size * dtype_bytes)
    return 1 + max(8 * largest, min(max_num_seqs * largest, budget_rows))


def table_rows_for_config(vllm_config, settings: EngineSettings) -> int:
    model_config = vllm_config.model_config
    return table_rows(
        num_points=model_config.hf_text_config.num_hidden_layers + 1,
        max_num_seqs=vllm_config.scheduler_config.max_num_seqs,
        hidden_size=model_config.get_hidden_size(),
        dtype_bytes=model_config.dtype.itemsize,
        settings=settings,
    )
