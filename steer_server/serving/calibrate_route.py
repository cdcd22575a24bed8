"""``POST /v1/steering/vectors/{name}/calibrate``: find a stored vector's default layer, dose
and positions (``steer_server.serving.calibration``) and store them beside it.

The sweep runs through this server's own app in-process with the caller's key, within the
bounds of ``/v1/steering/sweeps`` (it shares the engine with everyone else's requests). The
answer is the calibration and every cell it measured, or with ``"stream": true``
server-sent events ``progress`` ({done, total}) then ``result`` (or ``error``). Nothing is
written until every cell is measured and a setting chosen, in one store write: a client
that goes away (the stream cancels the run; a plain request is checked before the write) or
a server that stops leaves the vector as it was. ``"store": false`` measures and chooses
without writing.

``PUT /v1/steering/vectors/{name}/calibration`` stores a default given by the caller: set by
hand, or the best of several ``"store": false`` calibrations, which is how the CLI runs grids
larger than one calibration here may be.
"""
from __future__ import annotations

import tempfile
import time
from pathlib import Path
from typing import TYPE_CHECKING

import httpx
from fastapi import APIRouter, Request
from fastapi.security.utils import get_authorization_scheme_param
from pydantic import Field, model_validator

from steer_server.serving.access import Tenant
from steer_server.serving.calibration import (
    DEFAULT_BUDGET,
    CalibrationError,
    ProjectionConcept,
    calibration_of,
    choose,
    default_layers,
    score_cells,
)
from steer_server.client import DEFAULT_DOSES, MAX_CELLS, VECTORS_PATH
from steer_server.measure.client import EvalError, Sampling, SteerClient
from steer_server.measure.data import calibration_prompts, wedding_lexicon
from steer_server.measure.metrics import Lexicon
from steer_server.measure.steerings import NamedVector
from steer_server.measure.sweep import SweepPlan, run_sweep
from steer_server.serving.route_errors import SteeringRoute
from steer_server.serving.state import Steer
from steer_server.serving.steering import Dose, FiniteFloat, SteeringError, bad_request
from steer_server.serving.sweep_route import (
    CONCURRENCY,
    IN_PROCESS_URL,
    MAX_PROMPTS,
    MAX_SAMPLES,
    MAX_TOKENS,
    Strict,
    event_stream,
    progress_events,
)
from steer_vllm.spec import Positions, positions_json

if TYPE_CHECKING:
    from steer_server.serving.state import SteerServer

CALIBRATE_PATH = VECTORS_PATH + "/{name}/calibrate"
CALIBRATION_PATH = VECTORS_PATH + "/{name}/calibration"


class CalibrateRequest(Strict):
    """What to sweep; every field has a default. ``lexicon`` (topic words) judges the concept
    by mentions; without it the vector must come from contrast pairs (its stats hold their
    midpoint) and the concept is read off the model's stream."""

    prompts: list[str] | None = Field(None, min_length=1, max_length=MAX_PROMPTS)
    layers: list[int] | None = Field(None, min_length=1)
    doses: list[Dose] | None = Field(None, min_length=1)
    positions: Positions = "all"
    lexicon: list[str] | None = Field(None, min_length=1)
    budget: FiniteFloat = Field(DEFAULT_BUDGET, gt=0.0)  # nats/token of fluency the setting may cost
    max_tokens: int = Field(32, ge=1, le=MAX_TOKENS)
    samples: int = Field(4, ge=1, le=MAX_SAMPLES)
    temperature: float = Field(1.0, ge=0.0, le=2.0)
    top_p: float = Field(0.3, gt=0.0, le=1.0)
    repetition_penalty: float | None = Field(1.2, gt=0.0, le=2.0)
    stream: bool = False
    store: bool = True  # false: measure and choose only (the CLI's larger grids run in parts)

    @model_validator(mode="after")
    def _small(self) -> CalibrateRequest:
        if self.layers is not None and self.doses is not None:
            cells = len(set(self.layers)) * len(set(self.doses))
            if cells > MAX_CELLS:
                raise ValueError(f"{cells} layer × dose cells; a calibration here runs at most {MAX_CELLS}")
        return self


