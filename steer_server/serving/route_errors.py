"""Our routes' errors in the steering format: ``SteeringRoute``, the route class of every router
steer_api adds to vLLM's app (vector routes, sweeps).

This module's job: turn what a route raises (a ``SteeringError``, request validation, the
store's errors) into ``{"error": {"message", "type", "param", "code"}}`` with the field named
(400, never FastAPI's 422). The app-wide alternative, ``app.exception_handler``, would not do:
vLLM registers its own handlers for ``RequestValidationError``, ``ValueError`` (which
``VectorStoreError`` is) and ``Exception`` after endpoint plugins attach
(``vllm/entrypoints/launchers/app.py``), so ours would be replaced, and would change the errors
of vLLM's own routes if they were not.
"""
from __future__ import annotations

import json
from collections.abc import Callable, Coroutine
from typing import Any

from fastapi import Request, Response
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from fastapi.routing import APIRoute
from starlette.exceptions import HTTPException  # FastAPI raises this base class for an undecodable body

from steer_server.serving.steering import SteeringError, bad_request, dotted_path, quota_refusal, store_failure
from steer_vllm.spec import POSITION_TAGS
from vector_store import QuotaExceeded, StoredDataDamaged, StoreUnavailable, VectorNotFound, VectorStoreError


def validation_error(error: dict, union_tags: tuple[str, ...] = ()) -> SteeringError:
    """One pydantic error (a request's first) -> the 400 naming the field. ``union_tags``: the
    tags of a body that is a tagged union, which pydantic puts first in the location."""
    loc = list(error["loc"])
    where = loc.pop(0) if loc and loc[0] in ("body", "query", "path") else "body"
    if where == "body" and loc and loc[0] in union_tags:
        loc.pop(0)
    loc = [part for part in loc if part not in POSITION_TAGS]  # a schedule's union members: not fields
    if error["type"] == "json_invalid":
        return bad_request("body", f"not valid JSON ({error['ctx']['error']})")
    if error["type"] == "missing" and not loc and where == "body":
        return bad_request("body", "empty; send a JSON object")
    message = error["msg"].removeprefix("Value error, ")
    if error["type"] == "extra_forbidden":
        message = "unknown field"
    return bad_request(dotted_path(loc) or where, message)


def _invalid_json(exc: RequestValidationError) -> dict | None:
    """FastAPI's JSON decode error, with the position spelled as ``json`` spells it."""
    error = exc.errors()[0] if exc.errors() else {}
    if error.get("type") != "json_invalid" or not isinstance(exc.body, str):
        return None
    position = error["loc"][-1]
    return {**error, "ctx": {"error": str(json.JSONDecodeError(error["ctx"]["error"], exc.body, position))}}


class SteeringRoute(APIRoute):
    """A route whose errors, request validation included, are steering errors."""

    def validation_error(self, error: dict) -> SteeringError:
        return validation_error(error)

    def as_steering_error(self, exc: Exception) -> SteeringError | None:
        """What the route's exception answers, or None for one that is not ours to answer."""
        if isinstance(exc, SteeringError):
            return exc
        if isinstance(exc, RequestValidationError):
            errors = exc.errors()
            return self.validation_error(_invalid_json(exc) or errors[0]) if errors else bad_request("body", "invalid")
        if isinstance(exc, HTTPException) and isinstance(exc.__cause__, ValueError):
            return bad_request("body", f"not valid JSON ({exc.__cause__})")  # FastAPI could not decode the body
        if isinstance(exc, HTTPException) and isinstance(exc.__cause__, RecursionError):
            return bad_request("body", "JSON nested deeper than this server reads")
        if isinstance(exc, VectorNotFound):
            return SteeringError(404, str(exc))
        if isinstance(exc, QuotaExceeded):
            return quota_refusal(exc)
        if isinstance(exc, (StoreUnavailable, StoredDataDamaged)):
            return store_failure("store", exc)
        if isinstance(exc, VectorStoreError):
            return SteeringError(400, str(exc))
        return None

    def get_route_handler(self) -> Callable[[Request], Coroutine[Any, Any, Response]]:
        handler = super().get_route_handler()

        async def route_handler(request: Request) -> Response:
            try:
                return await handler(request)
            except Exception as exc:
                error = self.as_steering_error(exc)
                if error is None:
                    raise
                return JSONResponse(error.body(), status_code=error.status, headers=error.headers)

        return route_handler
