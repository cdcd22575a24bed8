"""Measure steering on any running steer-server, over HTTP only.

``run_sweep`` (layers × coefficients of one steering, with a random-vector floor) and
``run_paper`` (the ActAdd paper's experiments) are the importable entry points;
``steer-server eval sweep | paper`` are their command lines.

    import asyncio
    from pathlib import Path
    from steer_server.eval import PromptAdditions, SteerClient, SweepPlan, run_sweep, wedding_lexicon

    async def main():
        plan = SweepPlan(PromptAdditions(((" weddings", 1.0), (" ", -1.0))),
                         prompts=("I went up to my friend and said",), layers=(6, 12), coeffs=(2.0, 4.0),
                         lexicon=wedding_lexicon())
        async with SteerClient("http://127.0.0.1:8000") as client:
            result = await run_sweep(client, plan, Path("out"))
        print(result.cell("steered", 6, 4.0).summary["topic"])  # share, Wilson interval, n

    asyncio.run(main())
"""
from steer_server.measure.client import EvalError, Sampling, SteerClient
from steer_server.measure.data import hostile_prompts, neutral_prompts, offtopic_texts, wedding_lexicon
from steer_server.measure.metrics import Estimate, Lexicon
from steer_server.eval.paper import PaperSettings, run_paper
from steer_server.measure.steerings import ContrastPairs, NamedVector, PromptAdditions
from steer_server.measure.sweep import SweepPlan, SweepResult, run_sweep

__all__ = [
    "ContrastPairs", "Estimate", "EvalError", "Lexicon", "NamedVector", "PaperSettings", "PromptAdditions",
    "Sampling", "SteerClient", "SweepPlan", "SweepResult", "hostile_prompts", "neutral_prompts", "offtopic_texts",
    "run_paper", "run_sweep", "wedding_lexicon",
]
