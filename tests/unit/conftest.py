"""Fixtures: stores on small tiers in a fresh state directory per test.

tmp_path lives on a disk file system here (O_DIRECT works); the SCM file
of every store is made inside it.
"""

from __future__ import annotations

import pytest
from embtierd import native
from embtierd.store.catalog import Store

from tests.support import AVAILABLE_ISAS, make_config


@pytest.fixture
def store_factory(tmp_path):
    """make(dram=..., cxl=..., scm=..., **kernel options) -> Store, closed after the test."""
    stores = []

    def make(**kwargs):
        store = Store(make_config(tmp_path / f"s{len(stores)}", **kwargs))
        stores.append(store)
        return store

    yield make
    for store in stores:
        store.close()
    native.set_kernel_threads(1)


@pytest.fixture(params=AVAILABLE_ISAS)
def isa(request):
    """Runs the test once per instruction set this CPU has, restoring the best one after."""
    best = native.isa()
    native.force_isa(request.param)
    yield request.param
    native.force_isa(best)
