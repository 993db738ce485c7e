"""The first-fit extent allocator of a tier's arena."""

from embtierd.tiers.extents import Extent, ExtentAllocator


def test_allocate_rounds_and_runs_out():
    a = ExtentAllocator(1000, 64)
    assert a.capacity == 960
    assert a.allocate(1) == Extent(0, 64)
    assert a.allocate(100) == Extent(64, 128)
    assert a.used == 192
    assert a.allocate(960) is None
    assert a.largest_free() == 768


def test_release_coalesces_neighbours():
    a = ExtentAllocator(4096, 1024)
    parts = [a.allocate(1024) for _ in range(4)]
    assert a.allocate(1) is None
    a.release(parts[1])
    a.release(parts[3])
    assert a.largest_free() == 1024
    a.release(parts[2])  # joins both free neighbours
    assert a.largest_free() == 3072
    a.release(parts[0])
    assert a.largest_free() == 4096 and a.used == 0
    assert a.allocate(4096) == Extent(0, 4096)
