"""Prometheus metrics of the steering layer, served on vLLM's own ``/metrics``.

vLLM's ``/metrics`` serves prometheus_client's default ``REGISTRY`` (or, with
``PROMETHEUS_MULTIPROC_DIR`` set, a multiprocess collector that reads every process's
values from that directory); metrics created here on the default registry appear in
both cases. They live in the API server process, where requests are resolved.
"""
from __future__ import annotations

from prometheus_client import REGISTRY, Counter, Histogram


def _get_or_create(factory, name: str, documentation: str, **kwargs):
    try:
        return factory(name, documentation, **kwargs)
    except ValueError:  # already registered (module reloaded in one process)
        return REGISTRY._names_to_collectors[name]  # noqa: SLF001


STEERED_REQUESTS = _get_or_create(
    Counter,
    "steer_requests",
    "Requests accepted with a `steering` field, by endpoint and mode.",
    labelnames=("endpoint", "mode"),
)
REJECTED_REQUESTS = _get_or_create(
    Counter,
    "steer_rejected_requests",
    "Requests whose `steering` field was refused, by HTTP status and reason.",
    labelnames=("status", "reason"),
)
VECTOR_CACHE_HITS = _get_or_create(
    Counter,
    "steer_vector_cache_hits",
    "Steering-prompt computations answered from the vector store's computation cache.",
)
VECTOR_CACHE_MISSES = _get_or_create(
    Counter,
    "steer_vector_cache_misses",
    "Steering-prompt computations that had to capture residuals through the engine.",
)
CAPTURE_SECONDS = _get_or_create(
    Histogram,
    "steer_capture_seconds",
    "Wall time of one residual capture through the engine (a batch of prompts).",
    buckets=(0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0),
)