def calibrate_router() -> APIRouter:
    router = APIRouter(route_class=SteeringRoute)

    @router.post(CALIBRATE_PATH)
    async def calibrate(name: str, body: CalibrateRequest, request: Request, server: Steer, tenant: Tenant):
        """Sweep layers × doses on prompts; store the best setting within the fluency budget
        as the vector's default (``{"vector": name}`` with no coeff or dose then uses it)."""
        content_id, vector = await server.resolver.for_tenant(tenant).vector(name, "name")
        job = await _job(server, name, content_id, vector, body, request, tenant)
        if not body.stream:
            try:
                return await job(None)
            except (EvalError, CalibrationError) as exc:
                raise _refusal(exc) from None
        return event_stream(progress_events(job, lambda exc: _refusal(exc).body()
                                            if isinstance(exc, (EvalError, CalibrationError)) else None))

    _set_calibration_route(router)
    return router


class CalibrationBody(Strict):
    """A vector's default set by hand, or chosen by a client from calibrations run in parts
    (the measurement fields then come with it, as ``calibrate`` returns them)."""

    layer: int
    dose: Dose
    positions: Positions = "all"
    concept: str = Field("set by hand", min_length=1, max_length=200)
    score: FiniteFloat | None = None
    score_interval: list[FiniteFloat] | None = Field(None, min_length=2, max_length=2)
    unsteered_score: FiniteFloat | None = None
    nll_cost: FiniteFloat | None = None
    budget: FiniteFloat | None = Field(None, gt=0.0)
    prompts: int | None = Field(None, ge=1)
    samples: int | None = Field(None, ge=1)


def _set_calibration_route(router: APIRouter) -> None:
    @router.put(CALIBRATION_PATH)
    async def set_calibration(name: str, body: CalibrationBody, server: Steer, tenant: Tenant):
        """Store ``body`` as the vector's default layer, dose and positions (the caller's tenant's)."""
        content_id, vector = await server.resolver.for_tenant(tenant).vector(name, "name")
        mode = _mode_of(vector)
        if mode == "actadd" and body.positions != "all":
            raise bad_request("positions", "an ActAdd sequence is added front-aligned; positions applies to constant vectors")
        server.resolver.check_layer(body.layer, "layer")
        server.resolver.source_layer(vector, body.layer, name, "layer")
        if server.settings.max_dose is not None and body.dose > server.settings.max_dose:
            raise bad_request("dose", f"{body.dose} is over this server's limit of {server.settings.max_dose} (--max-dose)")
        record = {key: value for key, value in body.model_dump().items() if value is not None}
        record.update(positions=positions_json(body.positions), mode=mode, created=time.time())
        stored = await server.store.put_calibration(content_id, record, tenant=tenant)
        return {"object": "steering.calibration", "vector": content_id, "calibration": stored, "stored": True}


def _mode_of(vector) -> str:
    return "constant" if all(t.shape[0] == 1 for t in vector.directions.values()) else "actadd"


def _refusal(exc: Exception) -> SteeringError:
    if isinstance(exc, CalibrationError):
        return SteeringError(422, f"calibration: {exc}; the vector is unchanged", "doses", reason="invalid")
    return SteeringError(getattr(exc, "status", None) or 502, f"the calibration stopped: {exc}; the vector is unchanged")


