"""Moving rows between tiers: bytes preserved, slots reused, and lookups and
writes running at the same time never see a torn, foreign or lost row."""

from __future__ import annotations

import threading
import time

import numpy as np
import pytest
from embtierd.errors import InvalidArgumentError, ScmReadError
from embtierd.tiering.config import TableSettings, TieringConfig
from embtierd.tiering.engine import TieringEngine

from tests.support import assert_parts_match_addresses


@pytest.mark.parametrize("dtype", ["float32", "float16", "int8"])
def test_moves_keep_the_bytes(store_factory, dtype):
    s = store_factory(dram="8K", cxl="8K", scm="4M")
    s.create_table("m", 2000, 12, dtype, initializer="uniform", seed=1)
    ids = np.arange(2000, dtype=np.int64)
    before = s.read_encoded("m", ids)
    rows_before = s.describe("m").rows_by_tier
    scm_rows = np.flatnonzero(s.placement("m") == 2)[:50].astype(np.int64)
    dram_rows = np.flatnonzero(s.placement("m") == 0)[:50].astype(np.int64)
    assert s.move_rows("m", dram_rows, "scm") == 50   # demote: frees 50 DRAM slots
    assert s.move_rows("m", scm_rows, "dram") == 50   # promote into them
    placement = s.placement("m")
    assert np.all(placement[scm_rows] == 0) and np.all(placement[dram_rows] == 2)
    assert s.describe("m").rows_by_tier == rows_before
    np.testing.assert_array_equal(s.read_encoded("m", ids), before)
    assert s.move_rows("m", scm_rows, "dram") == 0    # already there


class CountingPacer:
    """A ReadPacer that keeps the rows on SCM each read of a move took."""

    def __init__(self, read_depth: int | None):
        self.read_depth, self.reads = read_depth, []

    def read(self, scm_rows: int) -> None:
        self.reads.append(scm_rows)


def test_a_move_reads_its_scm_rows_a_few_at_a_time(store_factory):
    s = store_factory(dram="8K", cxl="8K", scm="4M")
    s.create_table("m", 2000, 12, initializer="uniform", seed=2)
    ids = np.arange(2000, dtype=np.int64)
    before = s.read_encoded("m", ids)
    placement = s.placement("m")
    scm_rows = np.flatnonzero(placement == 2)[:40].astype(np.int64)
    cxl_rows = np.flatnonzero(placement == 1)[:30].astype(np.int64)
    assert s.move_rows("m", np.flatnonzero(placement == 0)[:40].astype(np.int64), "scm") == 40  # room in DRAM
    mixed = np.concatenate([np.stack([scm_rows[:30], cxl_rows], axis=1).ravel(), scm_rows[30:]])  # SCM, CXL, ...
    pacer = CountingPacer(7)
    assert s.mover.move(s._get("m"), mixed, 0, pacer) == 40  # DRAM has room for 40: the first 40 move
    assert pacer.reads == [7, 7, 6]  # the 20 rows on SCM among them
    np.testing.assert_array_equal(s.read_encoded("m", ids), before)
    assert np.all(s.placement("m")[mixed[:40]] == 0)
    pacer = CountingPacer(None)
    assert s.mover.move(s._get("m"), scm_rows[30:], 1, pacer) == 10 and pacer.reads == [10]  # all at once
    np.testing.assert_array_equal(s.read_encoded("m", ids), before)


