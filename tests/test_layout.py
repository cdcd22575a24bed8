"""The package layout holds: no import cycles (lazy imports included), the plugin and the store
below the server, and the server apart from the tooling (eval, bench, check) and its libraries."""
from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
PACKAGES = {"steer_server": REPO / "steer_server", "steer_vllm": REPO / "plugins" / "steer_vllm",
            "vector_store": REPO / "vector_store"}
TOOLING = ("steer_server.eval", "steer_server.bench", "steer_server.check", "steer_server.cli")


def _modules() -> dict[str, Path]:
    modules = {}
    for package, root in PACKAGES.items():
        for path in root.rglob("*.py"):
            parts = [package, *path.relative_to(root).with_suffix("").parts]
            modules[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return modules


def _imports(path: Path, modules: dict[str, Path]) -> set[str]:
    """Project modules ``path`` imports anywhere (in functions too), except under TYPE_CHECKING."""
    tree = ast.parse(path.read_text())
    typing_only = {id(node) for block in ast.walk(tree)
                   if isinstance(block, ast.If) and "TYPE_CHECKING" in ast.unparse(block.test)
                   for node in ast.walk(block)}
    found = set()
    for node in ast.walk(tree):
        if id(node) in typing_only:
            continue
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names if alias.name in modules)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            for alias in node.names:
                child = f"{node.module}.{alias.name}"
                if child in modules:
                    found.add(child)
                elif node.module in modules:
                    found.add(node.module)
    return found


GRAPH = {name: _imports(path, _modules()) - {name} for name, path in _modules().items()}


def _cycle_through(start: str) -> list[str] | None:
    """A path start -> ... -> start in GRAPH, if there is one."""
    stack, seen = [(start, [start])], set()
    while stack:
        node, path = stack.pop()
        for nxt in sorted(GRAPH[node]):
            if nxt == start:
                return path + [start]
            if nxt not in seen:
                seen.add(nxt)
                stack.append((nxt, path + [nxt]))
    return None


def test_the_graph_is_read():
    # the scan sees what the server is made of (a broken scan would pass every check below)
    assert "steer_vllm.validate" in GRAPH["steer_server.serving.steering"]
    assert "steer_server.measure.sweep" in GRAPH["steer_server.serving.sweep_route"]
    assert "steer_vllm.admission" in GRAPH["steer_vllm"]  # an import inside a function


def test_no_import_cycles():
    cycles = [cycle for name in sorted(GRAPH) if (cycle := _cycle_through(name))]
    assert not cycles, "\n".join(" -> ".join(cycle) for cycle in cycles)


def test_each_layer_imports_only_what_is_below_it():
    below = {
        "vector_store": ("vector_store",),
        "steer_vllm": ("steer_vllm", "vector_store"),
        "steer_server.measure": ("steer_server.measure", "steer_server.client", "steer_server.settings",
                                 "steer_vllm", "vector_store"),
        "steer_server.serving": ("steer_server.serving", "steer_server.measure", "steer_server.client",
                                 "steer_server.settings", "steer_server.config_lines", "steer_vllm", "vector_store"),
    }
    wrong = []
    for name, imported in GRAPH.items():
        layer = next((layer for layer in below if name == layer or name.startswith(layer + ".")), None)
        if layer is not None:
            wrong += [f"{name} imports {target}" for target in sorted(imported)
                      if not any(target == ok or target.startswith(ok + ".") for ok in below[layer])]
    assert not wrong, "\n".join(wrong)


def test_the_server_loads_no_tooling():
    """Starting the API plugin (what `steer-server serve` loads into vLLM) imports neither the
    tooling nor the libraries only the tooling needs (the `eval` and `bench` extras)."""
    code = "import sys, steer_server.serving.api; print(' '.join(sorted(sys.modules)))"
    loaded = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                            timeout=600).stdout.split()
    assert "steer_server.serving.api" in loaded and "vllm" in loaded
    unwanted = [m for m in loaded if any(m == t or m.startswith(t + ".") for t in TOOLING)
                or m.split(".")[0] in ("matplotlib", "vaderSentiment", "locust")]
    assert not unwanted, unwanted
