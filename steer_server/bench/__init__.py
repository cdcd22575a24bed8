"""``steer-server bench``: what steering costs a vLLM server, measured side by side.

The load itself is vLLM's: requests come from ``vllm bench serve``'s datasets, are sent by its
``benchmark()`` loop and are summarised by its ``calculate_metrics`` into its result format
(TTFT/TPOT/ITL/E2EL means, medians and percentiles, goodput). This package adds only what is
about steering:

- ``vectors``   K random vectors uploaded before the clock starts; the ``steering`` field of each
- ``workload``  paired blocks of requests: a test block (a fraction p steered, spread evenly,
                steering assigned round-robin over the K vectors as per-request body overrides)
                and an all-unsteered reference block, alternating S U, U S, ...
- ``stats``     vLLM's metrics per class (steered, unsteered, unsteered beside steered), ratios
- ``targets``   the project's performance targets checked on a result
- ``servers``   servers the bench starts itself: plain vLLM or ``steer-server serve``, with the
                vector store in SQLite or in a real redis-server behind a latency proxy
- ``latency_proxy`` the TCP proxy that adds a fixed delay to every command sent to Redis
- ``suite``     baselines (plain vLLM vs plugin loaded) and the steering sweep, servers included
- ``premium``   the paper's inference-time premium on an offline ``vllm.LLM``
- ``store_scale`` steered TTFT with names resolved from a store of 100k vectors vs an empty one,
                and the cost of a listing page and of ``names_of`` there
- ``report``, ``plots``  tables, result JSON, figures
- ``cli``       the command line; ``locustfile`` ramp and soak tests against a deployment
"""


class BenchError(RuntimeError):
    """The bench cannot go on; the message says why (no traceback needed)."""
