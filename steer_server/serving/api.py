"""steer_api: the vLLM endpoint plugin that puts steering on vLLM's OpenAI server.

This module's job: the plugin entry point (``SteerApiPlugin``), which puts the routes, the
body middleware and the access control on vLLM's app, and, once the engine is up, starts the
steering state the routes get through their dependencies (``steer_server.serving.state``).

Loaded by vLLM's API server process through the ``vllm.endpoint_plugins`` entry point
``steer_api`` (only when ``VLLM_PLUGINS`` names it; ``steer-server serve`` does that).

One steered request reads top to bottom in ``steer_server.serving.steered_routes`` (the
typed route, quota slot, dose probe, resolution onto the request's ``vllm_xargs``, vLLM's
handler, the receipt), then ``render_hook`` (ActAdd checks on the rendered prompt), then the
engine plugin (``steer_vllm.frontend``: validation against the model, vectors attached,
prefix cache salted; the scheduler admits it when its table rows are free; the workers add
the vectors). ``BodyMiddleware`` only caps bodies and refuses steering where it would be
dropped.

Vector routes (``/v1/steering/vectors``, ``steer_server.serving.vector_routes``) live on the same
app, so vLLM's ``--api-key`` middleware guards them (it guards every path under ``/v1``).
"""
from __future__ import annotations

import logging
from argparse import Namespace

from fastapi import FastAPI

from steer_server.serving.access import KeyRoles, access_problems, configured_keys, install_access_control
from steer_server.serving.calibrate_route import calibrate_router
from steer_server.serving.middleware import BodyMiddleware
from steer_server.serving.playground import playground_router
from steer_server.serving.render_hook import install_render_hooks
from steer_server.serving.state import KEY_ROLES_STATE, KEYS_STATE, SERVER_STATE, SETTINGS_STATE, SteerServer
from steer_server.serving.steered_routes import install_steered_routes, steered_route_problems
from steer_server.serving.sweep_route import sweep_router
from steer_server.serving.vector_routes import vector_router
from steer_server.settings import load_settings

logger = logging.getLogger("vllm.steer_server")  # under "vllm": printed with vLLM's log handler


class SteerApiPlugin:
    """The ``vllm.endpoint_plugins`` entry point (``steer_api``)."""

    name = "steer_api"
    required_tasks = ("generate",)

    def __init__(self) -> None:
        self.settings = load_settings()  # once per process; passed down from here
        self._app: FastAPI | None = None

    def attach_router(self, app: FastAPI) -> None:
        from steer_vllm.vllm_internals import check

        check("api")  # every vLLM symbol this process relies on, named if an upgrade moved it
        self._app = app
        # read before install_access_control merges the role keys into vLLM's list
        keys = configured_keys(getattr(getattr(app.state, "args", None), "api_key", None), self.settings)
        # what the routes' dependencies read (steer_server.serving.state)
        setattr(app.state, SETTINGS_STATE, self.settings)
        setattr(app.state, KEYS_STATE, keys)
        setattr(app.state, KEY_ROLES_STATE, KeyRoles(keys))
        app.include_router(vector_router())
        app.include_router(sweep_router())
        app.include_router(calibrate_router())
        app.include_router(playground_router())
        install_steered_routes(app)
        app.add_middleware(BodyMiddleware, settings=self.settings)
        install_render_hooks()
        install_access_control(app, self.settings)  # added last: outside the body middleware, inside vLLM's key check

    async def init_state(self, engine_client, state, args: Namespace) -> None:
        # vLLM has built its middleware by now: prove its key check took our merged keys.
        found = (access_problems(self._app) + steered_route_problems(self._app)) if self._app is not None else []
        if found:
            raise RuntimeError("steer-server cannot start: " + "; ".join(found))
        if engine_client is None:
            logger.warning("steer_api: no engine (render-only server); steering is unavailable")
            return
        setattr(state, SERVER_STATE, await SteerServer.start(engine_client, state, self.settings))
