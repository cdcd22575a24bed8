"""Wrapping vLLM's methods, and proving the wrappers are the methods vLLM calls.

vLLM's internals are private and move between versions: a method may be renamed, or a
subclass may override the one we wrapped. Every wrapper is marked, and ``is_hooked``
checks the method a class actually resolves, so a status report can name any hook that
is not in place instead of steering silently doing nothing.
"""
from __future__ import annotations

import logging
from collections.abc import Callable

logger = logging.getLogger("steer_vllm")

HOOK_MARK = "_steer_hook"


class SteeringNotInstalled(RuntimeError):
    """A hook steering needs is not in place (or vLLM moved what it wraps): the engine is refused."""


def patch(cls: type, name: str, make: Callable[[Callable], Callable]) -> None:
    """Replace ``cls.name`` with ``make(original)``, once. A missing method is left
    missing: the status report then names it and the server refuses to start."""
    current = cls.__dict__.get(name)
    if current is None:
        logger.error("steer_vllm: vLLM's %s.%s does not exist; steering cannot be installed", cls.__qualname__, name)
        return
    if getattr(current, HOOK_MARK, False):
        return
    wrapped = make(current)
    setattr(wrapped, HOOK_MARK, True)
    setattr(cls, name, wrapped)


def is_hooked(cls: type, name: str) -> bool:
    return bool(getattr(getattr(cls, name, None), HOOK_MARK, False))