def test_a_full_tier_takes_what_fits_and_slots_are_reused(store_factory):
    s = store_factory(dram="4K", cxl="0", scm="4M")
    s.create_table("m", 1000, 8)                      # 128 rows fill DRAM
    values = np.random.default_rng(0).standard_normal((1000, 8), dtype=np.float32)
    s.write_rows("m", np.arange(1000, dtype=np.int64), values)
    assert s.move_rows("m", np.arange(500, 600, dtype=np.int64), "dram") == 0
    for round_ in range(20):                          # swap rows in and out of DRAM many times
        out = np.flatnonzero(s.placement("m") == 0)[:30].astype(np.int64)
        into = np.arange(200 + 30 * round_, 230 + 30 * round_, dtype=np.int64)
        assert s.move_rows("m", out, "scm") == 30
        assert s.move_rows("m", into, "dram") == 30
    info = s.describe("m")
    assert info.rows_by_tier["dram"] == 128 and info.bytes_by_tier["dram"] == 4096
    assert info.bytes_by_tier["scm"] <= 40 * 4096     # freed SCM slots were reused, not grown without end
    np.testing.assert_array_equal(s.lookup("m", np.arange(1000, dtype=np.int64)), values)


def test_bad_moves(store_factory):
    s = store_factory(dram="4K")
    s.create_table("m", 100, 8)
    with pytest.raises(InvalidArgumentError, match="tier must be one of"):
        s.move_rows("m", np.arange(3, dtype=np.int64), "hbm")
    with pytest.raises(InvalidArgumentError, match="100 is out of range"):
        s.move_rows("m", np.array([1, 100], dtype=np.int64), "scm")


def stress(s, mover, seconds: float = 4.0) -> int:
    """Readers (lookups and pooled lookups) and a writer on table "c" while mover(stop) migrates rows.

    Row i always holds i * 1000 + v in every element, v a version some writer wrote: every read row
    must be whole and its own, and after the run every acknowledged write must be there.  Returns
    what mover returned (rows moved)."""
    n, dim = 3000, 32
    s.create_table("c", n, dim)
    ids = np.arange(n, dtype=np.int64)
    s.write_rows("c", ids, np.repeat((ids * 1000.0)[:, None], dim, axis=1).astype(np.float32))
    stop, problems, last_version, moved = threading.Event(), [], np.zeros(n, dtype=np.int64), []

    def check(rows, which):
        whole = rows.min(axis=1) == rows.max(axis=1)
        owner = np.floor(rows[:, 0] / 1000).astype(np.int64)
        if not whole.all():
            problems.append(f"torn row {which[np.flatnonzero(~whole)[0]]}")
        if not np.array_equal(owner, which):
            problems.append(f"row {which[np.flatnonzero(owner != which)[0]]} holds another row's value")

    def reader():
        rng = np.random.default_rng()
        while not stop.is_set() and not problems:
            pick = rng.integers(0, n, 512)
            check(s.lookup("c", pick), pick)
            pooled = s.lookup_pooled("c", pick, np.ones(512, dtype=np.int32))  # bags of one: pooling = the row
            check(pooled, pick)

    def writer():
        rng = np.random.default_rng(7)
        version = 0
        while not stop.is_set():
            version += 1
            pick = np.unique(rng.integers(0, n, 200))
            s.write_rows("c", pick, np.repeat((pick * 1000.0 + version % 1000)[:, None], dim, axis=1)
                         .astype(np.float32))
            last_version[pick] = version % 1000

    threads = [threading.Thread(target=f) for f in (reader, reader, writer)]
    threads.append(threading.Thread(target=lambda: moved.append(mover(stop))))
    for t in threads:
        t.start()
    time.sleep(seconds)
    stop.set()
    for t in threads:
        t.join(timeout=30)
    assert problems == []
    final = s.lookup("c", ids)
    np.testing.assert_array_equal(final[:, 0], ids * 1000.0 + last_version)  # every acknowledged write is there
    assert sum(s.describe("c").rows_by_tier.values()) == n
    return sum(moved)


