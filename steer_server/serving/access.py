"""Who may do what, as which tenant: inference keys use steering; admin keys also create,
import and delete vectors; every key belongs to a tenant, whose vectors are the only ones it sees.

This module's job: read the API keys, their roles and tenants, hand the keys to vLLM's own key
check, tell every request its tenant, and refuse vector writes to keys without the admin role. Installed on vLLM's app by
``steer_server.serving.api.SteerApiPlugin.attach_router`` (``install_access_control``).

Where keys come from (every API server process reads them itself at start-up, through its
``steer_server.settings.Settings``):

- vLLM's ``--api-key`` (or ``$VLLM_API_KEY``, ``Settings.vllm_api_key``): role ``inference``;
- ``$STEER_ADMIN_API_KEY`` (``Settings.admin_api_key``; ``steer-server serve --admin-api-key``
  sets it): role ``admin``;
- ``$STEER_API_KEYS_FILE`` (``Settings.api_keys_file``, ``--api-keys-file``): one
  ``ROLE KEY [TENANT]`` per line, ``#`` comments; a line without a tenant is the default
  tenant's (``vector_store.base.DEFAULT_TENANT``), as are the keys above and requests without a key.

vLLM guards every path under ``/v1`` with the keys in ``args.api_key``
(``vllm/entrypoints/serve/middleware/register.py``), and builds that check *after* endpoint
plugins attach, with ``app.state.args`` already set (``vllm/entrypoints/launchers/app.py``,
``build_app``). So ``install_access_control`` extends that list in memory with the file's
inference keys and every admin key: an admin key opens inference too, and keys from the file
never appear on a command line or in an environment. Once vLLM has built its middleware,
``access_problems`` proves its check holds them (``SteerApiPlugin.init_state`` refuses to start
otherwise), so a vLLM that reads the keys elsewhere is reported, not silently locking keys out.

Then ``AccessMiddleware`` (inside vLLM's check) puts the request's tenant in its scope's state
(``request_tenant`` reads it; a request that reaches a route without one is refused), and lets a
write to ``/v1/steering/vectors``
(any method but GET/HEAD/OPTIONS) through only with an admin key: 403 naming the role for a
valid non-admin key, 401 for no valid key (possible only while inference is open, i.e. roles
are configured but no inference key). Roles apply once an admin key or a keys file is given (a
keys file without admin keys lets nobody write); with neither, whoever passes vLLM's check may
write, as before.
"""
from __future__ import annotations

import hashlib
import logging
import os
import secrets
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated

from fastapi import Depends, FastAPI, Request
from fastapi.responses import JSONResponse
from fastapi.security.utils import get_authorization_scheme_param

from steer_server.serving import metrics
from steer_server.client import VECTORS_PATH
from steer_server.config_lines import config_lines
from steer_server.settings import Settings, load_settings
from vector_store.base import DEFAULT_TENANT, VectorStoreError, check_tenant

logger = logging.getLogger("vllm.steer_server")  # under "vllm": printed with vLLM's log handler

INFERENCE, ADMIN = "inference", "admin"
ROLES = (INFERENCE, ADMIN)
_READ_METHODS = ("GET", "HEAD", "OPTIONS")
# On app.state: digests of the keys merged into app.state.args.api_key, for access_problems.
_MERGED_KEYS = "steer_merged_key_digests"
# In a request scope's "state" (Starlette's request.state): the caller's tenant.
TENANT_STATE = "steer_tenant"


class AccessConfigError(ValueError):
    """A keys file or key setting that cannot be used; the message names the file and line."""


@dataclass(frozen=True)
class ApiKeys:
    inference: tuple[str, ...] = ()
    admin: tuple[str, ...] = ()
    tenants: tuple[tuple[str, str], ...] = ()  # (key, tenant) for the keys outside the default tenant

    def __add__(self, other: ApiKeys) -> ApiKeys:
        return ApiKeys(_unique(self.inference + other.inference), _unique(self.admin + other.admin),
                       _unique(self.tenants + other.tenants))

    def tenant_of(self, key: str) -> str:
        return dict(self.tenants).get(key, DEFAULT_TENANT)

    @property
    def tenant_names(self) -> list[str]:
        """Every tenant a key can act as, the default one first."""
        return list(dict.fromkeys([DEFAULT_TENANT, *(tenant for _, tenant in self.tenants)]))


def _unique(keys: tuple) -> tuple:
    return tuple(dict.fromkeys(keys))


