"""MAPPED tables end to end: a real daemon serving ids through a mapping given at creation.

Lookups, pooled lookups and writes follow embtier.keys.mapped_rows (listed ids to their rows,
the others hashed into the rows from mapping_hash_from on); ExportMapping gives back exactly
the mapping created, in pages; the mapping survives a SIGKILL (log replay), a checkpoint and a
restore; bad mappings are INVALID_ARGUMENT naming the first bad position; recorded traces keep
their bags."""

from __future__ import annotations

import subprocess
import sys
import threading
import time

import numpy as np
import pytest
from embtier import Client, EmbtierClientError
from embtier.keys import hashed_rows, mapped_rows

from tests.support import run_cli, running_daemon, start_daemon

I64 = np.iinfo(np.int64)
ROWS, DIM = 1000, 4


@pytest.fixture(scope="module")
def daemon(tmp_path_factory):
    with running_daemon(tmp_path_factory.mktemp("mapped"), "[tiering]\nenabled = false\n") as d, \
            Client(d.target) as c:
        yield d, c


def a_mapping(rng: np.random.Generator, listed: int, rows: int, hash_from: int) -> tuple[np.ndarray, np.ndarray]:
    """listed distinct ids from the whole int64 range (both ends among them), each given a row in
    [0, rows): many share one, some in the hashed range too."""
    ids = np.unique(np.concatenate([[I64.min, I64.max], rng.integers(I64.min, I64.max, listed, dtype=np.int64)]))
    rng.shuffle(ids)
    return ids, rng.integers(0, max(1, hash_from // 4) if hash_from else rows, ids.size).astype(np.int64)


def queries(rng: np.random.Generator, listed: np.ndarray, n: int) -> np.ndarray:
    """Half listed ids, half others (never listed with overwhelming odds), shuffled."""
    return rng.permutation(np.concatenate([rng.choice(listed, n // 2), rng.integers(I64.min, I64.max, n - n // 2)]))


@pytest.mark.parametrize("seed, hash_from", [(0, 0), (7, 600), (2**64 - 1, 999)])
def test_lookups_and_pooled_lookups_read_the_rows_mapped_rows_gives(daemon, seed, hash_from):
    """A mapped table and a dense twin of the same initial values: mapped[id] == dense[mapped_rows(id)],
    raw and pooled (every offload mode), and the describe figures."""
    _, c = daemon
    rng = np.random.default_rng(seed % 1000)
    ids, rows = a_mapping(rng, 300, ROWS, hash_from)
    name = f"mapped{seed}"
    info = c.create_table(name, ROWS, DIM, initializer="uniform", seed=11, key_space="mapped", key_seed=seed,
                          mapping_ids=ids, mapping_rows=rows, mapping_hash_from=hash_from)
    assert (info.key_space, info.key_seed, info.mapped_ids, info.mapping_hash_from) == ("mapped", seed, ids.size,
                                                                                        hash_from)
    assert info.map_bytes >= 12 * ids.size
    twin = f"twin{seed}"
    c.create_table(twin, ROWS, DIM, initializer="uniform", seed=11)
    q = queries(rng, ids, 4000)
    want = mapped_rows(q, ids, rows, ROWS, hash_from, seed)
    unlisted = ~np.isin(q, ids)
    assert want[unlisted].min() >= hash_from  # unlisted ids stay in the hashed range
    got, unknown = c.lookup_counted(name, q)
    np.testing.assert_array_equal(got, c.lookup(twin, want))
    assert unknown == 0
    lengths = rng.integers(0, 9, 200).astype(np.int32)
    bag_ids = q[:lengths.sum()]
    twin_pooled = c.lookup_pooled({twin: (mapped_rows(bag_ids, ids, rows, ROWS, hash_from, seed), lengths)})[twin]
    for offload in ("host", "device", "switch"):
        pooled = c.lookup_pooled({name: (bag_ids, lengths)}, offload=offload)[name]
        np.testing.assert_allclose(pooled, twin_pooled, rtol=1e-5, atol=1e-6)


def test_writes_through_ids_that_share_a_row_are_read_through_each_other(daemon):
    _, c = daemon
    ids = np.array([10, 20, 30, -5], np.int64)
    c.create_table("shared", 50, 2, key_space="mapped", mapping_ids=ids, mapping_rows=np.array([3, 3, 4, 49]),
                   mapping_hash_from=40)
    c.write_rows("shared", [10], np.full((1, 2), 7, np.float32))
    np.testing.assert_array_equal(c.lookup("shared", [20, 10, 30]), [[7, 7], [7, 7], [0, 0]])
    other = np.int64(123456789)
    c.write_rows("shared", [other], np.full((1, 2), 2, np.float32), add=True)
    home = mapped_rows([other], ids, [3, 3, 4, 49], 50, 40)[0]
    assert 40 <= home < 50
    probe = np.arange(-10**6, 10**6, 997, dtype=np.int64)
    same = probe[(mapped_rows(probe, ids, [3, 3, 4, 49], 50, 40) == home) & ~np.isin(probe, ids)][:3]
    assert same.size == 3
    np.testing.assert_array_equal(c.lookup("shared", same), np.full((3, 2), 2))


def test_export_returns_the_mapping_as_created_in_pages(daemon):
    d, c = daemon
    rng = np.random.default_rng(4)
    ids, rows = a_mapping(rng, 2500, ROWS, 500)
    c.create_table("exported", ROWS, DIM, key_space="mapped", key_seed=5, mapping_ids=ids, mapping_rows=rows,
                   mapping_hash_from=500)
    for page in (0, 999, 1):
        if page == 1:
            got = c.export_mapping("exported", page_ids=1000)  # three pages: 1000, 1000, 502
        else:
            got = c.export_mapping("exported", page_ids=page)
        np.testing.assert_array_equal(got.ids, ids)
        np.testing.assert_array_equal(got.rows, rows)
        assert (got.num_rows, got.hash_from, got.seed) == (ROWS, 500, 5)
    empty = c.create_table("empty_mapping", 10, 2, key_space="mapped", mapping_hash_from=3)
    assert empty.mapped_ids == 0
    none = c.export_mapping("empty_mapping")
    assert none.ids.size == 0 and none.hash_from == 3
    np.testing.assert_array_equal(c.lookup("empty_mapping", [1, 2]), np.zeros((2, 2)))
    with pytest.raises(EmbtierClientError) as err:
        c.export_mapping("twin0")
    assert err.value.code.name == "FAILED_PRECONDITION" and "'twin0' is dense, not mapped" in err.value.message
    described = run_cli(d.target, "describe", "exported")
    assert described.returncode == 0, described.stderr
    assert f"mapped (seed 5): {ids.size} listed ids" in described.stdout
    assert "any other id hashes into rows [500, 1000)" in described.stdout


@pytest.mark.parametrize("fields, message", [
    ({"mapping_ids": [1, 2, 3, 2], "mapping_rows": [0, 1, 2, 3]}, "mapping_ids[3] = 2 repeats mapping_ids[1]"),
    ({"mapping_ids": [1, 2, 3], "mapping_rows": [0, 100, 200]}, "mapping_rows[1] = 100 is out of range [0, 100)"),
    ({"mapping_ids": [1, 2, 3], "mapping_rows": [0, -1, 5]}, "mapping_rows[1] = -1 is out of range [0, 100)"),
    ({"mapping_ids": [1, 2, 3], "mapping_rows": [0, 1]}, "mapping_ids has 3 ids but mapping_rows has 2 rows"),
    ({"mapping_ids": [1], "mapping_rows": [0], "mapping_hash_from": 100},
     "mapping_hash_from must be in [0, num_rows = 100), got 100"),
    ({"mapping_ids": [1], "mapping_rows": [0], "key_space": "hashed"},
     "mapping_ids and mapping_rows apply to mapped tables only; this one is hashed"),
    ({"mapping_hash_from": 5, "key_space": "dense"}, "mapping_hash_from = 5 applies to mapped tables only"),
])
def test_bad_mappings_are_refused_naming_the_first_bad_position(daemon, fields, message):
    _, c = daemon
    fields = {"key_space": "mapped", **fields}
    with pytest.raises(EmbtierClientError) as err:
        c.create_table("bad_mapping", 100, 2, **fields)
    assert err.value.code.name == "INVALID_ARGUMENT", err.value
    assert message in err.value.message
    assert "bad_mapping" not in [t.name for t in c.tables()]  # nothing was made


def test_mappings_survive_sigkill_checkpoint_and_restore(tmp_path):
    """Created (a CREATE_MAPPED record), written, SIGKILLed: the restart replays the mapping; a
    checkpoint, a drop and a new table of the same name with another mapping, a restore: the first
    mapping and its rows are back, in lookups and in the export."""
    state = tmp_path / "s"
    rng = np.random.default_rng(9)
    ids, rows = a_mapping(rng, 5000, ROWS, 700)
    q = queries(rng, ids, 3000)
    values = rng.standard_normal((q.size, DIM)).astype(np.float32)
    d = start_daemon(state)
    with Client(d.target) as c:
        c.create_table("m", ROWS, DIM, key_space="mapped", key_seed=3, mapping_ids=ids, mapping_rows=rows,
                       mapping_hash_from=700)
        c.write_rows("m", q, values)
        before = c.lookup("m", q)
    d.proc.kill()
    d.proc.wait(timeout=30)
    d = start_daemon(state)
    with Client(d.target) as c:
        np.testing.assert_array_equal(c.lookup("m", q), before)
        first = c.checkpoint("full").id
        c.write_rows("m", q[:10], values[:10] + 1)
        c.checkpoint("incremental")
        c.drop_table("m")
        c.create_table("m", ROWS, DIM, key_space="mapped", mapping_ids=ids[:5], mapping_rows=np.zeros(5, np.int64))
        c.restore(first)
        np.testing.assert_array_equal(c.lookup("m", q), before)
        got = c.export_mapping("m")
        np.testing.assert_array_equal(got.ids, ids)
        np.testing.assert_array_equal(got.rows, rows)
    assert d.stop() == 0, d.log()
    d = start_daemon(state)  # the restore, replayed from the log onto the checkpoints
    with Client(d.target) as c:
        np.testing.assert_array_equal(c.lookup("m", q), before)
        assert c.describe("m").mapped_ids == ids.size
    assert d.stop() == 0, d.log()


def test_recorded_traces_keep_their_bags(daemon, tmp_path):
    d, c = daemon
    c.create_table("traced", 100, 2)
    lengths = np.array([3, 0, 2, 5], np.int32)
    ids = np.arange(10, dtype=np.int64)
    out = tmp_path / "trace.npy"
    recorded = []
    recorder = threading.Thread(target=lambda: recorded.append(
        run_cli(d.target, "record", "traced", "--ids", "14", "--timeout", "60", "-o", str(out))))
    recorder.start()
    deadline = time.monotonic() + 60
    while recorder.is_alive() and time.monotonic() < deadline:  # until the recording has taken 14 ids
        c.lookup_pooled({"traced": (ids, lengths)})
        c.lookup("traced", ids[:4])
    recorder.join(timeout=60)
    assert recorded and recorded[0].returncode == 0, recorded and recorded[0].stderr
    trace, bags = np.load(out), np.load(tmp_path / "trace.bags.npy")
    assert trace.size == 14 and bags.sum() == 14
    # every bag is one a request sent: a pooled request's four bags, or a raw lookup's 4 ids as one
    starts = np.concatenate([[0], np.cumsum(bags)[:-1]])
    for start, n in zip(starts.tolist(), bags.tolist(), strict=True):
        bag = trace[start:start + n]
        assert n in (0, 2, 3, 4, 5) or start + n == 14, bags
        if n:
            assert np.array_equal(bag, np.arange(bag[0], bag[0] + n)), (bag, bags)


def test_rows_trained_offline_are_imported_by_row_and_replayed(tmp_path):
    """by_row writes put values at rows of a mapped or hashed table (what a trainer has), which its ids
    then read; a managed table refuses them; a SIGKILL and restart replays them as rows."""
    state = tmp_path / "s"
    rng = np.random.default_rng(2)
    trained = rng.standard_normal((50, 3)).astype(np.float32)
    ids = np.array([-1, 7, 2**40], np.int64)
    d = start_daemon(state)
    with Client(d.target) as c:
        c.create_table("imp", 50, 3, key_space="mapped", key_seed=1, mapping_ids=ids, mapping_rows=[49, 0, 0],
                       mapping_hash_from=10)
        c.create_table("imp_hashed", 50, 3, key_space="hashed", key_seed=4)
        c.create_table("imp_managed", 50, 3, key_space="managed")
        c.write_rows("imp", np.arange(50), trained, by_row=True)
        c.write_rows("imp_hashed", np.arange(50), trained, by_row=True)
        with pytest.raises(EmbtierClientError) as err:
            c.write_rows("imp_managed", [0], trained[:1], by_row=True)
        assert err.value.code.name == "INVALID_ARGUMENT" and "table 'imp_managed' is managed" in err.value.message
        with pytest.raises(EmbtierClientError) as err:
            c.write_rows("imp", [3, 50], trained[:2], by_row=True)
        assert err.value.code.name == "INVALID_ARGUMENT" and "ids[1] = 50 is out of range [0, 50)" in err.value.message
    d.proc.kill()
    d.proc.wait(timeout=30)
    d = start_daemon(state)
    q = np.concatenate([ids, rng.integers(I64.min, I64.max, 100)])
    with Client(d.target) as c:
        np.testing.assert_array_equal(c.lookup("imp", q), trained[mapped_rows(q, ids, [49, 0, 0], 50, 10, 1)])
        np.testing.assert_array_equal(c.lookup("imp_hashed", q), trained[hashed_rows(q, 50, 4)])
    assert d.stop() == 0, d.log()


def test_the_mapping_workflow_through_the_command_line(daemon, tmp_path):
    """record (ids and bags) -> mapping build (learned) -> create --mapping -> lookups follow the file's
    mapping -> mapping export gives the file's mapping back."""
    from embtier_tools.mapping import Mapping

    d, c = daemon
    c.create_table("source", 4000, 2, key_space="hashed")
    rng = np.random.default_rng(8)
    groups = rng.choice(1 << 40, (20, 30), replace=False).astype(np.int64)  # 20 groups of 30 ids
    out = tmp_path / "trace.npy"
    recorded = []
    recorder = threading.Thread(target=lambda: recorded.append(
        run_cli(d.target, "record", "source", "--ids", "6000", "--timeout", "60", "-o", str(out))))
    recorder.start()
    deadline = time.monotonic() + 60
    while recorder.is_alive() and time.monotonic() < deadline:  # bags of 10 ids of one group each
        picks = groups[rng.integers(0, 20, 50)[:, None], rng.integers(0, 30, (50, 10))].ravel()
        c.lookup_pooled({"source": (picks, np.full(50, 10, np.int32))})
    recorder.join(timeout=60)
    assert recorded and recorded[0].returncode == 0, recorded and recorded[0].stderr
    built = run_cli(d.target, "mapping", "build", "--trace", str(out), "--kind", "learned", "--rows", "100",
                    "--frequent-share", "0.2", "-o", str(tmp_path / "m.npz"))
    assert built.returncode == 0, built.stderr
    m = Mapping.load(tmp_path / "m.npz")
    seen = np.unique(np.load(out))  # (6000 draws of 600 ids: now and then one is never drawn)
    assert np.array_equal(np.sort(m.ids), seen) and m.hash_from == 20  # every id seen listed; 20 own a row
    made = run_cli(d.target, "create", "learned", "--rows", "100", "--dim", "2", "--init", "uniform",
                   "--mapping", str(tmp_path / "m.npz"))
    assert made.returncode == 0, made.stderr
    c.create_table("learned_twin", 100, 2, initializer="uniform")
    q = np.concatenate([groups.ravel(), rng.integers(I64.min, I64.max, 50)])
    np.testing.assert_array_equal(c.lookup("learned", q), c.lookup("learned_twin", m.rows_of(q)))
    exported = run_cli(d.target, "mapping", "export", "learned", "-o", str(tmp_path / "e.npz"))
    assert exported.returncode == 0, exported.stderr
    e = Mapping.load(tmp_path / "e.npz")
    np.testing.assert_array_equal(e.ids, m.ids)
    np.testing.assert_array_equal(e.rows, m.rows)
    assert (e.num_rows, e.hash_from, e.seed) == (m.num_rows, m.hash_from, m.seed)
    wrong = run_cli(d.target, "create", "wrong", "--rows", "99", "--dim", "2", "--mapping", str(tmp_path / "m.npz"))
    assert wrong.returncode != 0 and "maps onto 100 rows, not --rows 99" in wrong.stderr
    # a trace of the mapped table carries its mapping, which `embtier simulate` maps the ids with
    second = tmp_path / "mapped_trace.npy"
    recorded.clear()
    recorder = threading.Thread(target=lambda: recorded.append(
        run_cli(d.target, "record", "learned", "--ids", "2000", "--timeout", "60", "-o", str(second))))
    recorder.start()
    deadline = time.monotonic() + 60
    while recorder.is_alive() and time.monotonic() < deadline:
        c.lookup("learned", q)
    recorder.join(timeout=60)
    assert recorded and recorded[0].returncode == 0, recorded and recorded[0].stderr
    kept = Mapping.load(tmp_path / "mapped_trace.mapping.npz")
    np.testing.assert_array_equal(kept.rows_of(q), m.rows_of(q))
    simulated = subprocess.run([sys.executable, "-m", "embtier.cli", "simulate", str(second), "--ids-per-interval",
                                "500", "--dram", "1K"], capture_output=True, text=True, timeout=120, check=False)
    assert simulated.returncode == 0, simulated.stderr
    assert "2000 ids over 100 rows" in simulated.stdout, simulated.stdout


def test_a_new_table_takes_the_mapping_of_another(daemon):
    d, c = daemon
    ids, rows = np.array([3, 1, 2], np.int64), np.array([0, 0, 5], np.int64)
    c.create_table("v1", 20, 2, key_space="mapped", key_seed=9, mapping_ids=ids, mapping_rows=rows,
                   mapping_hash_from=6)
    made = run_cli(d.target, "create", "v2", "--rows", "30", "--dim", "2", "--mapping-from", "v1")
    assert made.returncode == 0, made.stderr
    info = c.describe("v2")
    assert (info.key_space, info.key_seed, info.mapping_hash_from, info.mapped_ids) == ("mapped", 9, 6, 3)
    got = c.export_mapping("v2")
    np.testing.assert_array_equal(got.ids, ids)
    np.testing.assert_array_equal(got.rows, rows)
    c.write_rows("v2", np.arange(30), np.arange(60, dtype=np.float32).reshape(30, 2), by_row=True)
    c.create_table("plain", 5, 2)
    q = np.array([3, 1, 2, 10**12, -4], np.int64)
    np.testing.assert_array_equal(c.lookup("v2", q)[:, 0], 2 * mapped_rows(q, ids, rows, 30, 6, 9))
    for fields, code, message in [
            ({"mapping_from": "v1"}, "INVALID_ARGUMENT", "mapping_from = 'v1' makes a mapped table; key_space is dense"),
            ({"key_space": "mapped", "mapping_from": "plain"}, "INVALID_ARGUMENT", "'plain' is a dense table"),
            ({"key_space": "mapped", "mapping_from": "nope"}, "NOT_FOUND", "nope"),
            ({"key_space": "mapped", "mapping_from": "v1", "key_seed": 3}, "INVALID_ARGUMENT",
             "key_seed = 3 differs from the 9 of table 'v1'"),
            ({"key_space": "mapped", "mapping_from": "v1", "mapping_ids": [1], "mapping_rows": [0]}, "INVALID_ARGUMENT",
             "not both")]:
        with pytest.raises(EmbtierClientError) as err:
            c.create_table("v3", 30, 2, **fields)
        assert err.value.code.name == code and message in err.value.message, err.value
