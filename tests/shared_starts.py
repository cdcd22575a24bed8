"""Two xdist workers, and each shared start (a session server, the engine host) started once.

Hooks and helpers for tests/conftest.py: every module that uses a shared start joins one
xdist group with the others that use it, so one worker runs them together and starts it once;
any other module is a group of its own, so its module fixtures start once too. The worker closes
a shared start right after its group's last test instead of holding it idle, memory and all,
until the session ends.
"""
from __future__ import annotations

from collections import Counter
from collections.abc import Callable

import pytest

SHARED_STARTS = ("server", "tiny_server", "fp32_default_server", "engine_host")  # fixture names
_OPEN: dict[str, Callable[[], None]] = {}  # fixture name -> how to close what it started


def close_with_group(fixture: str, close: Callable[[], None]) -> None:
    """Have ``close`` called when the worker leaves the group whose tests use ``fixture``;
    ``close`` must be safe to call again (the fixture's own teardown calls it at the end)."""
    _OPEN[fixture] = close


def _module(item) -> str:
    return item.nodeid.split("::")[0]


def _groups(items) -> dict[str, str]:
    """module -> its group's name, for the modules joined through the shared starts they use."""
    joined: dict[str, str] = {}  # union-find over modules and shared starts

    def root(name: str) -> str:
        while joined.setdefault(name, name) != name:
            name = joined[name]
        return name

    for item in items:
        for shared in SHARED_STARTS:
            if shared in item.fixturenames:
                joined[root(_module(item))] = root(shared)
    members: dict[str, set[str]] = {}
    for name in list(joined):
        members.setdefault(root(name), set()).add(name)
    names = {top: "+".join(sorted(group & set(SHARED_STARTS))) for top, group in members.items()}
    return {module: names[root(module)] for module in {_module(item) for item in items} if module in joined}


def group_for_workers(items, long_first: tuple[str, ...]) -> None:
    """Marks each test's xdist group and puts the longest work first, so the last to finish is
    short: the shared groups (most modules first), then the modules with a test marked with one of
    ``long_first``, then the rest. Call it from ``pytest_collection_modifyitems`` before xdist's
    own (``tryfirst``)."""
    groups = _groups(items)
    modules_in = Counter(groups.values())
    starting = {_module(item) for item in items if any(item.get_closest_marker(mark) for mark in long_first)}

    def order(module: str) -> tuple[int, str]:
        if module in groups:
            return -modules_in[groups[module]], groups[module]
        return (0 if module in starting else 1), module

    for item in items:
        item.add_marker(pytest.mark.xdist_group(groups.get(_module(item), _module(item))))
    items.sort(key=lambda item: order(_module(item)))  # stable: a module's tests keep their order


def _group(item) -> str | None:
    mark = item.get_closest_marker("xdist_group")
    return mark.args[0] if mark else None


@pytest.hookimpl(wrapper=True)  # after the test's own fixtures are torn down
def pytest_runtest_teardown(item, nextitem):
    try:
        return (yield)
    finally:
        if nextitem is None or _group(nextitem) != _group(item):
            while _OPEN:
                _OPEN.popitem()[1]()


@pytest.hookimpl(optionalhook=True)
def pytest_xdist_node_collection_finished(node, ids) -> None:
    """Refuse to run when xdist did not group the tests: it writes the group into each node id,
    which pytest 9.2 no longer lets it do (pytest-xdist#1386), and then every worker would start
    every shared start, twice the memory of a run."""
    if node.config.getvalue("dist") == "loadgroup" and any("@" not in nodeid for nodeid in ids):
        pytest.exit("pytest-xdist did not group the tests: use the pytest that requirements/cpu.lock pins "
                    "(pytest-xdist#1386)", returncode=pytest.ExitCode.USAGE_ERROR)
