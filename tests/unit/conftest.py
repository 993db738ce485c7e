"""Fixtures: stores on small tiers in a fresh state directory per test.

tmp_path lives on a disk file system here (O_DIRECT works); the SCM file
of every store is made inside it.
"""

from __future__ import annotations

import numpy as np
import pytest
from embtierd import config, native
from embtierd.store.catalog import Store


def make_config(state_dir, dram="64K", cxl="64K", scm="64M", fabric=None, **kernels):
    return config.load(overrides={
        "state_dir": str(state_dir),
        "tiers": {"dram": {"capacity": dram}, "cxl": {"capacity": cxl}, "scm": {"capacity": scm}},
        "kernels": kernels,
        "fabric": fabric or {},
    })


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


_BEST_ISA = {name: code for code, name in native.ISA_NAMES.items()}[native.isa()]
AVAILABLE_ISAS = [native.ISA_NAMES[code] for code in sorted(native.ISA_NAMES) if code <= _BEST_ISA]


@pytest.fixture(params=AVAILABLE_ISAS)
def isa(request):
    """Runs the test once per instruction set this CPU has, restoring the best one after."""
    best = native.isa()
    native.force_isa(request.param)
    yield request.param
    native.force_isa(best)


def rng_values(rng: np.random.Generator, n: int, dim: int) -> np.ndarray:
    return rng.standard_normal((n, dim), dtype=np.float32)
