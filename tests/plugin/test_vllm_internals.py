"""The one list of vLLM symbols (``steer_vllm.vllm_internals``): it resolves against the
installed vLLM, it names everything the code imports or patches, and a symbol an upgrade
moved is refused by name. Real vLLM imports throughout; no server, no engine."""
from __future__ import annotations

import ast
import importlib
from argparse import Namespace
from pathlib import Path

import pytest

from steer_vllm import SteeringNotInstalled
from steer_vllm.vllm_internals import INTERNALS, USES, WHERE, Internal, VllmInternalsMissing, check, missing

ROOT = Path(__file__).resolve().parents[2]
SOURCE_DIRS = (ROOT / "plugins" / "steer_vllm", ROOT / "steer_server")

GONE = Internal("vllm.v1.worker.gpu_model_runner", "GPUModelRunner._no_such_method", "patched", "engine",
                "a hook a vLLM upgrade removed")


def _vllm_version() -> str:
    import vllm

    return vllm.__version__


# --------------------------------------------------------------- (a) the list resolves

def test_every_listed_vllm_symbol_resolves_in_the_installed_vllm():
    assert missing() == []
    for where in WHERE:
        check(where)


def test_entries_are_well_formed_and_named_once():
    assert all(e.use in USES and e.where in WHERE and e.why for e in INTERNALS)
    names = [(e.name, e.use) for e in INTERNALS]
    assert len(names) == len(set(names))


# --------------------------------------------------------------- (b) the list is the one list

def _module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[0] == "plugins":
        parts = parts[1:]
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def _is_vllm(module: str | None) -> bool:
    return module is not None and (module == "vllm" or module.startswith("vllm."))


class _Scan:
    """vLLM imports, ``patch(Cls, "name", ...)`` targets, and classes given new attributes
    (``setattr(Cls, ...)``, ``Cls.attr = ...``), in one source file."""

    def __init__(self, path: Path):
        self.path = path
        self.module = _module_name(path)
        self.tree = ast.parse(path.read_text(encoding="utf-8"), str(path))
        self.parents = {child: node for node in ast.walk(self.tree) for child in ast.iter_child_nodes(node)}
        self.bound: dict[str, tuple[str, str]] = {}  # local name -> (vllm module, name in it)
        self.imported: list[tuple[str, str, str]] = []  # (where, module, name or "")
        self.patched: list[tuple[str, str, str, str]] = []  # (where, module, class, method)
        self.extended: list[tuple[str, str, str]] = []  # (where, module, class)
        self.unresolved: list[str] = []
        for node in ast.walk(self.tree):
            if isinstance(node, ast.ImportFrom) and node.level == 0 and _is_vllm(node.module):
                for alias in node.names:
                    self.imported.append((self._at(node), node.module, alias.name))
                    self.bound[alias.asname or alias.name] = (node.module, alias.name)
            elif isinstance(node, ast.Import):
                for alias in node.names:
                    if _is_vllm(alias.name):
                        self.imported.append((self._at(node), alias.name, ""))
        for node in ast.walk(self.tree):
            if isinstance(node, ast.Call):
                self._call(node)
            elif isinstance(node, (ast.Assign, ast.AugAssign)):
                for target in node.targets if isinstance(node, ast.Assign) else [node.target]:
                    if isinstance(target, ast.Attribute) and isinstance(target.value, ast.Name):
                        if target.value.id in self.bound:
                            self.extended.append((self._at(node), *self.bound[target.value.id]))

    def _at(self, node: ast.AST) -> str:
        return f"{self.path.relative_to(ROOT)}:{node.lineno}"

    def _call(self, node: ast.Call) -> None:
        func = node.func
        name = func.id if isinstance(func, ast.Name) else func.attr if isinstance(func, ast.Attribute) else None
        if name == "setattr" and node.args and isinstance(node.args[0], ast.Name) and node.args[0].id in self.bound:
            self.extended.append((self._at(node), *self.bound[node.args[0].id]))
        if name != "patch" or len(node.args) < 2:
            return
        classes = self._classes(node.args[0])
        methods = self._methods(node.args[1])
        if classes is None or methods is None:
            self.unresolved.append(f"{self._at(node)}: {ast.unparse(node)}")
            return
        self.patched += [(self._at(node), module, cls, method) for module, cls in classes for method in methods]

    def _loop_over(self, name: ast.Name) -> ast.expr | None:
        """The iterable of the enclosing ``for`` that binds ``name`` (first of a tuple target)."""
        node = self.parents.get(name)
        while node is not None:
            if isinstance(node, ast.For):
                target = node.target.elts[0] if isinstance(node.target, ast.Tuple) else node.target
                if isinstance(target, ast.Name) and target.id == name.id:
                    return node.iter
            node = self.parents.get(node)
        return None

    def _classes(self, node: ast.expr) -> list[tuple[str, str]] | None:
        if not isinstance(node, ast.Name):
            return None
        if node.id in self.bound:
            return [self.bound[node.id]]
        loop = self._loop_over(node)
        names = loop.elts if isinstance(loop, (ast.Tuple, ast.List)) else []
        if names and all(isinstance(e, ast.Name) and e.id in self.bound for e in names):
            return [self.bound[e.id] for e in names]
        return None

    def _methods(self, node: ast.expr) -> list[str] | None:
        if isinstance(node, ast.Constant) and isinstance(node.value, str):
            return [node.value]
        if not isinstance(node, ast.Name):
            return None
        loop = self._loop_over(node)
        if loop is None:
            return self._constant(node.id)
        if isinstance(loop, (ast.Tuple, ast.List)) and all(isinstance(e, ast.Constant) for e in loop.elts):
            return [e.value for e in loop.elts]
        if isinstance(loop, ast.Call) and isinstance(loop.func, ast.Attribute) and loop.func.attr in ("items", "keys"):
            loop = loop.func.value
        return self._constant(loop.id) if isinstance(loop, ast.Name) else None

    def _constant(self, name: str) -> list[str] | None:
        """A module-level name list (e.g. one imported from vllm_internals), read from the module."""
        value = getattr(importlib.import_module(self.module), name, None)
        if isinstance(value, (tuple, list, dict)) and all(isinstance(v, str) for v in value):
            return list(value)
        return None


