"""Settings of the vLLM processes: every environment variable the plugin reads, typed, once.

Why the plugin holds its own class. vLLM starts its engine core and worker processes itself,
so ``steer-server serve`` cannot hand them an object: its settings reach them as environment
variables, and the plugin package, installed into those processes on its own, must not import
``steer_server``. So the variables a vLLM process needs are defined here, each once (name,
type, bounds, default), in :class:`EngineSettings`; ``steer_server.settings.Settings`` extends
this class with the API server's own variables, so the API process reads the engine's values
through the very same fields, and ``to_env()`` of either writes them back under the same
names. There is no second definition of any variable anywhere.

How values travel. ``steer-server serve`` builds one ``Settings`` from its flags and the
environment, validates it and writes ``to_env()`` into its own environment before vLLM
starts; vLLM's processes inherit that environment and each loads its settings once with
:func:`load_engine_settings` (the API process: ``steer_server.settings.load_settings``),
then passes the object down (``limits.table_rows_for_config``, ``models.block_list``,
``frontend.SteeringValidator``). A bad value is a :class:`SettingsError` naming the variable.

Only this module and ``steer_server.settings`` touch ``os.environ`` for reading
(``tests/test_settings.py`` scans the code for any other read). Importing this module needs
pydantic-settings and the vector store, not vLLM.
"""
from __future__ import annotations

import functools
import os
from pathlib import Path
from typing import Annotated, Any, TypeVar

from pydantic import AliasChoices, Field, ValidationError, field_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

from steer_vllm.limits import DEFAULT_MAX_ADDITIONS, DEFAULT_MAX_PROMPT_TOKENS, MAX_ADDITIONS
from vector_store.async_access import DEFAULT_TIMEOUT_S

# vLLM's own variable: which model runner; the plugin selects V1 when the user did not choose.
V2_RUNNER_VARIABLE = "VLLM_USE_V2_MODEL_RUNNER"


class SettingsError(ValueError):
    """A setting that cannot be used; the message names its environment variable."""


def _finite_positive(**kwargs: Any):
    return Field(gt=0, allow_inf_nan=False, **kwargs)


class EnvironmentSettings(BaseSettings):
    """The common shape: each field names its variable in ``validation_alias``, exactly
    (case-sensitively: these names are the deployments' interface, and some are not
    ``STEER_``-prefixed, vLLM's and XDG's); ``to_env()`` writes them back."""

    model_config = SettingsConfigDict(
        case_sensitive=True,  # only the exact names; `steer_store` is not STEER_STORE
        env_ignore_empty=True,  # VAR= is unset, as it always was here
        populate_by_name=True,  # Settings(max_additions=8) in code, STEER_MAX_ADDITIONS outside
        frozen=True,
        extra="ignore",
    )

    @classmethod
    def variable(cls, field: str) -> str:
        """The environment variable of a field (the first, where several are accepted)."""
        alias = cls.model_fields[field].validation_alias
        if isinstance(alias, AliasChoices):
            alias = alias.choices[0]
        if not isinstance(alias, str):
            raise TypeError(f"{cls.__name__}.{field} has no environment variable")
        return alias

    @classmethod
    def variables(cls) -> dict[str, tuple[str, ...]]:
        """Field -> every variable it is read from."""
        found = {}
        for name, info in cls.model_fields.items():
            alias = info.validation_alias
            choices = alias.choices if isinstance(alias, AliasChoices) else (alias,)
            found[name] = tuple(c for c in choices if isinstance(c, str))
        return found

    def _env_value(self, field: str, value: Any) -> str | None:
        """How a field's value is written in its variable; None: left out (unset)."""
        if value is None:
            return None
        if isinstance(value, (tuple, list)):
            return ",".join(value)
        if isinstance(value, float):
            return repr(value)
        return str(value)

    def to_env(self) -> dict[str, str]:
        """The variables that make a process load these settings: every field given
        explicitly or read from the environment (defaults are left to the loader)."""
        env = {}
        for field in sorted(self.model_fields_set):
            text = self._env_value(field, getattr(self, field))
            if text is not None:
                env[self.variable(field)] = text
        return env


