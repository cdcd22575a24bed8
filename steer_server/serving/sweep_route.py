"""``POST /v1/steering/sweeps``: a small layer × coefficient sweep (``steer_server.measure``), run by
the server against itself.

This module's job: the typed body, its bounds (a sweep here shares the engine with everyone
else's requests, so it stays small: ``MAX_CELLS`` cells, ``MAX_PROMPTS`` prompts, short
completions), and the answer: the sweep's result JSON (``SweepResult.as_dict``), or with
``"stream": true`` server-sent events ``progress`` ({done, total}) then ``result`` (or
``error``).

The sweep's requests go through this server's own app in-process (``httpx.ASGITransport``),
with the caller's ``Authorization`` header: they pass the same key check, body middleware and
validation as any client's, and a key that may not create vectors cannot upload the random
floor here either.
"""
from __future__ import annotations

import asyncio
import logging
import functools
import json
import tempfile
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Literal

import httpx
from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, StreamingResponse
from fastapi.security.utils import get_authorization_scheme_param
from pydantic import BaseModel, ConfigDict, Field, model_validator

from steer_server.serving.access import Tenant
from steer_server.client import MAX_CELLS, SWEEPS_PATH
from steer_server.measure.client import EvalError, Sampling, SteerClient
from steer_server.measure.data import wedding_lexicon
from steer_server.measure.metrics import Lexicon
from steer_server.measure.steerings import SERVER_PAD, ContrastPairs, NamedVector, PromptAdditions, Steering
from steer_server.measure.sweep import SweepPlan, run_sweep
from steer_server.serving.route_errors import SteeringRoute
from steer_server.serving.state import Steer
from steer_server.serving.steering import Dose, FiniteFloat, SteeringError
from steer_vllm.spec import Positions, positions_json

logger = logging.getLogger("steer_server")
MAX_PROMPTS = 8
MAX_SAMPLES = 8
MAX_TOKENS = 64
CONCURRENCY = 8
IN_PROCESS_URL = "http://steer-server.in-process"  # the app is reached through its ASGI transport


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)


class WeightedPrompt(Strict):
    prompt: str
    weight: FiniteFloat


class ContrastPair(Strict):
    positive: str
    negative: str


class SweepSteering(Strict):
    """Exactly one of ``prompts`` (ActAdd prompts with weights; coefficient c adds c·weight),
    ``pairs`` (constant: mean last-token differences) or ``vector`` (a stored vector)."""

    prompts: list[WeightedPrompt] | None = Field(None, min_length=1)
    pairs: list[ContrastPair] | None = Field(None, min_length=1)
    vector: str | None = None
    mode: Literal["actadd", "constant"] = "actadd"  # for ``vector``
    positions: Positions = "all"  # for ``pairs`` and constant ``vector``
    pad: str | None = SERVER_PAD  # for ``prompts``; null pads with nothing

    @model_validator(mode="after")
    def _one_source(self) -> SweepSteering:
        given = [name for name in ("prompts", "pairs", "vector") if getattr(self, name) is not None]
        if len(given) != 1:
            raise ValueError(f'give exactly one of "prompts", "pairs" or "vector" (got {len(given)})')
        return self

    def steering(self) -> Steering:
        if self.prompts is not None:
            return PromptAdditions(tuple((p.prompt, p.weight) for p in self.prompts), self.pad)
        if self.pairs is not None:
            return ContrastPairs(tuple((p.positive, p.negative) for p in self.pairs), positions_json(self.positions))
        return NamedVector(self.vector, self.mode, positions_json(self.positions))