@pytest.fixture(scope="module")
def scans() -> list[_Scan]:
    files = sorted(p for d in SOURCE_DIRS for p in d.rglob("*.py"))
    assert files
    return [_Scan(path) for path in files]


def test_every_vllm_import_in_the_code_is_in_the_list(scans):
    def listed(module: str, name: str) -> bool:
        full = f"{module}.{name}" if name else module
        return any(e.name == full or e.name.startswith(full + ".") for e in INTERNALS)

    found = [(at, module, name) for scan in scans for at, module, name in scan.imported]
    assert len(found) > 30  # the scan sees the code's imports at all
    unlisted = [f"{at}: {module}{'.' + name if name else ''}" for at, module, name in found if not listed(module, name)]
    assert unlisted == [], "vLLM symbols imported but not in steer_vllm/vllm_internals.py INTERNALS"


def test_every_patched_vllm_method_is_listed_as_patched_and_every_listed_patch_is_made(scans):
    unresolved = [line for scan in scans for line in scan.unresolved]
    assert unresolved == [], "patch() calls whose vLLM class or method name the scan cannot tell"
    scanned = {f"{module}.{cls}.{method}" for scan in scans for _, module, cls, method in scan.patched}
    scanned |= {f"{module}.{cls}" for scan in scans for _, module, cls in scan.extended}
    listed = {e.name for e in INTERNALS if e.use == "patched"}
    assert scanned - listed == set(), "patched in the code, not listed as patched in INTERNALS"
    assert listed - scanned == set(), "listed as patched in INTERNALS, patched nowhere"
    assert "vllm.v1.engine.input_processor.InputProcessor.__init__" in scanned
    assert "vllm.renderers.online_renderer.OnlineRenderer.render_responses" in scanned


def test_render_hooks_have_an_extractor_for_every_listed_name():
    from steer_server.serving import render_hook
    from steer_vllm.vllm_internals import RENDER_METHODS

    assert set(render_hook._ENGINE_INPUTS_OF) == set(RENDER_METHODS)  # noqa: SLF001


# --------------------------------------------------------------- (c) a moved symbol is refused by name

