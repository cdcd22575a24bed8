"""One settings object: typed, each variable defined once, read only by the settings modules.

Fast: no server, no engine.
"""
from __future__ import annotations

import ast
import os
from pathlib import Path

import pytest

from steer_server.settings import ClientSettings, Settings, SettingsError, load_client_settings, load_settings
from steer_vllm.settings import EngineSettings, load_engine_settings

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("steer_server", "plugins", "vector_store")
# The only modules that read the process environment.
SETTINGS_MODULES = {Path("steer_server/settings.py"), Path("plugins/steer_vllm/settings.py")}
# Every variable deployments, tests and the README set: none may change its name.
KNOWN_VARIABLES = {
    "STEER_MAX_ADDITIONS", "STEER_MAX_PROMPT_TOKENS", "STEER_TABLE_ROWS", "STEER_ALLOW_ARCHITECTURES", "STEER_STORE",
    "STEER_STORE_TIMEOUT", "XDG_CACHE_HOME", "VLLM_USE_V2_MODEL_RUNNER", "STEER_PAD", "STEER_MAX_BODY_BYTES",
    "STEER_STORE_FRESH", "STEER_MAX_DOSE", "STEER_ADMIN_API_KEY", "STEER_API_KEYS_FILE", "STEER_CACHE_DIR",
    "STEER_QUOTAS_FILE", "STEER_METRICS_TENANT_LABEL",
    "VLLM_API_KEY", "VLLM_PLUGINS", "VLLM_CPU_KVCACHE_SPACE", "STEER_SERVER_URL", "STEER_API_KEY", "OPENAI_API_KEY",
}
ALL_VARIABLES = sorted({v for cls in (Settings, ClientSettings) for names in cls.variables().values() for v in names})


@pytest.fixture
def clean_env(monkeypatch):
    """None of the settings' variables set (the test sets what it needs)."""
    for name in ALL_VARIABLES:
        monkeypatch.delenv(name, raising=False)
    return monkeypatch


# ------------------------------------------------------------------ nobody else reads os.environ


def _environment_reads(tree: ast.AST) -> list[tuple[int, str]]:
    """Reads of the process environment: os.getenv, os.environ anywhere but as the target of
    an assignment / del, or the object of .update() (writes for child processes)."""
    parents = {child: node for node in ast.walk(tree) for child in ast.iter_child_nodes(node)}
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module == "os":
            for alias in node.names:
                if alias.name in ("environ", "getenv", "environb", "getenvb"):
                    found.append((node.lineno, f"from os import {alias.name}"))
        if not isinstance(node, ast.Attribute) or not isinstance(node.value, ast.Name) or node.value.id != "os":
            continue
        if node.attr in ("getenv", "getenvb", "environb"):
            found.append((node.lineno, f"os.{node.attr}"))
        elif node.attr == "environ":
            parent = parents.get(node)
            if isinstance(parent, ast.Subscript) and isinstance(parent.ctx, (ast.Store, ast.Del)):
                continue  # os.environ[NAME] = ... / del os.environ[NAME]
            if isinstance(parent, ast.Attribute) and parent.attr == "update" and isinstance(parents.get(parent), ast.Call):
                continue  # os.environ.update(...)
            use = f"os.environ.{parent.attr}" if isinstance(parent, ast.Attribute) else "os.environ"
            found.append((node.lineno, use))
    return found


def test_the_scan_finds_every_kind_of_read():
    source = """
import os
from os import getenv
a = os.environ.get("A"); b = os.environ["B"]; c = os.getenv("C"); d = dict(os.environ); e = "E" in os.environ
os.environ.setdefault("F", "1"); os.environ.pop("G", None)
os.environ["H"] = "1"; os.environ.update({"I": "1"}); del os.environ["H"]
"""
    found = _environment_reads(ast.parse(source))
    assert [line for line, _ in found] == [3, 4, 4, 4, 4, 4, 5, 5]


def test_only_the_settings_modules_read_the_environment():
    offenders = []
    for package in PACKAGES:
        for path in sorted((ROOT / package).rglob("*.py")):
            relative = path.relative_to(ROOT)
            if relative in SETTINGS_MODULES:
                continue
            for line, use in _environment_reads(ast.parse(path.read_text(), str(path))):
                offenders.append(f"{relative}:{line}: {use}")
    assert offenders == [], ("read settings through steer_server.settings / steer_vllm.settings, not the "
                             "environment:\n" + "\n".join(offenders))


