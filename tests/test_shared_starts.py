"""The suite's own scheduling (tests/shared_starts.py), run for real: pytest-xdist with two
workers on a small project whose modules share a session fixture, as `make test` runs."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

CONFTEST = '''
import os
import pytest
from shared_starts import close_with_group, group_for_workers
from shared_starts import pytest_runtest_teardown, pytest_xdist_node_collection_finished


@pytest.hookimpl(tryfirst=True)
def pytest_collection_modifyitems(config, items):
    group_for_workers(items, long_first=())


def log(event):
    with open(os.environ["EVENTS"], "a") as events:
        events.write(os.environ["PYTEST_XDIST_WORKER"] + " " + event + "\\n")


@pytest.fixture(scope="session")
def tiny_server():
    log("start")
    closed = []

    def close():
        if not closed:
            closed.append(True)
            log("close")

    close_with_group("tiny_server", close)
    yield
    close()
'''
USES = "from conftest import log\n\ndef test_first(tiny_server):\n    log('test {m}')\n\n\ndef test_second():\n    log('test {m}')\n"
OTHER = ("import pytest\nfrom conftest import log\n\n@pytest.fixture(scope='module')\ndef own():\n    log('module {m}')\n\n\n"
         "def test_first(own):\n    log('test {m}')\n\n\ndef test_second(own):\n    log('test {m}')\n")


def test_a_shared_fixture_starts_once_in_one_worker_and_closes_when_its_group_ends(tmp_path: Path) -> None:
    project = tmp_path / "project"
    project.mkdir()
    (project / "conftest.py").write_text(CONFTEST)
    uses, others = ["test_uses_a", "test_uses_b"], [f"test_other_{n}" for n in range(4)]
    for module in uses:
        (project / f"{module}.py").write_text(USES.format(m=module))
    for module in others:
        (project / f"{module}.py").write_text(OTHER.format(m=module))
    events = tmp_path / "events"
    env = dict(os.environ, EVENTS=str(events), PYTHONPATH=str(Path(__file__).parent))
    run = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-n", "2", "--dist", "loadgroup",
                          "--no-loadscope-reorder", str(project)], cwd=project, env=env, capture_output=True, text=True,
                         timeout=300)
    assert run.returncode == 0, run.stdout + run.stderr
    assert "12 passed" in run.stdout, run.stdout
    lines = [line.split(" ", 1) for line in events.read_text().splitlines()]
    starts = [worker for worker, event in lines if event == "start"]
    assert len(starts) == 1, lines
    worker = starts[0]
    assert {w for w, event in lines if event.startswith("test test_uses")} == {worker}, lines
    # Both workers worked, and each other module's own fixture started once.
    assert {w for w, event in lines if event.startswith("test")} == {"gw0", "gw1"}, lines
    assert sorted(event for _, event in lines if event.startswith("module")) == [f"module {m}" for m in others]
    # In its worker: started, the group's four tests, closed, and only then anything else.
    mine = [event for w, event in lines if w == worker]
    assert mine[:6] == ["start", *[f"test {m}" for m in uses for _ in range(2)], "close"], mine
    assert "close" not in mine[6:], mine