async def _job(server: SteerServer, name: str, content_id: str, vector, body: CalibrateRequest, request: Request,
               tenant: str):
    """Check everything that can be checked before any cell runs; return the run. Its cells
    go through this server's own routes with the caller's key, so they steer as its tenant."""
    mode = _mode_of(vector)
    if mode == "actadd" and body.positions != "all":
        raise bad_request("positions", "an ActAdd sequence is added front-aligned; positions applies to constant vectors")
    layers = body.layers or default_layers(vector.layers, server.model.num_layers)
    for i, layer in enumerate(layers):
        server.resolver.check_layer(layer, f"layers[{i}]")
        server.resolver.source_layer(vector, layer, name, f"layers[{i}]")
    doses = body.doses or list(DEFAULT_DOSES)
    layers = list(dict.fromkeys(layers))
    if len(layers) * len(set(doses)) > MAX_CELLS:
        raise bad_request("layers", f"{len(layers)} layers × {len(set(doses))} doses is over {MAX_CELLS} cells; "
                                    "give fewer layers or doses")
    concept = None
    if body.lexicon is None:
        concept = _projection(server, name, vector, layers)
    elif not any(w.strip() for w in body.lexicon):
        raise bad_request("lexicon", "holds no words")
    lexicon = wedding_lexicon() if body.lexicon is None else Lexicon(
        "custom", frozenset(w.strip().lower() for w in body.lexicon if w.strip()))
    prompts = tuple(body.prompts or calibration_prompts()[:MAX_PROMPTS])
    sampling = Sampling(max_tokens=body.max_tokens, temperature=body.temperature, top_p=body.top_p,
                        repetition_penalty=body.repetition_penalty, samples=body.samples)
    positions = positions_json(body.positions)
    plan = SweepPlan(NamedVector(content_id, mode, positions), prompts, tuple(layers),
                     tuple(dict.fromkeys(doses)), lexicon, sampling, floor=False, strength="dose")
    # The readout of a projection concept captures each completion again.
    await server.quotas.charge_tokens(tenant, plan.generated_tokens() * (2 if concept else 1), "this calibration")
    _, token = get_authorization_scheme_param(request.headers.get("authorization"))
    client = SteerClient(IN_PROCESS_URL, token or None, transport=httpx.ASGITransport(app=request.app))

    async def run(on_progress) -> dict:
        with tempfile.TemporaryDirectory(prefix="steer-calibrate-") as out_dir:
            async with client:
                result = await run_sweep(client, plan, Path(out_dir), on_progress=on_progress,
                                         concurrency=server.quotas.concurrency(tenant, CONCURRENCY))
        unsteered_nll, cells = await score_cells(result, concept)
        if unsteered_nll.value is None:
            raise CalibrationError("the unsteered completions produced no tokens to score")
        best = choose(cells, unsteered_nll.value, body.budget)
        calibration = calibration_of(best, unsteered_nll.value, positions=positions, mode=mode,
                                     concept="projection" if concept else f"lexicon:{lexicon.name}",
                                     budget=body.budget, prompts=len(prompts), samples=body.samples)
        if not body.store:
            stored = calibration.as_json()
        elif await request.is_disconnected():  # the caller is gone: leave the vector as it was
            raise CalibrationError("the client disconnected before the result was stored")
        else:
            stored = await server.store.put_calibration(content_id, calibration.as_json(), tenant=tenant)
        return {"object": "steering.calibration", "vector": content_id, "calibration": stored, "stored": body.store,
                "unsteered_nll": unsteered_nll.as_dict(), "cells": [c.as_dict(unsteered_nll.value) for c in cells]}

    return run


def _projection(server: SteerServer, name: str, vector, layers: list[int]) -> dict[int, ProjectionConcept]:
    """Per sweep layer, the stream readout of a vector made from pairs: at the vector's own
    layer (one with several layers reads at each layer it is swept at)."""
    readouts = {}
    for layer in layers:
        source = server.resolver.source_layer(vector, layer, name, "layers")
        midpoint = (vector.meta.stats.get(str(source)) or {}).get("midpoint")
        if midpoint is None:
            raise bad_request("lexicon", f"vector {name!r} was not made from contrast pairs (no midpoint of their "
                                         f"projections at layer {source}): give a lexicon to judge the concept by")
        readouts[layer] = ProjectionConcept(server.computer.streams, source, vector.directions[source], midpoint)
    return readouts