def test_a_symbol_missing_from_vllm_is_refused_naming_it_and_the_vllm_version():
    entries = (*INTERNALS, GONE)
    (message,) = missing("engine", entries)
    assert message.startswith("vllm.v1.worker.gpu_model_runner.GPUModelRunner._no_such_method (patched: ")
    assert f"missing in vLLM {_vllm_version()}" in message
    assert missing("api", entries) == []  # the other process's check is not affected
    with pytest.raises(VllmInternalsMissing) as refused:
        check("engine", entries)
    assert isinstance(refused.value, SteeringNotInstalled)
    text = str(refused.value)
    assert "steer-server refuses to start" in text
    assert "GPUModelRunner._no_such_method" in text and _vllm_version() in text


def test_a_moved_module_and_a_method_only_inherited_are_refused_with_the_reason():
    entries = (
        Internal("vllm.v1.no_such_module", "Thing", "called", "api", "moved away"),
        Internal("vllm.v1.worker.cpu_model_runner", "CPUModelRunner._model_forward", "patched", "engine", "x"),
        Internal("vllm.no_such_package", "", "read", "engine", "gone"),
    )
    moved, inherited, gone = missing(None, entries)
    assert "vllm.v1.no_such_module.Thing" in moved and "cannot be imported" in moved
    assert "does not define _model_forward itself (only inherited)" in inherited
    assert "module vllm.no_such_package does not exist" in gone


def test_register_refuses_before_installing_hooks(monkeypatch):
    import steer_vllm
    from steer_vllm import vllm_internals

    monkeypatch.setattr(vllm_internals, "INTERNALS", (*INTERNALS, GONE))
    monkeypatch.delenv("VLLM_USE_V2_MODEL_RUNNER", raising=False)
    with pytest.raises(VllmInternalsMissing, match="GPUModelRunner._no_such_method"):
        steer_vllm.register()
    import os

    assert "VLLM_USE_V2_MODEL_RUNNER" not in os.environ  # refused before anything of register() ran


def test_the_endpoint_plugin_refuses_a_missing_api_symbol(monkeypatch):
    from fastapi import FastAPI

    from steer_server.serving.api import SteerApiPlugin
    from steer_vllm import vllm_internals

    gone = Internal("vllm.renderers.online_renderer", "OnlineRenderer.render_gone", "patched", "api", "moved")
    monkeypatch.setattr(vllm_internals, "INTERNALS", (*INTERNALS, gone))
    app = FastAPI()
    with pytest.raises(VllmInternalsMissing, match="OnlineRenderer.render_gone"):
        SteerApiPlugin().attach_router(app)
    assert app.user_middleware == []  # nothing was wired


# --------------------------------------------------------------- the API key rewrite is proven

def _vllm_args(api_key: list[str] | None) -> Namespace:
    return Namespace(allowed_origins=["*"], allow_credentials=False, allowed_methods=["*"], allowed_headers=["*"],
                     api_key=api_key, enable_request_id_headers=False, middleware=[])


def test_vllms_key_check_is_proven_to_hold_the_role_keys(monkeypatch):
    """install_access_control merges the role keys into app.state.args.api_key; vLLM's own
    middleware builder then reads that list, and access_problems proves it did."""
    from fastapi import FastAPI
    from vllm.entrypoints.serve.middleware.register import init_entrypoints_middleware

    from steer_server.serving.access import access_problems, install_access_control

    monkeypatch.delenv("STEER_API_KEYS_FILE", raising=False)
    monkeypatch.setenv("STEER_ADMIN_API_KEY", "admin-key")

    app = FastAPI()
    app.state.args = _vllm_args(["inference-key"])
    install_access_control(app)
    init_entrypoints_middleware(app.state.args, app, ("generate",))
    assert access_problems(app) == []

    # A vLLM that built its check from another copy of the arguments leaves the admin key out.
    app = FastAPI()
    app.state.args = _vllm_args(["inference-key"])
    original = Namespace(**vars(app.state.args))
    install_access_control(app)
    init_entrypoints_middleware(original, app, ("generate",))
    (problem,) = access_problems(app)
    assert "lacks 1 of the 2 keys" in problem and "app.state.args.api_key" in problem

    # No roles configured: nothing was merged, vLLM's check is its own.
    monkeypatch.delenv("STEER_ADMIN_API_KEY")
    app = FastAPI()
    app.state.args = _vllm_args(["inference-key"])
    install_access_control(app)
    assert access_problems(app) == []