def read_keys_file(path: str | Path) -> ApiKeys:
    """``ROLE KEY [TENANT]`` per line (ROLE: inference | admin; no TENANT: the default tenant);
    blank lines and ``#`` comments skipped."""
    roles: dict[str, str] = {}
    tenants: dict[str, str] = {}
    for where, fields in config_lines(path, "API keys file", AccessConfigError):
        if len(fields) not in (2, 3):
            raise AccessConfigError(f"{where}: expected 'ROLE KEY' or 'ROLE KEY TENANT', got {len(fields)} fields")
        role, key, tenant = (*fields, DEFAULT_TENANT)[:3]
        if role not in ROLES:
            raise AccessConfigError(f"{where}: unknown role {role!r}; expected one of {', '.join(ROLES)}")
        try:
            check_tenant(tenant)
        except VectorStoreError as exc:
            raise AccessConfigError(f"{where}: {exc}") from None
        if roles.get(key, role) != role:
            raise AccessConfigError(f"{where}: this key is listed with two roles ({roles[key]} and {role})")
        if tenants.get(key, tenant) != tenant:
            raise AccessConfigError(f"{where}: this key is listed with two tenants ({tenants[key]} and {tenant})")
        roles[key], tenants[key] = role, tenant
    if not roles:
        raise AccessConfigError(f"the API keys file {path} holds no keys")
    return ApiKeys(tuple(k for k, r in roles.items() if r == INFERENCE), tuple(k for k, r in roles.items() if r == ADMIN),
                   tuple((k, t) for k, t in tenants.items() if t != DEFAULT_TENANT))


def configured_keys(vllm_api_keys: list[str] | None, settings: Settings) -> ApiKeys:
    """All keys of this server: vLLM's (as vLLM reads them: ``--api-key``, else
    ``$VLLM_API_KEY``), the admin key of the settings and the keys file's."""
    inference = [k for k in (vllm_api_keys or [settings.vllm_api_key or ""]) if k]
    keys = ApiKeys(inference=tuple(inference))
    if settings.admin_api_key:
        keys += ApiKeys(admin=(settings.admin_api_key,))
    if settings.api_keys_file is not None:
        keys += read_keys_file(settings.api_keys_file)
    both = set(keys.inference) & set(keys.admin)
    if both:
        raise AccessConfigError(f"{len(both)} key(s) given both the inference and the admin role")
    return keys


def check_access_flags(admin_api_key: str | None, keys_file: str | os.PathLike[str] | None) -> dict[str, object]:
    """``steer-server serve``'s key flags, checked, as ``Settings`` fields (which reach the
    API processes in their environment); reads the keys file once here so a bad file stops
    the server before vLLM starts."""
    fields: dict[str, object] = {}
    if admin_api_key is not None:
        if not admin_api_key.strip() or admin_api_key != admin_api_key.strip():
            raise AccessConfigError("--admin-api-key must be a non-empty key without surrounding spaces")
        fields["admin_api_key"] = admin_api_key
    if keys_file is not None:
        path = Path(keys_file).expanduser().resolve()
        read_keys_file(path)
        fields["api_keys_file"] = path
    return fields


class KeyRoles:
    """Bearer token -> (role, tenant), comparing SHA-256 digests in constant time (as vLLM's check does)."""

    def __init__(self, keys: ApiKeys):
        self._digests = [(_digest(k), INFERENCE, keys.tenant_of(k)) for k in keys.inference] + [
            (_digest(k), ADMIN, keys.tenant_of(k)) for k in keys.admin]

    def identify(self, authorization: str | None) -> tuple[str | None, str]:
        """The role and tenant of an ``Authorization`` header's value (``Bearer KEY``); (None,
        the default tenant) if it holds no known key (possible only while inference is open)."""
        scheme, token = get_authorization_scheme_param(authorization)
        if scheme.lower() != "bearer":
            return None, DEFAULT_TENANT
        digest = _digest(token)
        role, tenant = None, DEFAULT_TENANT
        for known, known_role, known_tenant in self._digests:  # no early exit: the time does not tell which key matched
            if secrets.compare_digest(digest, known):
                role, tenant = known_role, known_tenant
        return role, tenant


def _digest(key: str) -> bytes:
    return hashlib.sha256(key.encode("utf-8")).digest()


