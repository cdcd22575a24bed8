"""Server settings that `steer-server serve` hands to the plugins.

vLLM's own argument parser owns the command line of the process that runs the API
server and refuses flags it does not know, so `steer-server serve` takes its own flags
off the command line and passes them on in environment variables, which the plugins
read at start-up in every vLLM process (the engine plugin sizes its table from some of
them: ``steer_vllm.limits``). The vector store location travels in ``STEER_STORE``, the
variable `vector_store.open_store()` already reads.
"""
from __future__ import annotations

import os
from dataclasses import dataclass

from steer_vllm.limits import (
    DEFAULT_MAX_ADDITIONS,
    DEFAULT_MAX_PROMPT_TOKENS,
    MAX_ADDITIONS_ENV,
    MAX_PROMPT_TOKENS_ENV,
    TABLE_ROWS_ENV,
    positive_env,
    positive_int_env,
)
from vector_store.async_access import DEFAULT_FRESH_S, DEFAULT_TIMEOUT_S

ENV_PAD = "STEER_PAD"  # pad text, or "none" for no padding
ENV_MAX_BODY_BYTES = "STEER_MAX_BODY_BYTES"
ENV_STORE_TIMEOUT = "STEER_STORE_TIMEOUT"
ENV_STORE_FRESH = "STEER_STORE_FRESH"
ENV_MAX_DOSE = "STEER_MAX_DOSE"

DEFAULT_PAD = " "  # the paper pads with the tokenizer's token for a single space
DEFAULT_MAX_BODY_BYTES = 32 * 1024 * 1024


@dataclass(frozen=True)
class Settings:
    pad: str | None = DEFAULT_PAD  # None: ActAdd prompts of one layer are not padded
    max_prompt_tokens: int = DEFAULT_MAX_PROMPT_TOKENS  # longest steering prompt, in tokens
    max_additions: int = DEFAULT_MAX_ADDITIONS  # additions in one request's `steering`
    max_body_bytes: int = DEFAULT_MAX_BODY_BYTES  # any request body; larger gets HTTP 413
    table_rows: int | None = None  # steering table rows; None: sized from the model (steer_vllm.limits)
    store_timeout_s: float = DEFAULT_TIMEOUT_S  # longest wait for one vector-store call
    store_fresh_s: float = DEFAULT_FRESH_S  # how long a name lookup is trusted before asking again
    max_dose: float | None = None  # largest relative dose an addition may ask for; None: no limit

    @classmethod
    def from_env(cls) -> "Settings":
        pad = os.environ.get(ENV_PAD, DEFAULT_PAD)
        table_rows = os.environ.get(TABLE_ROWS_ENV)
        max_dose = os.environ.get(ENV_MAX_DOSE)
        return cls(
            pad=None if pad.lower() == "none" else pad,
            max_prompt_tokens=positive_int_env(MAX_PROMPT_TOKENS_ENV, DEFAULT_MAX_PROMPT_TOKENS),
            max_additions=positive_int_env(MAX_ADDITIONS_ENV, DEFAULT_MAX_ADDITIONS),
            max_body_bytes=positive_int_env(ENV_MAX_BODY_BYTES, DEFAULT_MAX_BODY_BYTES),
            table_rows=positive_int_env(TABLE_ROWS_ENV, 0) if table_rows else None,
            store_timeout_s=positive_env(ENV_STORE_TIMEOUT, DEFAULT_TIMEOUT_S, float),
            store_fresh_s=positive_env(ENV_STORE_FRESH, DEFAULT_FRESH_S, float),
            max_dose=positive_env(ENV_MAX_DOSE, 0.0, float) if max_dose else None,
        )

    def to_env(self) -> dict[str, str]:
        env = {
            ENV_PAD: "none" if self.pad is None else self.pad,
            MAX_PROMPT_TOKENS_ENV: str(self.max_prompt_tokens),
            MAX_ADDITIONS_ENV: str(self.max_additions),
            ENV_MAX_BODY_BYTES: str(self.max_body_bytes),
            ENV_STORE_TIMEOUT: repr(self.store_timeout_s),
            ENV_STORE_FRESH: repr(self.store_fresh_s),
        }
        if self.table_rows is not None:
            env[TABLE_ROWS_ENV] = str(self.table_rows)
        if self.max_dose is not None:
            env[ENV_MAX_DOSE] = repr(self.max_dose)
        return env