def test_moves_under_concurrent_reads_and_writes(store_factory):
    s = store_factory(dram="16K", cxl="16K", scm="8M", kernel_threads=2)

    def mover(stop) -> int:
        rng, tiers, moved = np.random.default_rng(9), ["dram", "cxl", "scm"], 0
        while not stop.is_set():
            for tier in tiers:
                leave = np.flatnonzero(s.placement("c") == tiers.index(tier))
                if leave.size:
                    moved += s.move_rows("c", rng.choice(leave, min(64, leave.size), replace=False)
                                         .astype(np.int64), tiers[(tiers.index(tier) + 1) % 3])
                moved += s.move_rows("c", rng.integers(0, 3000, 64), tier)
        return moved

    assert stress(s, mover) > 1000  # the mover really moved rows, among all three tiers


def test_tiering_engine_under_concurrent_reads_and_writes(store_factory):
    """The engine itself as the mover, with the table's limits and pin changing under it (so rows are
    promoted, demoted into clean and dirty SCM copies, pinned, and compacted when a limit drops)."""
    s = store_factory(dram="64K", cxl="32K", scm="8M", kernel_threads=2, heat_sample_shift=0)
    engine = TieringEngine(s, TieringConfig(True, 0.05, 1 << 30, 0.25, aging_intervals=1))
    settings = [TableSettings(), TableSettings(capacity_bytes={"dram": 8 << 10, "cxl": 4 << 10}), TableSettings(pin="scm"),
                TableSettings(policy="lru"), TableSettings(capacity_bytes={"dram": 0, "cxl": None})]

    def mover(stop) -> int:
        moved, i = 0, 0
        while not stop.is_set():
            s.set_policy("c", settings[i % len(settings)])
            for _ in range(3):
                moved += sum(engine.run_once().values())
            i += 1
        return moved

    assert stress(s, mover) > 1000


def test_rows_promoted_from_scm_keep_a_copy_there_clean_until_written(store_factory):
    s = store_factory(dram="8K", cxl="0", scm="4M")   # DRAM: 256 rows of 32 bytes
    s.create_table("c", 2000, 8, initializer="uniform", seed=3)
    shift = s._get("c").native.tier_shift
    loc = s._get("c").native.loc
    values = s.lookup("c", np.arange(2000, dtype=np.int64))
    cold = np.arange(0, 40, dtype=np.int64)           # in DRAM since creation: no SCM copy
    hot = np.arange(1000, 1040, dtype=np.int64)       # on SCM
    scm_home = loc[hot].copy()
    assert s.move_rows("c", cold, "scm") == 40
    assert s.move_rows("c", hot, "dram") == 40
    scm_bytes = s.describe("c").bytes_by_tier["scm"]
    written = np.ascontiguousarray(hot[::2])            # half of them change while in DRAM
    new_values = np.full((written.size, 8), 7.5, dtype=np.float32)
    s.write_rows("c", written, new_values)
    values[written] = new_values
    assert s.move_rows("c", hot, "scm") == 40          # back down: each into its own SCM copy
    np.testing.assert_array_equal(loc[hot], scm_home)
    assert s.describe("c").bytes_by_tier["scm"] == scm_bytes  # no new SCM space taken
    np.testing.assert_array_equal(s.lookup("c", np.arange(2000, dtype=np.int64)), values)
    assert np.all((loc[cold] >> shift) == 2)
    # a copy is dropped once the row is home on SCM: the next promotion and demotion reuse the slot again
    assert s.move_rows("c", hot[:5], "dram") == 5 and s.move_rows("c", hot[:5], "scm") == 5
    np.testing.assert_array_equal(loc[hot], scm_home)
    np.testing.assert_array_equal(s.lookup("c", hot), values[hot])


