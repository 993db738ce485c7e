"""A real embtierd process per test module, on a Unix socket and a loopback
TCP port in a temporary state directory, stopped with SIGTERM afterwards
(started the way the tools start one: embtier_tools.daemon)."""

from __future__ import annotations

import pytest

from tests.support import kill_daemons_started_since, start_daemon


@pytest.fixture(autouse=True)
def _no_daemon_outlives_its_test():
    """Kills the daemons a test started and left running (a test that failed half way); those of
    module fixtures, started before it, are theirs to stop."""
    with kill_daemons_started_since():
        yield


@pytest.fixture(scope="module")
def daemon(tmp_path_factory):
    d = start_daemon(tmp_path_factory.mktemp("embtierd"))
    yield d
    assert d.stop() == 0, d.log()