# ------------------------------------------------------------------ each variable, defined once


def test_every_field_names_its_variable_and_no_variable_is_defined_twice():
    engine = EngineSettings.variables()
    server_own = {f: v for f, v in Settings.variables().items() if f not in engine}
    definitions = [v for table in (engine, server_own, ClientSettings.variables()) for vs in table.values() for v in vs]
    assert all(Settings.variables().values()) and all(ClientSettings.variables().values())
    assert len(definitions) == len(set(definitions)), definitions
    assert set(definitions) == KNOWN_VARIABLES
    assert {f: Settings.variables()[f] for f in engine} == engine  # the server reads the engine's through its fields


# ------------------------------------------------------------------ bad values name the variable


@pytest.mark.parametrize(("variable", "value", "says"), [
    ("STEER_MAX_ADDITIONS", "0", "greater than 0"),
    ("STEER_MAX_ADDITIONS", "65", "less than or equal to 64"),
    ("STEER_MAX_ADDITIONS", "many", "valid integer"),
    ("STEER_MAX_PROMPT_TOKENS", "-3", "greater than 0"),
    ("STEER_TABLE_ROWS", "1", "greater than or equal to 2"),
    ("STEER_STORE_TIMEOUT", "0", "greater than 0"),
    ("STEER_STORE_TIMEOUT", "inf", "finite"),
    ("STEER_STORE_FRESH", "soon", "valid number"),
    ("STEER_MAX_DOSE", "nan", "finite"),
    ("STEER_MAX_BODY_BYTES", "1.5", "valid integer"),
])
def test_a_bad_value_is_an_error_naming_its_variable(clean_env, variable, value, says):
    clean_env.setenv(variable, value)
    with pytest.raises(SettingsError) as error:
        load_settings()
    assert f"${variable}" in str(error.value) and says in str(error.value) and repr(value) in str(error.value)
    if variable in {name for names in EngineSettings.variables().values() for name in names}:
        with pytest.raises(SettingsError, match=rf"\${variable}"):
            load_engine_settings()  # the plugin's processes refuse it the same way


def test_a_bad_secret_is_named_but_not_shown(clean_env):
    clean_env.setenv("STEER_ADMIN_API_KEY", " sekrit ")
    with pytest.raises(SettingsError, match=r"\$STEER_ADMIN_API_KEY: .*surrounding spaces") as error:
        load_settings()
    assert "sekrit" not in str(error.value)


def test_a_bad_value_given_in_code_names_the_variable_too():
    from steer_server.settings import serve_settings

    with pytest.raises(SettingsError, match=r"\$STEER_TABLE_ROWS: Input should be greater than or equal to 2"):
        serve_settings(table_rows=1)


# ------------------------------------------------------------------ values and encodings


def test_values_are_read_as_today(clean_env, tmp_path):
    for name, value in {"STEER_PAD": "None", "STEER_ALLOW_ARCHITECTURES": " OPTForCausalLM, ,FooForCausalLM",
                        "STEER_MAX_ADDITIONS": "", "XDG_CACHE_HOME": str(tmp_path), "STEER_API_KEYS_FILE": "",
                        "OPENAI_API_KEY": "openai-key"}.items():
        clean_env.setenv(name, value)
    settings = load_settings()
    assert settings.pad is None  # "none", any case: no padding
    assert settings.allow_architectures == ("OPTForCausalLM", "FooForCausalLM")
    assert settings.max_additions == 16 and settings.api_keys_file is None  # empty is unset
    assert settings.store_location == str(tmp_path / "steer-server" / "vectors")
    assert settings.cache_dir == tmp_path / "steer-server"
    assert load_client_settings().api_key == "openai-key"
    clean_env.setenv("STEER_API_KEY", "steer-key")
    clean_env.setenv("STEER_SERVER_URL", "http://elsewhere:9000")
    assert load_client_settings().model_dump() == {"url": "http://elsewhere:9000", "api_key": "steer-key"}


