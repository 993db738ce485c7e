"""native.mem_bind checked against the kernel's own view of the policy (get_mempolicy(2) with MPOL_F_ADDR)."""

from __future__ import annotations

import errno

import pytest
from embtierd import native

from tests.support import MPOL_BIND, MPOL_DEFAULT, get_mempolicy

MiB = 1 << 20


@pytest.fixture
def mapping():
    nbytes = 8 * MiB
    address, _ = native.mem_map(nbytes, False)
    yield address, nbytes
    native.mem_unmap(address, nbytes)


def test_binds_only_the_sub_range(mapping):
    start, _ = mapping
    assert get_mempolicy(start) == (MPOL_DEFAULT, set())
    lo, hi = start + 2 * MiB, start + 4 * MiB
    assert native.mem_bind(lo, hi - lo, [0]) == 0
    for inside in (lo, lo + MiB, hi - 1):
        assert get_mempolicy(inside) == (MPOL_BIND, {0}), hex(inside - start)
    for outside in (start, lo - 1, hi, start + 6 * MiB):
        assert get_mempolicy(outside)[0] == MPOL_DEFAULT, hex(outside - start)


def test_length_is_rounded_up_to_pages(mapping):
    start, _ = mapping
    get_mempolicy(start)  # skips where the syscall is refused
    assert native.mem_bind(start, 1, [0]) == 0
    assert get_mempolicy(start + 4095) == (MPOL_BIND, {0})
    assert get_mempolicy(start + 4096)[0] == MPOL_DEFAULT


def test_missing_node_returns_einval(mapping):
    start, _ = mapping
    get_mempolicy(start)
    assert native.mem_bind(start + 2 * MiB, 2 * MiB, [63]) == errno.EINVAL
    assert get_mempolicy(start + 2 * MiB)[0] == MPOL_DEFAULT


@pytest.mark.parametrize("offset, nbytes", [(1, 2 * MiB), (2048, 4096), (0, 0)])
def test_unaligned_address_or_empty_range_returns_einval(mapping, offset, nbytes):
    start, _ = mapping
    assert native.mem_bind(start + 2 * MiB + offset, nbytes, [0]) == errno.EINVAL