class EngineSettings(EnvironmentSettings):
    """What every vLLM process of steer-server reads from its environment. Fields marked
    *vLLM's own* are carried as vLLM reads them and not checked here: vLLM validates them."""

    max_additions: int = Field(DEFAULT_MAX_ADDITIONS, gt=0, le=MAX_ADDITIONS, validation_alias="STEER_MAX_ADDITIONS",
                               description="--max-additions: additions in one request's steering")
    max_prompt_tokens: int = Field(DEFAULT_MAX_PROMPT_TOKENS, gt=0, validation_alias="STEER_MAX_PROMPT_TOKENS",
                                   description="--max-steering-prompt-tokens: longest steering prompt, in tokens")
    table_rows: int | None = Field(None, ge=2, validation_alias="STEER_TABLE_ROWS",
                                   description="--steering-table-rows, the zero row included; None: sized from the "
                                   "model (steer_vllm.limits)")
    allow_architectures: Annotated[tuple[str, ...], NoDecode] = Field(
        (), validation_alias="STEER_ALLOW_ARCHITECTURES",
        description="architectures checked with `steer-server check`, comma-separated in the variable")
    store: str | None = Field(None, validation_alias="STEER_STORE",
                              description="--store: a directory, sqlite:///abs/dir or redis://...; None: under "
                              "the cache home")
    store_timeout_s: float = _finite_positive(default=DEFAULT_TIMEOUT_S, validation_alias="STEER_STORE_TIMEOUT",
                                              description="--store-timeout: longest wait for one vector-store call")
    cache_home: Path = Field(default_factory=lambda: Path.home() / ".cache", validation_alias="XDG_CACHE_HOME",
                             description="the user's cache directory (XDG); default ~/.cache")
    vllm_use_v2_model_runner: str | None = Field(None, validation_alias=V2_RUNNER_VARIABLE,
                                                 description="vLLM's own: '1' asks for the V2 model runner")

    @field_validator("allow_architectures", mode="before")
    @classmethod
    def _comma_separated(cls, value: Any) -> Any:
        if isinstance(value, str):
            return tuple(name.strip() for name in value.split(",") if name.strip())
        return value

    @property
    def store_location(self) -> str:
        """``store``, else the default under the cache home."""
        from vector_store.open import default_store_location

        return self.store or default_store_location(self.cache_home)


S = TypeVar("S", bound=EnvironmentSettings)


def _error_text(cls: type[EnvironmentSettings], error: ValidationError) -> str:
    """Each error with its variable; the value too, unless the field is a secret (repr=False)."""
    field_of = {variable: field for field, variables in cls.variables().items() for variable in variables}
    field_of.update({field: field for field in cls.model_fields})
    parts = []
    for item in error.errors():
        where = str(item["loc"][0]) if item["loc"] else "?"
        field = field_of.get(where)
        variable = cls.variable(field) if field is not None else where
        shown = "" if field is not None and not cls.model_fields[field].repr else f" (got {item.get('input')!r})"
        parts.append(f"${variable}: {item['msg']}{shown}")
    return "steer-server settings: " + "; ".join(parts)


def build(cls: type[S], **values: Any) -> S:
    """``cls`` from the environment, ``values`` overriding; a bad value is a SettingsError."""
    try:
        return cls(**values)
    except ValidationError as error:
        raise SettingsError(_error_text(cls, error)) from None


@functools.lru_cache(maxsize=16)
def _cached(cls: type[S], environment: tuple[tuple[str, str | None], ...]) -> S:
    return build(cls)


def load(cls: type[S]) -> S:
    """The process's settings of class ``cls``, read once. The cache is keyed by the class's
    variables as they are now, so a process whose environment is changed before a vLLM
    engine starts in it (the offline ``LLM``, tests) or a forked child never sees stale ones."""
    names = sorted({name for choices in cls.variables().values() for name in choices})
    return _cached(cls, tuple((name, os.environ.get(name)) for name in names))


def load_engine_settings() -> EngineSettings:
    return load(EngineSettings)


def select_v1_runner_unless_chosen() -> None:
    """Ask vLLM for its V1 model runner (the hooks cover V1) unless the user chose one;
    vLLM reads the variable in this process and its children."""
    os.environ.setdefault(V2_RUNNER_VARIABLE, "0")