class SweepRequest(Strict):
    steering: SweepSteering
    prompts: list[str] = Field(min_length=1, max_length=MAX_PROMPTS)
    layers: list[int] = Field(min_length=1)
    coeffs: list[FiniteFloat] | None = Field(None, min_length=1)
    doses: list[Dose] | None = Field(None, min_length=1)  # relative doses instead of coefficients (a vector)
    lexicon: list[str] | None = Field(None, min_length=1)  # topic words; default: the shipped wedding lexicon
    max_tokens: int = Field(24, ge=1, le=MAX_TOKENS)
    samples: int = Field(4, ge=1, le=MAX_SAMPLES)
    temperature: float = Field(1.0, ge=0.0, le=2.0)
    top_p: float = Field(0.3, gt=0.0, le=1.0)
    repetition_penalty: float | None = Field(1.2, gt=0.0, le=2.0)
    floor: bool = False  # also the random vector of equal norm per cell
    stream: bool = False

    @property
    def values(self) -> list[float]:
        return self.coeffs if self.coeffs is not None else self.doses

    @model_validator(mode="after")
    def _small(self) -> SweepRequest:
        if (self.coeffs is None) == (self.doses is None):
            raise ValueError('give exactly one of "coeffs" and "doses"')
        if self.doses is not None and self.steering.vector is None:
            raise ValueError('"doses" sweep a stored vector ("steering": {"vector": ...}); create one from prompts or pairs')
        cells = len(set(self.layers)) * len(set(self.values))
        if cells > MAX_CELLS:
            raise ValueError(f"{cells} layer × coefficient cells; a sweep here runs at most {MAX_CELLS} "
                             "(run larger ones with `steer-server eval sweep`)")
        return self

    def plan(self) -> SweepPlan:
        lexicon = wedding_lexicon() if self.lexicon is None else Lexicon(
            "custom", frozenset(w.strip().lower() for w in self.lexicon if w.strip()))
        sampling = Sampling(max_tokens=self.max_tokens, temperature=self.temperature, top_p=self.top_p,
                            repetition_penalty=self.repetition_penalty, samples=self.samples)
        return SweepPlan(self.steering.steering(), tuple(self.prompts), tuple(dict.fromkeys(self.layers)),
                         tuple(dict.fromkeys(self.values)), lexicon, sampling, floor=self.floor,
                         strength="coeff" if self.coeffs is not None else "dose")


def sweep_router() -> APIRouter:
    router = APIRouter(route_class=SteeringRoute)

    @router.post(SWEEPS_PATH)
    async def create_sweep(body: SweepRequest, request: Request, server: Steer, tenant: Tenant):
        """Run a small sweep now; the answer is its result (or, with ``stream``, its progress)."""
        for i, layer in enumerate(body.layers):
            server.resolver.check_layer(layer, f"layers[{i}]")
        if body.lexicon is not None and not any(w.strip() for w in body.lexicon):
            raise SteeringError(400, "lexicon: holds no words", "lexicon")
        plan = body.plan()
        await server.quotas.charge_tokens(tenant, plan.generated_tokens(), "this sweep")
        _, token = get_authorization_scheme_param(request.headers.get("authorization"))
        client = SteerClient(IN_PROCESS_URL, token or None, transport=httpx.ASGITransport(app=request.app))
        concurrency = server.quotas.concurrency(tenant, CONCURRENCY)
        if not body.stream:
            try:
                return await _run(client, plan, concurrency, None)
            except EvalError as exc:
                return JSONResponse(_failure(exc), status_code=exc.status or 502)
        return event_stream(progress_events(functools.partial(_run, client, plan, concurrency),
                                            lambda exc: _failure(exc) if isinstance(exc, EvalError) else None))

    return router


async def _run(client: SteerClient, plan: SweepPlan, concurrency: int, on_progress) -> dict:
    with tempfile.TemporaryDirectory(prefix="steer-sweep-") as out_dir:
        async with client:
            return (await run_sweep(client, plan, Path(out_dir), concurrency=concurrency, on_progress=on_progress)).as_dict()


async def progress_events(job: Callable[[Callable[[int, int], None]], Awaitable[dict]], failure: Callable[[Exception], dict | None]):
    """Server-sent events of ``job(on_progress)``: ``progress`` ({done, total}) as it reports,
    then ``result`` (its answer) or ``error`` (``failure(exc)``, or a 500 for an exception
    ``failure`` does not know). A client that goes away cancels the job."""
    progress: asyncio.Queue[tuple[int, int]] = asyncio.Queue()
    task = asyncio.create_task(job(lambda done, total: progress.put_nowait((done, total))))
    try:
        while not task.done() or not progress.empty():
            getter = asyncio.ensure_future(progress.get())
            await asyncio.wait({getter, task}, return_when=asyncio.FIRST_COMPLETED)
            if getter.done():
                done, total = getter.result()
                yield _event("progress", {"done": done, "total": total})
            else:
                getter.cancel()
        try:
            yield _event("result", task.result())
        except Exception as exc:  # noqa: BLE001 - the stream has started: the error goes in it
            body = failure(exc)
            if body is None:
                logger.exception("a streamed job failed")
                body = SteeringError(500, f"internal error: {type(exc).__name__}: {exc}").body()
            yield _event("error", body)
    finally:
        task.cancel()  # the client went away: stop sending the job's requests


def _event(name: str, data: dict) -> str:
    return f"event: {name}\ndata: {json.dumps(data)}\n\n"


def event_stream(events) -> StreamingResponse:
    return StreamingResponse(events, media_type="text/event-stream", headers={"Cache-Control": "no-store"})


def _failure(exc: EvalError) -> dict:
    status = exc.status or 502
    return SteeringError(status, f"the sweep stopped: {exc}").body()
