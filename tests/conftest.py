"""How the tests share the host when `make test` runs them on pytest-xdist workers (-n 2 --dist loadgroup).

Most of the run waits on daemons (start, restart, kill, replay), so two workers nearly halve it on a
2-core host. To keep that safe:

- each test file runs whole on one worker (its module fixtures, and tests that restart one state
  directory in turn, stay together), and the files that put network namespaces, veth pairs, routes
  and the fabric's fixed 169.254.100.0/30 on the host share one worker (HOST_NETWORK);
- the longest files start first (LONGEST_FIRST), so that no long file is left running alone at the end;
- each worker hands out loopback ports from its own share of embtier_tools.daemon.LISTEN_PORTS, so that
  a port one worker has checked free is never taken by a daemon of the other before its own binds it.

Without xdist (plain `pytest`, or -p no:xdist) the same order applies and nothing else changes.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from embtier_tools import daemon as daemon_tools

HOST_NETWORK = {"tests/e2e/test_cluster.py", "tests/e2e/test_cluster_bed.py", "tests/e2e/test_fabric.py"}

# measured: the soak runs its set 180 s; the rest are the slowest files of a full run on a 2-vCPU host
LONGEST_FIRST = [
    "tests/soak/test_soak.py",
    "tests/e2e/test_durability.py",
    "tests/e2e/test_durability_model.py",
    "tests/unit/test_fuzz_campaign.py",
]

ROOT = Path(__file__).resolve().parent.parent


def _file(item: pytest.Item) -> str:
    return Path(item.fspath).resolve().relative_to(ROOT).as_posix()


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "xdist_group(name): run on the worker that runs the group's other tests")
    worker, count = os.environ.get("PYTEST_XDIST_WORKER"), int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
    if worker and count > 1:
        index, ports = int(worker.removeprefix("gw")), daemon_tools.LISTEN_PORTS
        share = len(ports) // count
        daemon_tools.LISTEN_PORTS = range(ports.start + index * share, ports.start + (index + 1) * share)


@pytest.hookimpl(tryfirst=True)  # before xdist's own, which makes the groups from these marks
def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    rank = {name: i for i, name in enumerate(LONGEST_FIRST)}
    for item in items:
        name = _file(item)
        item.add_marker(pytest.mark.xdist_group("host-network" if name in HOST_NETWORK else name))
    items.sort(key=lambda item: rank.get(_file(item), len(rank)))  # stable: files stay whole, in their order


def pytest_collection_finish(session: pytest.Session) -> None:
    """On a worker of --dist loadgroup: refuses to run unless xdist's node ids carry the groups (a pytest or
    xdist release that drops them would spread a file's tests over both workers, module fixtures and all)."""
    if getattr(session.config.option, "loadgroup", False) and session.items and "@" not in session.items[0].nodeid:
        raise pytest.UsageError("pytest-xdist did not put the xdist_group marks in the node ids on this pytest; "
                                "run with TEST_WORKERS=0 or a pytest that pyproject.toml's test extra admits")