class AccessMiddleware:
    """Pure ASGI: every request learns its tenant; with roles configured, vector writes need
    a key with the admin role."""

    def __init__(self, app, keys: ApiKeys, roles_apply: bool, tenant_label: bool):
        self.app = app
        self.roles = KeyRoles(keys)
        self.roles_apply = roles_apply
        self.tenant_label = tenant_label  # --metrics-tenant-label

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        authorization = next((v.decode("latin-1") for k, v in scope["headers"] if k.lower() == b"authorization"), None)
        role, tenant = self.roles.identify(authorization)
        scope.setdefault("state", {})[TENANT_STATE] = tenant
        path = scope["path"].removeprefix(scope.get("root_path", ""))
        if not self.roles_apply or scope["method"] in _READ_METHODS or not path.startswith(VECTORS_PATH) or role == ADMIN:
            return await self.app(scope, receive, send)
        status = 403 if role is not None else 401
        metrics.count_rejected(status, "needs_admin_role" if role else "no_valid_key",
                               metrics.tenant_label(tenant, self.tenant_label))
        action = {"DELETE": "deleting"}.get(scope["method"], "creating or importing")
        held = f"this key has the {role!r} role" if role else "no valid API key was given"
        message = (f"{action} steering vectors needs a key with the 'admin' role ({held}); "
                   "admin keys come from --admin-api-key or 'admin' lines in --api-keys-file")
        body = {"error": {"message": message, "type": "PermissionDeniedError" if status == 403 else "AuthenticationError",
                          "param": None, "code": status}}
        return await JSONResponse(body, status_code=status)(scope, receive, send)


def scope_tenant(scope: dict) -> str:
    """The tenant ``AccessMiddleware`` found for this request. A request that did not pass
    through it is refused rather than guessed to be the default tenant's."""
    tenant = scope.get("state", {}).get(TENANT_STATE)
    if tenant is None:
        raise RuntimeError("steer-server: the request reached steering without its tenant (AccessMiddleware not run)")
    return tenant


def request_tenant(request: Request) -> str:
    """``scope_tenant`` as a FastAPI dependency of the routes."""
    return scope_tenant(request.scope)


Tenant = Annotated[str, Depends(request_tenant)]  # a route's parameter: the caller's tenant


def install_access_control(app: FastAPI, settings: Settings | None = None) -> None:
    """Merge our keys into vLLM's key check, give every request its tenant and, when roles
    are configured, guard vector writes. Must run before vLLM builds its middleware (endpoint
    plugins' ``attach_router`` does). ``settings``: the process's (``load_settings()`` when not given)."""
    if settings is None:
        settings = load_settings()
    args = getattr(app.state, "args", None)
    vllm_keys = getattr(args, "api_key", None)
    keys = configured_keys(vllm_keys, settings)
    if not keys.admin and settings.api_keys_file is None:
        # No roles configured: vLLM's own check alone, and every caller is the default tenant's.
        app.add_middleware(AccessMiddleware, keys=keys, roles_apply=False, tenant_label=settings.metrics_tenant_label)
        return
    if args is None:
        raise RuntimeError("steer-server cannot apply API key roles: vLLM's app carries no parsed arguments")
    if keys.inference:
        # vLLM's check then accepts every key; with no inference key at all inference stays open.
        args.api_key = [*keys.inference, *keys.admin]
        setattr(app.state, _MERGED_KEYS, frozenset(_digest(k) for k in args.api_key))
    app.add_middleware(AccessMiddleware, keys=keys, roles_apply=True, tenant_label=settings.metrics_tenant_label)
    logger.info("steer_api: API keys: %d inference, %d admin, in %d tenant(s); inference %s; vector writes need "
                "the admin role%s", len(keys.inference), len(keys.admin), len(keys.tenant_names),
                "needs a key" if keys.inference else "is open",
                "" if keys.admin else " (none configured: nobody may write)")


def access_problems(app: FastAPI) -> list[str]:
    """Once vLLM has built its middleware: whether its own key check holds every key merged
    into ``app.state.args.api_key``. A vLLM that builds the check from anything else would
    refuse admin and file keys silently."""
    expected = getattr(app.state, _MERGED_KEYS, None)
    if not expected:
        return []  # nothing merged: vLLM's check is its own
    from vllm.entrypoints.serve.middleware.authenticate import AuthenticationMiddleware

    checks = [m for m in app.user_middleware if m.cls is AuthenticationMiddleware]
    if len(checks) != 1:
        return [f"vLLM built {len(checks)} API key checks (AuthenticationMiddleware) instead of one from "
                "app.state.args.api_key, where steer-server merged its role keys"]
    held = {_digest(token) for token in checks[0].kwargs.get("tokens") or ()}
    left_out = len(expected - held)
    if left_out:
        return [f"vLLM's API key check (AuthenticationMiddleware) lacks {left_out} of the {len(expected)} keys "
                "steer-server merged into app.state.args.api_key (inference, admin and keys-file keys)"]
    return []
