"""``GET /playground`` (the page) and ``GET /playground/assets/{name}``, behind the API keys."""
from __future__ import annotations

import json
from dataclasses import dataclass
from functools import cache
from importlib.resources import files
from typing import Annotated

from fastapi import APIRouter, Depends, Request
from fastapi.responses import HTMLResponse, JSONResponse, Response

from steer_server.serving.access import ApiKeys, KeyRoles
from steer_server.measure.data import sentiment_pairs_file, wedding_pairs_file
from steer_server.serving.state import KEY_ROLES_STATE, KEYS_STATE, ServerSettings, SteerIfStarted

PLAYGROUND_PATH = "/playground"
PLAYGROUND_COOKIE = "steer_api_key"
_ASSET_TYPES = {"playground.js": "text/javascript; charset=utf-8", "playground.css": "text/css; charset=utf-8"}
_CONFIG_SLOT = "__STEER_PLAYGROUND_CONFIG__"
_NO_STORE = {"Cache-Control": "no-store"}  # the page embeds server state; never serve it stale
_DATA_FILES = {"sentiment_pairs.jsonl": sentiment_pairs_file, "wedding_pairs.jsonl": wedding_pairs_file}


@cache
def _static(name: str) -> str:
    return (files("steer_server.serving.playground") / "static" / name).read_text(encoding="utf-8")


@dataclass(frozen=True)
class PageCaller:
    """Who asks for the page: the role and tenant of the key in the request's header, else in
    the page's cookie, and which keys the server has (inference open: the page is too)."""

    role: str | None
    tenant: str
    inference_keys: bool
    admin_keys: bool

    @property
    def admitted(self) -> bool:
        return not self.inference_keys or self.role is not None


def page_caller(request: Request) -> PageCaller:
    keys: ApiKeys = getattr(request.app.state, KEYS_STATE)
    roles: KeyRoles = getattr(request.app.state, KEY_ROLES_STATE)
    role, tenant = roles.identify(request.headers.get("authorization"))
    cookie = request.cookies.get(PLAYGROUND_COOKIE)
    if role is None and cookie:
        role, tenant = roles.identify(f"Bearer {cookie}")
    return PageCaller(role, tenant, inference_keys=bool(keys.inference), admin_keys=bool(keys.admin))


Caller = Annotated[PageCaller, Depends(page_caller)]


def playground_router() -> APIRouter:
    """The page's routes, behind the server's keys (vLLM's ``--api-key`` and the role keys)."""
    router = APIRouter(include_in_schema=False)

    @router.get(PLAYGROUND_PATH)
    async def playground_page(caller: Caller, server: SteerIfStarted, settings: ServerSettings) -> HTMLResponse:
        if not caller.admitted:
            return HTMLResponse(_static("login.html"), status_code=401,
                                headers={"WWW-Authenticate": 'Bearer realm="steer-server"', **_NO_STORE})
        config = {
            "keys": caller.inference_keys,
            "roles": caller.admin_keys,
            "num_layers": server.model.num_layers if server else None,
            "hidden_size": server.model.hidden_size if server else None,
            "model_fingerprint": server.model.fingerprint if server else None,
            "max_additions": settings.max_additions,
            # whose library the page shows: the API scopes every call by the key, this only labels it
            "tenant": caller.tenant,
        }
        # "<" escaped so no value can close the script element it sits in
        embedded = json.dumps(config).replace("<", "\\u003c")
        return HTMLResponse(_static("index.html").replace(_CONFIG_SLOT, embedded), headers=_NO_STORE)

    def refused(kind: str, name: str, known, caller: PageCaller) -> JSONResponse | None:
        """404 for a file the page does not ship, 401 without a key; None: serve it."""
        if name not in known:
            return JSONResponse({"error": {"message": f"no playground {kind} {name!r}", "type": "NotFoundError",
                                           "param": None, "code": 404}}, status_code=404)
        if not caller.admitted:
            return JSONResponse({"error": {"message": "the playground needs an API key", "type": "AuthenticationError",
                                           "param": None, "code": 401}}, status_code=401)
        return None

    @router.get(PLAYGROUND_PATH + "/assets/{name}")
    async def playground_asset(name: str, caller: Caller) -> Response:
        return refused("asset", name, _ASSET_TYPES, caller) or Response(
            _static(name), media_type=_ASSET_TYPES[name], headers=_NO_STORE)

    @router.get(PLAYGROUND_PATH + "/data/{name}")
    async def playground_data(name: str, caller: Caller) -> Response:
        """A dataset that ships with the server (the presets build vectors from it)."""
        return refused("data", name, _DATA_FILES, caller) or Response(
            _DATA_FILES[name]().read_bytes(), media_type="application/jsonl")

    return router
