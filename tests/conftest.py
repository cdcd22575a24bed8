"""Fixtures every test folder may use, and markers saying what each test starts."""
from __future__ import annotations

from pathlib import Path

import pytest

from default_server import fp32_default_server  # noqa: F401  (a fixture, found by name)
from redis_fixture import redis_server  # noqa: F401  (a fixture, found by name)
from shared_starts import group_for_workers
from shared_starts import pytest_runtest_teardown, pytest_xdist_node_collection_finished  # noqa: F401  (hooks)

# What a test starts, for `-m` (plain `make test` runs everything; e.g. `-m "not engine and not
# server"` leaves the quick tests). By the fixtures it uses, the session's and each module's own:
_BY_FIXTURE = {
    "server": {"server", "tiny_server", "fp32_default_server", "fleet", "faulty", "served", "single_worker"},
    "redis": {"redis_server", "faulty", "served"},
    "engine": {"engine_host", "engine_store"},
    "browser": {"browser"},
}
# ...and, for modules that start it inside the tests themselves, by path (under tests/):
_BY_PATH = {
    "engine/": {"engine"},  # offline vllm.LLM engines
    "check/": {"engine"},  # `steer-server check` starts one
    "parallel/": {"server"},
    "api/test_serve_fresh_machine.py": {"server"},  # `make serve`
}
_TESTS = Path(__file__).parent


@pytest.hookimpl(tryfirst=True)  # before xdist reads the xdist_group marks
def pytest_collection_modifyitems(config, items) -> None:
    for item in items:
        where = Path(item.path).relative_to(_TESTS).as_posix() if Path(item.path).is_relative_to(_TESTS) else ""
        starts = {marker for marker, fixtures in _BY_FIXTURE.items() if fixtures & set(item.fixturenames)}
        starts |= {marker for prefix, markers in _BY_PATH.items() if where.startswith(prefix) for marker in markers}
        callspec = getattr(item, "callspec", None)
        if callspec is not None and "redis" in [value for value in callspec.params.values() if isinstance(value, str)]:
            starts.add("redis")  # a store fixture parametrized over backends asks for redis_server by value
        for marker in sorted(starts):
            item.add_marker(getattr(pytest.mark, marker))
    group_for_workers(items, long_first=("server", "engine"))
