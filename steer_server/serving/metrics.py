"""Prometheus metrics of the steering layer, served on vLLM's own ``/metrics``.

vLLM's ``/metrics`` serves prometheus_client's default ``REGISTRY``, or, with
``PROMETHEUS_MULTIPROC_DIR`` set, a registry whose ``MultiProcessCollector`` sums every
process's values from that directory (``vllm/v1/metrics/prometheus.py``). vLLM sets that
variable itself before it spawns the API processes of ``--api-server-count N`` (N > 1,
``vllm/entrypoints/cli/serve.py``, ``run_multi_api_server``); each spawned process imports
prometheus_client afresh with the variable set, so the counters below, created at import in
every API process, write their values to that directory and ``/metrics`` on any of them
reports the sum over all of them. The metrics live in the API processes, where requests are
resolved; none is a gauge, so no multiprocess mode has to be chosen.

What ``deploy/grafana/steer-server.json`` derives from them (PromQL there):

- steered share: ``steer_requests_total`` over vLLM's own ``vllm:request_success_total``;
- per mode and per operation: ``steer_requests_total{mode}``,
  ``steer_operation_requests_total{operation}``;
- vector cache hit rate: hits / (hits + misses);
- capture time: the ``steer_capture_seconds`` histogram;
- refused requests: ``steer_rejected_requests_total{status, reason}``.

Requests and refusals also carry ``tenant``: the caller's tenant with ``--metrics-tenant-label``
(bounded: the tenants of the keys file), else empty, which Prometheus stores as no label at all,
so the dashboard's queries read the same either way.
"""
from __future__ import annotations

import logging
from collections.abc import Iterable
from typing import TYPE_CHECKING

from prometheus_client import REGISTRY, Counter, Histogram

if TYPE_CHECKING:
    from steer_server.serving.steering import SteeringError

logger = logging.getLogger("vllm.steer_server")  # under "vllm": printed with vLLM's log handler

# The paths that take a steering field, and each one's ``endpoint`` label.
STEERED_PATHS = {"/v1/completions": "completions", "/v1/chat/completions": "chat", "/v1/responses": "responses"}


def _get_or_create(factory, name: str, documentation: str, **kwargs):
    try:
        return factory(name, documentation, **kwargs)
    except ValueError:  # already registered (module reloaded in one process)
        return REGISTRY._names_to_collectors[name]  # noqa: SLF001


STEERED_REQUESTS = _get_or_create(
    Counter,
    "steer_requests",
    "Requests accepted with a `steering` field, by endpoint, mode and (--metrics-tenant-label) tenant.",
    labelnames=("endpoint", "mode", "tenant"),
)
OPERATION_REQUESTS = _get_or_create(
    Counter,
    "steer_operation_requests",
    "Steered requests using each steering operation (a request mixing operations counts once under each).",
    labelnames=("endpoint", "operation", "tenant"),
)
REJECTED_REQUESTS = _get_or_create(
    Counter,
    "steer_rejected_requests",
    "Requests refused by the steering layer (the `steering` field; vector writes without the admin role), "
    "by HTTP status, reason and (--metrics-tenant-label) tenant.",
    labelnames=("status", "reason", "tenant"),
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


def tenant_label(tenant: str, labelled: bool) -> str:
    """The ``tenant`` label's value: the tenant with ``--metrics-tenant-label`` (``labelled``), else empty."""
    return tenant if labelled else ""


def count_steered(endpoint: str, mode: str, operations: Iterable[str], tenant: str = "") -> None:
    """One accepted steered request on ``endpoint`` ("completions" | "chat" | "responses");
    ``tenant``: ``tenant_label``'s value."""
    STEERED_REQUESTS.labels(endpoint=endpoint, mode=mode, tenant=tenant).inc()
    for operation in sorted(set(operations)):
        OPERATION_REQUESTS.labels(endpoint=endpoint, operation=operation, tenant=tenant).inc()


def count_rejected(status: int, reason: str, tenant: str = "") -> None:
    """One request refused by the steering layer; ``tenant``: ``tenant_label``'s value."""
    REJECTED_REQUESTS.labels(status=str(status), reason=reason, tenant=tenant).inc()


def note_refusal(path: str, error: SteeringError, tenant_label: str = "") -> None:
    """A request on ``path`` refused with ``error``: counted, and logged."""
    count_rejected(error.status, error.reason, tenant_label)
    logger.info("refused steering on %s: %s", path, error.message)
