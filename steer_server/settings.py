"""Server settings that `steer-server serve` hands to the endpoint plugin.

vLLM's own argument parser owns the command line of the process that runs the API
server and refuses flags it does not know, so `steer-server serve` takes its own flags
off the command line and passes them on in these environment variables, which the
plugin (`steer_server.api`) reads at start-up. The vector store location travels in
``STEER_STORE``, the variable `vector_store.open_store()` already reads.
"""
from __future__ import annotations

import os
from dataclasses import dataclass

ENV_PAD = "STEER_PAD"  # pad text, or "none" for no padding
ENV_MAX_PROMPT_TOKENS = "STEER_MAX_PROMPT_TOKENS"
ENV_MAX_ADDITIONS = "STEER_MAX_ADDITIONS"
ENV_MAX_BODY_BYTES = "STEER_MAX_BODY_BYTES"

DEFAULT_PAD = " "  # the paper pads with the tokenizer's token for a single space
DEFAULT_MAX_PROMPT_TOKENS = 64
DEFAULT_MAX_ADDITIONS = 16
DEFAULT_MAX_BODY_BYTES = 32 * 1024 * 1024


@dataclass(frozen=True)
class Settings:
    pad: str | None = DEFAULT_PAD  # None: ActAdd prompts of one layer are not padded
    max_prompt_tokens: int = DEFAULT_MAX_PROMPT_TOKENS  # longest steering prompt, in tokens
    max_additions: int = DEFAULT_MAX_ADDITIONS  # additions in one request's `steering`
    max_body_bytes: int = DEFAULT_MAX_BODY_BYTES  # any request body; larger gets HTTP 413

    @classmethod
    def from_env(cls) -> "Settings":
        pad = os.environ.get(ENV_PAD, DEFAULT_PAD)
        return cls(
            pad=None if pad.lower() == "none" else pad,
            max_prompt_tokens=_positive_int(ENV_MAX_PROMPT_TOKENS, DEFAULT_MAX_PROMPT_TOKENS),
            max_additions=_positive_int(ENV_MAX_ADDITIONS, DEFAULT_MAX_ADDITIONS),
            max_body_bytes=_positive_int(ENV_MAX_BODY_BYTES, DEFAULT_MAX_BODY_BYTES),
        )

    def to_env(self) -> dict[str, str]:
        return {
            ENV_PAD: "none" if self.pad is None else self.pad,
            ENV_MAX_PROMPT_TOKENS: str(self.max_prompt_tokens),
            ENV_MAX_ADDITIONS: str(self.max_additions),
            ENV_MAX_BODY_BYTES: str(self.max_body_bytes),
        }


def _positive_int(name: str, default: int) -> int:
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