def test_loaded_once_per_environment(clean_env):
    assert load_settings() is load_settings()
    assert load_engine_settings() is load_engine_settings()
    before = load_settings()
    clean_env.setenv("STEER_MAX_ADDITIONS", "5")  # an offline engine or a test changing the environment
    assert load_settings() is not before and load_settings().max_additions == 5
    clean_env.setenv("STEER_UNRELATED", "x")
    assert load_settings() is load_settings()


def test_to_env_round_trips_through_loading(clean_env, tmp_path):
    given = Settings(pad=None, max_additions=3, max_prompt_tokens=9, table_rows=40, allow_architectures=("A", "B"),
                     store="redis://localhost:6379/2", store_timeout_s=0.25, store_fresh_s=1e-3, max_dose=0.35,
                     max_body_bytes=1000, admin_api_key="admin", api_keys_file=tmp_path / "keys",
                     cache_home=tmp_path, cache_dir_override=tmp_path / "steer", vllm_plugins="steer,steer_api")
    env = given.to_env()
    assert env["STEER_PAD"] == "none" and env["STEER_ALLOW_ARCHITECTURES"] == "A,B"
    assert set(env) <= set(ALL_VARIABLES)
    for name, value in env.items():
        clean_env.setenv(name, value)
    assert load_settings() == given
    # The plugin's processes read the engine's part of the same variables.
    engine = load_engine_settings()
    assert engine.model_dump() == {field: getattr(given, field) for field in EngineSettings.model_fields}


@pytest.mark.parametrize("pad", [" ", "\n", "pad", None])
def test_the_pad_round_trips(clean_env, pad):
    for name, value in Settings(pad=pad).to_env().items():
        clean_env.setenv(name, value)
    assert load_settings().pad == pad


def test_defaults_are_left_to_the_loader(clean_env):
    assert load_settings().to_env() == {}
    assert load_settings() == Settings()


# ------------------------------------------------------------------ steer-server serve


def test_serve_flags_default_to_their_variables_and_win_over_them(clean_env):
    from steer_server.cli import serve_parser

    clean_env.setenv("STEER_MAX_ADDITIONS", "7")
    clean_env.setenv("STEER_PAD", "none")
    args, rest = serve_parser(load_settings()).parse_known_args(["--max-dose", "0.5", "--enforce-eager"])
    assert (args.max_additions, args.steering_pad, args.max_dose, rest) == (7, "none", 0.5, ["--enforce-eager"])
    args, _ = serve_parser(load_settings()).parse_known_args(["--max-additions", "3"])
    assert args.max_additions == 3


def test_serve_hands_its_settings_to_the_vllm_processes(clean_env, monkeypatch, tmp_path):
    """What `steer-server serve` writes is what every vLLM process then loads."""
    from steer_server.cli import prepare_environment
    from steer_server.settings import serve_settings

    monkeypatch.setattr(os, "environ", dict(os.environ))  # the writes stay in this test
    clean_env.setenv("STEER_ADMIN_API_KEY", "from-the-environment")
    settings = serve_settings(pad=None, max_additions=4, table_rows=None, store=str(tmp_path), max_dose=0.2)
    prepare_environment(settings)
    assert os.environ["VLLM_PLUGINS"] == "steer,steer_api" and os.environ["VLLM_USE_V2_MODEL_RUNNER"] == "0"
    loaded = load_settings()
    assert loaded.model_copy(update={"vllm_plugins": None, "vllm_use_v2_model_runner": None}) == settings
    assert loaded.admin_api_key == "from-the-environment" and loaded.store == str(tmp_path)
    assert load_engine_settings().max_additions == 4


def test_serve_keeps_the_users_plugins_and_runner(clean_env, monkeypatch):
    from steer_server.cli import prepare_environment

    monkeypatch.setattr(os, "environ", dict(os.environ))
    clean_env.setenv("VLLM_PLUGINS", "other")
    clean_env.setenv("VLLM_USE_V2_MODEL_RUNNER", "1")
    prepare_environment(load_settings())
    assert os.environ["VLLM_PLUGINS"] == "other,steer,steer_api" and os.environ["VLLM_USE_V2_MODEL_RUNNER"] == "1"