def test_port_trades_under_concurrent_reads_and_writes(store_factory):
    """Rows trading places between CXL ports (through spare CXL slots when the table has some, else
    through SCM) while readers and a writer run: no torn, foreign or lost row."""
    s = store_factory(dram="16K", cxl="64K", scm="8M", kernel_threads=2)  # 128-byte rows: 128 per CXL port
    ports = s.cxl_ports

    def mover(stop) -> int:
        rng, copied, rounds = np.random.default_rng(3), 0, 0
        while not stop.is_set():
            heat, parts = s.heat("c", writable=True), s.parts_of("c", np.arange(3000, dtype=np.int64))
            heat[:] = 0
            busy = parts == rng.integers(1, 1 + ports)
            heat[busy] = rng.integers(1, 50, np.count_nonzero(busy))   # one port carries all the heat
            spare = rounds % 2 == 0
            if spare:   # free CXL slots for the trades to go through; the other rounds bounce through SCM
                out = np.flatnonzero((parts >= 1) & (parts <= ports) & ~busy)[:40].astype(np.int64)
                s.move_rows("c", out, "scm")
            copied += s.spread_ports("c")
            if spare:
                s.move_rows("c", out, "cxl")
            rounds += 1
        return copied

    relocate, tiers = s.mover._relocate, []

    def recording(table, ids, tier, slots):
        tiers.append(tier)
        relocate(table, ids, tier, slots)

    s.mover._relocate = recording
    assert stress(s, mover) > 1000
    assert_parts_match_addresses(s, "c")
    spare_tiers = tiers[::3]  # each trade: to the spare slots, then both rows into CXL
    assert set(tiers[1::3]) == set(tiers[2::3]) == {1} and spare_tiers.count(1) > 0 and spare_tiers.count(2) > 0


def test_nothing_but_the_mover_writes_a_rows_location():
    """Placement entries change only through NativeTable.publish and write_slots (the copy before a
    publish), and only the mover calls them; nothing assigns into a placement map."""
    import ast
    from pathlib import Path

    package = Path(__file__).resolve().parents[2] / "daemon" / "embtierd"
    writers = {}
    for path in package.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and \
                    node.func.attr in ("publish", "write_slots", "et_publish", "et_write_slots") and \
                    ast.unparse(node.func.value).split(".")[-1] in ("native", "lib"):  # (NativeTable's, C's)
                writers.setdefault(node.func.attr, set()).add(path.relative_to(package).as_posix())
            targets = node.targets if isinstance(node, ast.Assign) else \
                [node.target] if isinstance(node, ast.AugAssign | ast.AnnAssign) else []
            for target in targets:
                if isinstance(target, ast.Subscript) and isinstance(target.value, ast.Attribute) and \
                        target.value.attr == "loc":
                    writers.setdefault("loc[...] =", set()).add(path.relative_to(package).as_posix())
    assert writers == {"publish": {"store/mover.py"}, "write_slots": {"store/mover.py"},
                       "et_publish": {"native.py"}, "et_write_slots": {"native.py"}}


class FailingPacer:
    """A ReadPacer whose device fails after the first run of SCM reads, as a bad block would."""

    read_depth = 4

    def read(self, scm_rows: int) -> None:
        raise ScmReadError("table 'm': the row of id 1 cannot be read from the SCM file: Input/output error")


def test_a_move_whose_scm_read_fails_moves_nothing_and_keeps_its_slots(store_factory):
    s = store_factory(dram="8K", cxl="8K", scm="4M")
    s.create_table("m", 2000, 12, initializer="uniform", seed=3)
    ids = np.arange(2000, dtype=np.int64)
    before, placement = s.read_encoded("m", ids), s.placement("m")
    assert s.move_rows("m", np.flatnonzero(placement == 0)[:40].astype(np.int64), "scm") == 40  # room in DRAM
    placement = s.placement("m")
    room = s.mover.room_rows(s._get("m"), 0)
    scm_rows = np.flatnonzero(placement == 2)[:20].astype(np.int64)
    with pytest.raises(ScmReadError):
        s.mover.move(s._get("m"), scm_rows, 0, FailingPacer())
    assert s.mover.room_rows(s._get("m"), 0) == room  # the slots it took are the tier's again
    np.testing.assert_array_equal(s.placement("m"), placement)
    np.testing.assert_array_equal(s.read_encoded("m", ids), before)
    assert s.move_rows("m", scm_rows, "dram") == 20  # and they are there to take
