"""Calling every worker of a running server's engines (statuses, captures, receipts)."""
from __future__ import annotations


async def workers_rpc_async(engine_client, method: str, args: tuple = ()) -> list:
    """``method`` on every worker of every engine of a server's engine client. Under data
    parallelism vLLM's own ``collective_rpc`` reaches the first engine's workers only
    (``DPLBAsyncMPClient.call_utility_async``); each engine core answers for its own."""
    core = engine_client.engine_core
    if hasattr(core, "call_utility_all_async"):
        per_engine = await core.call_utility_all_async("collective_rpc", method, None, args, None)
        return [result for engine in per_engine for result in engine]
    return await engine_client.collective_rpc(method, args=args)
