"""Where chat steering starts: the first token of the last user message's content.

ActAdd adds its rows at the first k positions it is given. In a chat those would be the
template's own tokens (``<|im_start|>system…``), which barely move the answer; the paper
adds at the start of the user's prompt. So for chat and responses requests, ActAdd row 0
falls on the first token of the last user message's content (``"anchor": "user"``, the
default), found in the prompt exactly as vLLM rendered it; ``"anchor": "template"`` keeps
position 0 of the templated prompt.
"""
from __future__ import annotations

from typing import Any

from steer_server.serving.steering import bad_request


def _text_of(content: Any) -> str | None:
    if isinstance(content, str):
        return content
    if isinstance(content, list):  # content parts: the last text part is what the user typed last
        texts = [part.get("text") for part in content if isinstance(part, dict) and isinstance(part.get("text"), str)]
        return texts[-1] if texts else None
    return None


def last_user_text(path: str, payload: dict) -> str | None:
    """The text of the last user message of a chat or responses request."""
    if path == "/v1/responses":
        items = payload.get("input")
        if isinstance(items, str):
            return items
        messages = [m for m in items or [] if isinstance(m, dict) and m.get("role") == "user"]
    else:
        messages = [m for m in payload.get("messages") or [] if isinstance(m, dict) and m.get("role") == "user"]
    return _text_of(messages[-1].get("content")) if messages else None


def user_anchor(prompt_ids: list[int], user_text: str, decode) -> int:
    """Index of the prompt token where ``user_text`` starts (its last occurrence).

    ``decode(ids) -> str`` is the tokenizer's decoding (special tokens kept). Decoded
    prefixes only grow with more tokens, so the token is found by bisection."""
    stripped = user_text.strip()
    text = decode(prompt_ids)
    start = text.rfind(stripped) if stripped else -1
    if start < 0:
        raise bad_request(
            "steering.anchor",
            'the last user message was not found in the prompt the chat template made; use "anchor": "template" '
            "to steer from the template's first token",
        )
    low, high = 0, len(prompt_ids) - 1
    while low < high:  # smallest i whose prefix ids[: i + 1] reaches past `start`
        middle = (low + high) // 2
        if len(decode(prompt_ids[: middle + 1])) > start:
            high = middle
        else:
            low = middle + 1
    return low
