"""Who may do what: inference keys use steering; admin keys also create, import and delete vectors.

This module's job: read the API keys and their roles, hand them to vLLM's own key check, and
refuse vector writes to keys without the admin role. Installed on vLLM's app by
``steer_server.api.SteerApiPlugin.attach_router`` (``install_access_control``).

Where keys come from (every API server process reads them itself at start-up, through its
``steer_server.settings.Settings``):

- vLLM's ``--api-key`` (or ``$VLLM_API_KEY``, ``Settings.vllm_api_key``): role ``inference``;
- ``$STEER_ADMIN_API_KEY`` (``Settings.admin_api_key``; ``steer-server serve --admin-api-key``
  sets it): role ``admin``;
- ``$STEER_API_KEYS_FILE`` (``Settings.api_keys_file``, ``--api-keys-file``): one ``ROLE KEY``
  per line, ``#`` comments.

vLLM guards every path under ``/v1`` with the keys in ``args.api_key``
(``vllm/entrypoints/serve/middleware/register.py``), and builds that check *after* endpoint
plugins attach, with ``app.state.args`` already set (``vllm/entrypoints/launchers/app.py``,
``build_app``). So ``install_access_control`` extends that list in memory with the file's
inference keys and every admin key: an admin key opens inference too, and keys from the file
never appear on a command line or in an environment. Once vLLM has built its middleware,
``access_problems`` proves its check holds them (``SteerApiPlugin.init_state`` refuses to start
otherwise), so a vLLM that reads the keys elsewhere is reported, not silently locking keys out.

Then ``AccessMiddleware`` (inside vLLM's check) lets a write to ``/v1/steering/vectors``
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

from fastapi import FastAPI
from fastapi.responses import JSONResponse
from fastapi.security.utils import get_authorization_scheme_param

from steer_server import metrics
from steer_server.client import VECTORS_PATH
from steer_server.settings import Settings, load_settings

logger = logging.getLogger("vllm.steer_server")  # under "vllm": printed with vLLM's log handler

INFERENCE, ADMIN = "inference", "admin"
ROLES = (INFERENCE, ADMIN)
_READ_METHODS = ("GET", "HEAD", "OPTIONS")
# On app.state: digests of the keys merged into app.state.args.api_key, for access_problems.
_MERGED_KEYS = "steer_merged_key_digests"


class AccessConfigError(ValueError):
    """A keys file or key setting that cannot be used; the message names the file and line."""


@dataclass(frozen=True)
class ApiKeys:
    inference: tuple[str, ...] = ()
    admin: tuple[str, ...] = ()

    def __add__(self, other: ApiKeys) -> ApiKeys:
        return ApiKeys(_unique(self.inference + other.inference), _unique(self.admin + other.admin))


def _unique(keys: tuple[str, ...]) -> tuple[str, ...]:
    return tuple(dict.fromkeys(keys))


def read_keys_file(path: str | Path) -> ApiKeys:
    """``ROLE KEY`` per line (ROLE: inference | admin); blank lines and ``#`` comments skipped."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise AccessConfigError(f"cannot read the API keys file {path}: {exc}") from None
    roles: dict[str, str] = {}
    for number, line in enumerate(text.splitlines(), start=1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        fields = line.split()
        where = f"{path}, line {number}"
        if len(fields) != 2:
            raise AccessConfigError(f"{where}: expected 'ROLE KEY' (two fields), got {len(fields)} fields")
        role, key = fields
        if role not in ROLES:
            raise AccessConfigError(f"{where}: unknown role {role!r}; expected one of {', '.join(ROLES)}")
        if roles.get(key, role) != role:
            raise AccessConfigError(f"{where}: this key is listed with two roles ({roles[key]} and {role})")
        roles[key] = role
    if not roles:
        raise AccessConfigError(f"the API keys file {path} holds no keys")
    return ApiKeys(tuple(k for k, r in roles.items() if r == INFERENCE), tuple(k for k, r in roles.items() if r == ADMIN))


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
    """Bearer token -> role, comparing SHA-256 digests in constant time (as vLLM's check does)."""

    def __init__(self, keys: ApiKeys):
        self._digests = [(_digest(k), INFERENCE) for k in keys.inference] + [(_digest(k), ADMIN) for k in keys.admin]

    def role_of(self, authorization: str | None) -> str | None:
        """The role of an ``Authorization`` header's value (``Bearer KEY``), None if it holds no known key."""
        scheme, token = get_authorization_scheme_param(authorization)
        if scheme.lower() != "bearer":
            return None
        digest = _digest(token)
        role = None
        for known, known_role in self._digests:  # no early exit: the time does not tell which key matched
            if secrets.compare_digest(digest, known):
                role = known_role
        return role


def _digest(key: str) -> bytes:
    return hashlib.sha256(key.encode("utf-8")).digest()


class AccessMiddleware:
    """Pure ASGI: vector writes need a key with the admin role."""

    def __init__(self, app, keys: ApiKeys):
        self.app = app
        self.roles = KeyRoles(keys)

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or scope["method"] in _READ_METHODS:
            return await self.app(scope, receive, send)
        path = scope["path"].removeprefix(scope.get("root_path", ""))
        if not path.startswith(VECTORS_PATH):
            return await self.app(scope, receive, send)
        authorization = next((v.decode("latin-1") for k, v in scope["headers"] if k.lower() == b"authorization"), None)
        role = self.roles.role_of(authorization)
        if role == ADMIN:
            return await self.app(scope, receive, send)
        status = 403 if role is not None else 401
        metrics.REJECTED_REQUESTS.labels(status=str(status), reason="needs_admin_role" if role else "no_valid_key").inc()
        action = {"DELETE": "deleting"}.get(scope["method"], "creating or importing")
        held = f"this key has the {role!r} role" if role else "no valid API key was given"
        message = (f"{action} steering vectors needs a key with the 'admin' role ({held}); "
                   "admin keys come from --admin-api-key or 'admin' lines in --api-keys-file")
        body = {"error": {"message": message, "type": "PermissionDeniedError" if status == 403 else "AuthenticationError",
                          "param": None, "code": status}}
        return await JSONResponse(body, status_code=status)(scope, receive, send)


def install_access_control(app: FastAPI, settings: Settings | None = None) -> None:
    """Merge our keys into vLLM's key check and, when admin keys exist, guard vector writes.
    Must run before vLLM builds its middleware (endpoint plugins' ``attach_router`` does).
    ``settings``: the process's (``load_settings()`` when not given)."""
    if settings is None:
        settings = load_settings()
    args = getattr(app.state, "args", None)
    vllm_keys = getattr(args, "api_key", None)
    keys = configured_keys(vllm_keys, settings)
    if not keys.admin and settings.api_keys_file is None:
        return  # no roles configured: vLLM's own check alone, unchanged
    if args is None:
        raise RuntimeError("steer-server cannot apply API key roles: vLLM's app carries no parsed arguments")
    if keys.inference:
        # vLLM's check then accepts every key; with no inference key at all inference stays open.
        args.api_key = [*keys.inference, *keys.admin]
        setattr(app.state, _MERGED_KEYS, frozenset(_digest(k) for k in args.api_key))
    app.add_middleware(AccessMiddleware, keys=keys)
    logger.info("steer_api: API keys: %d inference, %d admin; inference %s; vector writes need the admin role%s",
                len(keys.inference), len(keys.admin), "needs a key" if keys.inference else "is open",
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
