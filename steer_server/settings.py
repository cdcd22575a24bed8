"""The server's settings and the command-line clients' settings: typed, each variable once.

:class:`Settings` extends the plugin's ``steer_vllm.settings.EngineSettings`` (the variables
vLLM's engine and worker processes read; the plugin package cannot import this one) with
the API server's and ``steer-server serve``'s own. Each field names its environment
variable; a bad value is a ``SettingsError`` naming it.

- ``steer-server serve`` builds one ``Settings`` from its flags, the environment giving the
  defaults (``serve_settings``), and writes ``to_env()`` into its environment before vLLM
  starts: vLLM's own argument parser owns the command line of the processes it starts, so
  the environment is the one way to them. Each process then loads its settings once
  (``load_settings`` here, ``load_engine_settings`` in the plugin) and passes them down.
- :class:`ClientSettings`: the defaults of the HTTP clients (``steer-server vectors``,
  ``compare``, ``bench``, the locust file): ``$STEER_SERVER_URL``, ``$STEER_API_KEY`` (or
  ``$OPENAI_API_KEY``).

Only this module and ``steer_vllm.settings`` touch ``os.environ`` for reading
(``tests/test_settings.py`` scans the code for any other read). What a child process
inherits is built here too (``child_environment``, ``exported``), from these names.
"""
from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

from pydantic import AliasChoices, Field, field_validator

from steer_vllm.settings import EngineSettings, EnvironmentSettings, SettingsError, build, load
from vector_store.async_access import DEFAULT_FRESH_S

__all__ = ["ClientSettings", "Settings", "SettingsError", "child_environment", "exported", "load_client_settings",
           "load_settings"]

DEFAULT_URL = "http://127.0.0.1:8000"  # where the clients look for a server unless told
DEFAULT_PAD = " "  # the paper pads with the tokenizer's token for a single space
DEFAULT_MAX_BODY_BYTES = 32 * 1024 * 1024
_NO_PAD = "none"


class Settings(EngineSettings):
    """Everything a steer-server process reads from its environment: the engine's settings
    (inherited) and the API server's and ``steer-server serve``'s own."""

    pad: str | None = Field(DEFAULT_PAD, min_length=1, validation_alias="STEER_PAD",
                            description="--steering-pad: pads the ActAdd prompts of one layer; 'none' (None): "
                            "no padding")
    max_body_bytes: int = Field(DEFAULT_MAX_BODY_BYTES, gt=0, validation_alias="STEER_MAX_BODY_BYTES",
                                description="--max-body-bytes: any request body; larger gets HTTP 413")
    store_fresh_s: float = Field(DEFAULT_FRESH_S, gt=0, allow_inf_nan=False, validation_alias="STEER_STORE_FRESH",
                                 description="--store-cache-ttl: how long a name lookup is trusted")
    max_dose: float | None = Field(None, gt=0, allow_inf_nan=False, validation_alias="STEER_MAX_DOSE",
                                   description="--max-dose: largest relative dose; None: no limit")
    admin_api_key: str | None = Field(None, repr=False, validation_alias="STEER_ADMIN_API_KEY",
                                      description="--admin-api-key: a key with the admin role")
    api_keys_file: Path | None = Field(None, validation_alias="STEER_API_KEYS_FILE",
                                       description="--api-keys-file: 'ROLE KEY [TENANT]' lines")
    quotas_file: Path | None = Field(None, validation_alias="STEER_QUOTAS_FILE",
                                     description="--quotas-file: 'TENANT quota=N ...' lines")
    metrics_tenant_label: bool = Field(False, validation_alias="STEER_METRICS_TENANT_LABEL",
                                       description="--metrics-tenant-label: steering metrics carry the "
                                       "caller's tenant (one series per tenant of the keys file)")
    cache_dir_override: Path | None = Field(None, validation_alias="STEER_CACHE_DIR",
                                            description="steer-server's cache (the converted default model); "
                                            "default <cache home>/steer-server")
    vllm_api_key: str | None = Field(None, repr=False, validation_alias="VLLM_API_KEY",
                                     description="vLLM's own: its --api-key when the flag is not given")
    vllm_plugins: str | None = Field(None, validation_alias="VLLM_PLUGINS",
                                     description="vLLM's own: the plugins to load, comma-separated")
    vllm_cpu_kvcache_space: str | None = Field(None, validation_alias="VLLM_CPU_KVCACHE_SPACE",
                                               description="vLLM's own: the CPU KV cache size in GiB")

    @field_validator("pad", mode="before")
    @classmethod
    def _no_pad(cls, value: Any) -> Any:
        return None if isinstance(value, str) and value.lower() == _NO_PAD else value

    @field_validator("admin_api_key")
    @classmethod
    def _bare_key(cls, value: str | None) -> str | None:
        if value is not None and value != value.strip():
            raise ValueError("must be a key without surrounding spaces")
        return value

    @property
    def cache_dir(self) -> Path:
        """``$STEER_CACHE_DIR`` or ``${XDG_CACHE_HOME:-~/.cache}/steer-server``."""
        if self.cache_dir_override is not None:
            return self.cache_dir_override.expanduser()
        return self.cache_home / "steer-server"

    def _env_value(self, field: str, value: Any) -> str | None:
        if field == "pad" and value is None:
            return _NO_PAD
        return super()._env_value(field, value)


class ClientSettings(EnvironmentSettings):
    """Defaults of the command-line HTTP clients."""

    url: str = Field(DEFAULT_URL, min_length=1, validation_alias="STEER_SERVER_URL",
                     description="the server's address")
    api_key: str | None = Field(None, repr=False, validation_alias=AliasChoices("STEER_API_KEY", "OPENAI_API_KEY"),
                                description="the server's --api-key")


def load_settings() -> Settings:
    """This process's server settings, read once (``steer_vllm.settings.load``)."""
    return load(Settings)


def load_client_settings() -> ClientSettings:
    return load(ClientSettings)


def serve_settings(**flags: Any) -> Settings:
    """``steer-server serve``'s settings: the flags given (None: not given), the environment
    for the rest."""
    return build(Settings, **{name: value for name, value in flags.items() if value is not None})


def child_environment(overrides: Mapping[str, str | None] = {}) -> dict[str, str]:  # noqa: B006 (read only)
    """This process's environment for a child process, with ``overrides`` (None: removed)."""
    env = dict(os.environ)
    for name, value in overrides.items():
        if value is None:
            env.pop(name, None)
        else:
            env[name] = value
    return env


@contextlib.contextmanager
def exported(values: Mapping[str, str]) -> Iterator[None]:
    """``values`` in this process's environment while the block runs (for the vLLM
    processes an offline engine starts), the previous values back afterwards."""
    before = {name: os.environ.get(name) for name in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for name, value in before.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value
