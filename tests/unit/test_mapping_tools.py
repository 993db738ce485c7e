"""The mapping tools of MAPPED tables (embtier_tools.mapping and `embtier mapping`): frequent ids in
rows of their own, every other id hashed as embtier.keys says, learned mappings that put co-accessed
ids together, collision statistics, the mapping file, traces and the command line."""

from __future__ import annotations

import re
from collections import Counter
from types import SimpleNamespace

import numpy as np
import pytest
from embtier import cli
from embtier.keys import hashed_rows
from embtier_tools import mapping
from embtier_tools.mapping import Mapping, Trace

I64 = np.iinfo(np.int64)


def python_frequency(ids: list[int], num_rows: int, share: float) -> tuple[list[int], int]:
    """The frequent ids (most frequent first, ties by id) and F, in plain Python."""
    counts = Counter(ids)
    f = min(round(share * num_rows), len(counts))
    return [i for i, _ in sorted(counts.items(), key=lambda kv: (-kv[1], kv[0]))[:f]], f


def planted(groups: int, group_size: int, bags: int, bag_len: int, seed: int = 0) -> tuple[Trace, dict[int, int]]:
    """ids in groups (each id's group at random), each bag drawing bag_len ids uniformly from one group
    drawn uniformly; the trace and the id -> group dict."""
    rng = np.random.default_rng(seed)
    ids = rng.choice(1 << 40, groups * group_size, replace=False).astype(np.int64) - (1 << 39)
    members = ids.reshape(groups, group_size)
    bag_groups = rng.integers(0, groups, bags)
    trace = members[bag_groups[:, None], rng.integers(0, group_size, (bags, bag_len))].ravel()
    return Trace(trace, np.full(bags, bag_len, np.int32)), {int(i): g for g, row in enumerate(members) for i in row}


@pytest.fixture(scope="module")
def groups_trace() -> tuple[Trace, dict[int, int]]:
    return planted(groups=50, group_size=20, bags=4000, bag_len=8)


# ---- frequency --------------------------------------------------------------------------------------

def test_the_most_frequent_ids_get_rows_of_their_own_ties_by_id():
    # counts: 9 x3, 5 x3, 2 x2, 7 x2, 1 x1, 3 x1; F = round(0.375 x 8) = 3: 5 and 9 (tie: 5 first), then 2 (not 7)
    trace = Trace([9, 7, 5, 9, 2, 5, 1, 7, 9, 3, 2, 5])
    built = mapping.build_frequency(trace, num_rows=8, frequent_share=0.375, seed=4)
    assert built.ids.tolist() == [5, 9, 2] and built.rows.tolist() == [0, 1, 2]
    assert (built.hash_from, built.num_rows, built.seed, built.kind) == (3, 8, 4, "frequency")
    others = np.array([7, 1, 3, -12, I64.max])                 # seen but not frequent, and never seen
    assert built.rows_of(others).tolist() == (3 + hashed_rows(others, 5, 4)).tolist()
    assert built.rows_of([5, 9, 2]).tolist() == [0, 1, 2]


@pytest.mark.parametrize("span", [1 << 10, 1 << 40, None], ids=["small ids", "wide ids", "any int64"])
def test_frequency_matches_a_python_model(span):
    rng = np.random.default_rng(7)
    pool = (rng.integers(-span, span, 300) if span else rng.integers(I64.min, I64.max, 300, endpoint=True))
    ids = pool[rng.zipf(1.3, 5000) % pool.size]
    built = mapping.build_frequency(Trace(ids), num_rows=200, frequent_share=0.3)
    frequent, f = python_frequency(ids.tolist(), 200, 0.3)
    assert built.ids.tolist() == frequent and built.rows.tolist() == list(range(f)) and built.hash_from == f == 60


def test_frequency_lists_every_id_when_there_are_fewer_than_f():
    built = mapping.build_frequency(Trace([4, 4, 8]), num_rows=10)
    assert built.ids.tolist() == [4, 8] and built.hash_from == 2


@pytest.mark.parametrize("span", [1 << 10, 1 << 40, None], ids=["small ids", "wide ids", "any int64"])
def test_accesses_grouped_by_id_are_numpys_stable_sort(span):
    rng = np.random.default_rng(5)
    pool = rng.integers(-span, span, 500) if span else rng.integers(I64.min, I64.max, 500, endpoint=True)
    ids = pool[rng.integers(0, 500, 20_000)]
    grouped = mapping._by_id(ids)
    distinct, inverse, counts = np.unique(ids, return_inverse=True, return_counts=True)
    assert grouped.distinct.tolist() == distinct.tolist() and grouped.counts.tolist() == counts.tolist()
    assert grouped.order.tolist() == np.argsort(ids, kind="stable").tolist()
    assert grouped.index.tolist() == inverse.tolist()
    assert grouped.starts.tolist() == (np.cumsum(counts) - counts).tolist()


@pytest.mark.parametrize("share", [1.0, -0.1, 0.96])
def test_frequency_must_leave_a_row_to_hash_into(share):
    with pytest.raises(ValueError, match="frequent_share"):
        mapping.build_frequency(Trace(np.arange(100)), num_rows=10, frequent_share=share)


def test_hash_lists_nothing_and_hashes_every_id():
    built = mapping.build_hash(Trace([1, 2, 3]), num_rows=1000, seed=9)
    ids = np.array([1, 2, 3, -5, I64.min])
    assert built.ids.size == 0 and built.hash_from == 0
    assert built.rows_of(ids).tolist() == hashed_rows(ids, 1000, 9).tolist()


# ---- learned -------------------------------------------------------------------------------------

def same_group_share(built: Mapping, trace: Trace, groups: dict[int, int]) -> tuple[float, float]:
    """Share of the colliding pairs of seen ids that are of one group, and its chance level: for
    groups of sizes g_k among N ids, sum g_k (g_k - 1) / (N (N - 1)) -- here 50 x 20 x 19 / (1000 x 999)
    = 0.019.  Counted pair by pair in Python."""
    seen = sorted(set(trace.ids.tolist()))
    by_row: dict[int, list[int]] = {}
    for i, row in zip(seen, built.rows_of(seen).tolist()):
        by_row.setdefault(row, []).append(groups[i])
    pairs = same = 0
    for labels in by_row.values():
        for a in range(len(labels)):
            for b in range(a + 1, len(labels)):
                pairs += 1
                same += labels[a] == labels[b]
    sizes = Counter(groups[i] for i in seen).values()
    return same / pairs, sum(g * (g - 1) for g in sizes) / (len(seen) * (len(seen) - 1))


def test_learned_puts_co_accessed_ids_together_and_hash_does_not(groups_trace):
    trace, groups = groups_trace
    learned = mapping.build_learned(trace, num_rows=100, frequent_share=0.2, seed=3)
    hashed = mapping.build_hash(trace, num_rows=100, seed=3)
    learned_share, chance = same_group_share(learned, trace, groups)
    hash_share, _ = same_group_share(hashed, trace, groups)
    assert chance == pytest.approx(50 * 20 * 19 / (1000 * 999))
    # hash: about 4500 colliding pairs, each within a group with probability = chance (sd about 0.002)
    assert abs(hash_share - chance) < 0.01
    assert learned_share > 20 * chance
    s = mapping.stats(learned, trace, groups)
    assert s.same_group_share == pytest.approx(learned_share) and s.chance_same_group_share == pytest.approx(chance)


def test_learned_lists_frequent_ids_first_and_clusters_the_rest_into_the_hashed_range(groups_trace):
    trace, _ = groups_trace
    learned = mapping.build_learned(trace, num_rows=100, frequent_share=0.2, seed=3)
    frequent = mapping.build_frequency(trace, num_rows=100, frequent_share=0.2, seed=3)
    learned.check()
    f = frequent.hash_from
    assert learned.kind == "learned" and learned.hash_from == f == 20 and learned.seed == 3
    assert learned.ids[:f].tolist() == frequent.ids.tolist() and learned.rows[:f].tolist() == list(range(f))
    seen = np.unique(trace.ids)
    assert sorted(learned.ids.tolist()) == seen.tolist()                  # every seen id is listed
    rest = learned.rows[f:]
    assert rest.min() >= f and rest.max() < 100
    per_row = np.bincount(rest - f)                                       # 980 ids in 80 rows: 12 or 13 each
    assert per_row.min() >= 12 and per_row.max() <= 13
    unseen = np.array([I64.max, 0, -1])
    assert learned.rows_of(unseen).tolist() == (f + hashed_rows(unseen, 80, 3)).tolist()


def test_learned_hashes_ids_seen_fewer_than_min_accesses_times():
    trace = Trace([1, 2, 3, 4, 1, 2, 5, 6, 1, 2, 5, 6], [4, 4, 4])    # seen once: 3 and 4
    built = mapping.build_learned(trace, num_rows=6, frequent_share=1 / 6, min_accesses=2)
    assert built.ids.tolist()[0] == 1 and sorted(built.ids.tolist()[1:]) == [2, 5, 6]


def test_learned_needs_bags_or_vectors():
    with pytest.raises(ValueError, match="no bags"):
        mapping.build_learned(Trace([1, 2, 3]), num_rows=10)


def test_learned_by_given_vectors_groups_ids_with_equal_vectors(monkeypatch):
    ids = np.arange(101, 401, dtype=np.int64)
    trace = Trace(np.concatenate([[100] * 50, ids]))          # id 100 is the frequent one
    centres = np.random.default_rng(1).standard_normal((30, 6))

    def group(of: np.ndarray) -> np.ndarray:                  # 30 groups of 10 ids, scattered over the ids
        return (of * 7) % 30

    asked = []

    def vectors(chunk):
        asked.append(chunk.copy())
        return centres[group(chunk)]

    monkeypatch.setattr(mapping, "VECTOR_CHUNK_IDS", 64)
    by_array = mapping.build_learned(trace, num_rows=31, frequent_share=1 / 31,
                                     vectors=centres[group(np.unique(trace.ids))])
    by_call = mapping.build_learned(trace, num_rows=31, frequent_share=1 / 31, vectors=vectors)
    assert [c.size for c in asked] == [64, 64, 64, 64, 44] and np.concatenate(asked).tolist() == ids.tolist()
    for built in (by_array, by_call):
        assert built.ids[0] == 100 and built.rows[0] == 0
        rows = built.rows_of(ids)
        assert all(np.unique(rows[group(ids) == g]).size == 1 for g in range(30))   # a row per group
        assert np.unique(rows).size == 30


def test_learned_rejects_vectors_of_the_wrong_shape():
    with pytest.raises(ValueError, match=r"vectors: expected an array \[3 distinct ids, dim\]"):
        mapping.build_learned(Trace([1, 2, 3]), num_rows=10, frequent_share=0.0, vectors=np.zeros((4, 2)))


def test_learned_gives_one_id_per_row_when_rows_are_plenty():
    trace = Trace(np.arange(10), [5, 5])
    built = mapping.build_learned(trace, num_rows=40, frequent_share=0.0)
    assert np.unique(built.rows).size == 10 and built.hash_from == 0


# ---- statistics ----------------------------------------------------------------------------------

def test_stats_on_a_hand_made_mapping():
    # rows: 0 <- 10 (x3), 11 (x1); 1 <- 12 (x2); 2 <- 13 (x1), 14 (x4)
    built = Mapping([10, 11, 12, 13, 14], [0, 0, 1, 2, 2], num_rows=4, hash_from=3)
    trace = Trace([10, 14, 10, 12, 14, 11, 14, 13, 10, 12, 14])
    groups = {10: 0, 11: 0, 13: 0, 12: 1, 14: 1, 99: 2}
    s = mapping.stats(built, trace, groups)
    assert (s.accesses, s.distinct_ids, s.rows_used, s.shared_rows, s.colliding_pairs) == (11, 5, 3, 2, 2)
    assert s.shared_access_share == pytest.approx(9 / 11)
    assert (s.busiest_row, s.busiest_row_ids, s.busiest_row_accesses) == (2, 2, 5)
    assert (s.grouped_ids, s.mixed_rows, s.grouped_pairs) == (5, 1, 2)
    assert s.same_group_share == pytest.approx(1 / 2)
    assert s.chance_same_group_share == pytest.approx((3 * 2 + 2 * 1) / (5 * 4))   # groups of 3 and 2
    as_arrays = mapping.stats(built, trace, (np.array(list(groups)), np.array(list(groups.values()))))
    assert as_arrays == s
    text = mapping.format_stats(s)
    assert "81.8%" in text and "row: 2 (2 ids, 5 accesses)" in text and "50.00% are within a group" in text


def test_stats_without_groups_leaves_the_group_figures_out():
    s = mapping.stats(Mapping([], [], 4), Trace([1, 2, 3]))
    assert s.grouped_ids is None and "groups" not in mapping.format_stats(s)


@pytest.mark.parametrize("groups, message", [
    ((np.array([1, 2, 1]), np.array([0, 1, 2])), "id 1 is listed twice"),
    ({1: 0, 2: -3}, "group -3 is negative"),
    ((np.array([1, 2]), np.array([0])), "2 ids but 1 groups"),
])
def test_stats_refuses_groups_that_do_not_say_one_group_per_id(groups, message):
    with pytest.raises(ValueError, match=message):
        mapping.stats(Mapping([], [], 4), Trace([1, 2]), groups)


# ---- the mapping file -----------------------------------------------------------------------------

def test_mapping_file_round_trip(tmp_path):
    built = Mapping([5, -3, I64.max], [2, 0, 1], num_rows=7, hash_from=3, seed=(1 << 64) - 1, kind="learned")
    path = tmp_path / "m.npz"
    built.save(path)
    with np.load(path) as data:
        assert sorted(data.files) == sorted(mapping.FILE_ARRAYS)
        assert data["ids"].dtype == np.int64 and data["seed"].dtype == np.uint64 and str(data["kind"]) == "learned"
    loaded = Mapping.load(path)
    assert loaded.ids.tolist() == built.ids.tolist() and loaded.rows.tolist() == built.rows.tolist()
    assert (loaded.num_rows, loaded.hash_from, loaded.seed, loaded.kind) == (7, 3, (1 << 64) - 1, "learned")
    probe = np.array([5, -3, 0, 1, 2])
    assert loaded.rows_of(probe).tolist() == built.rows_of(probe).tolist()


@pytest.mark.parametrize("ids, rows, num_rows, hash_from, message", [
    ([1, 2, 3], [0, 1], 5, 0, r"ids\[2\] = 3 has no row"),
    ([1, 2], [0, 1, 4], 5, 0, r"rows\[2\] = 4 has no id"),
    ([1, 2, 3], [0, 5, -1], 5, 0, r"rows\[1\] = 5 \(of ids\[1\] = 2\) is not in \[0, num_rows = 5\)"),
    ([1, 2, 42, 4, 5, 6, 7, 42], [0] * 8, 5, 0, r"ids\[7\] = 42 repeats ids\[2\]"),
    ([8, 9, 9, 8], [0] * 4, 5, 0, r"ids\[2\] = 9 repeats ids\[1\]"),      # the first bad position, not value
    ([1], [0], 5, 5, r"hash_from = 5 is not in \[0, num_rows = 5\)"),
    ([1], [0], 5, -1, r"hash_from = -1"),
    ([1], [0], 0, 0, r"num_rows = 0"),
], ids=["ids longer", "rows longer", "row out of range", "duplicate id", "duplicates out of order",
        "hash_from too big", "hash_from negative", "no rows"])
def test_check_names_the_first_bad_position(tmp_path, ids, rows, num_rows, hash_from, message):
    bad = Mapping(ids, rows, num_rows, hash_from)
    with pytest.raises(ValueError, match=message):
        bad.check()
    with pytest.raises(ValueError, match=message):
        bad.save(tmp_path / "bad.npz")
    assert not (tmp_path / "bad.npz").exists()


def test_load_says_what_is_wrong_with_the_file(tmp_path):
    path = tmp_path / "m.npz"
    np.savez(path, ids=np.array([1, 1]), rows=np.array([0, 0]), num_rows=4, hash_from=0, seed=0, kind="x")
    with pytest.raises(ValueError, match=rf"{re.escape(str(path))}: ids\[1\] = 1 repeats ids\[0\]"):
        Mapping.load(path)
    np.savez(path, ids=np.array([1]), rows=np.array([0]), num_rows=4, hash_from=0)
    with pytest.raises(ValueError, match="no seed, kind"):
        Mapping.load(path)
    np.savez(path, ids=np.array([1.5]), rows=np.array([0]), num_rows=4, hash_from=0, seed=0, kind="x")
    with pytest.raises(ValueError, match="ids: expected a 1-D array of integers, got float64"):
        Mapping.load(path)


# ---- traces ----------------------------------------------------------------------------------------

def test_load_trace_reads_the_bags_beside_it(tmp_path):
    np.save(tmp_path / "t.npy", np.array([3, 1, 3, 2], dtype=np.uint32))
    assert mapping.load_trace(tmp_path / "t.npy").lengths is None
    np.save(tmp_path / "t.bags.npy", np.array([1, 3], dtype=np.int32))
    trace = mapping.load_trace(tmp_path / "t.npy")
    assert trace.ids.dtype == np.int64 and trace.ids.tolist() == [3, 1, 3, 2] and trace.lengths.tolist() == [1, 3]


@pytest.mark.parametrize("ids, lengths, at_fault, message", [
    (np.array([1.0, 2.0]), None, "t.npy", "ids: expected a 1-D array of integers, got float64"),
    (np.zeros((2, 2), np.int64), None, "t.npy", r"shape \(2, 2\)"),
    (np.arange(4), np.array([1, 2], np.int32), "t.bags.npy", "the bags' lengths sum to 3, the trace has 4 ids"),
    (np.arange(4), np.array([5, -1], np.int32), "t.bags.npy", r"lengths\[1\] = -1 is negative"),
    (np.arange(4), np.array([2.0, 2.0]), "t.bags.npy", "lengths: expected a 1-D array of integers"),
], ids=["float ids", "2-D ids", "lengths short", "negative length", "float lengths"])
def test_load_trace_names_the_file_at_fault(tmp_path, ids, lengths, at_fault, message):
    np.save(tmp_path / "t.npy", ids)
    if lengths is not None:
        np.save(tmp_path / "t.bags.npy", lengths)
    with pytest.raises(ValueError, match=rf"{re.escape(str(tmp_path / at_fault))}: .*{message}"):
        mapping.load_trace(tmp_path / "t.npy")


def test_load_trace_of_a_file_that_is_not_npy(tmp_path):
    (tmp_path / "t.npy").write_text("ids\n")
    with pytest.raises(ValueError, match="cannot read it as a .npy array"):
        mapping.load_trace(tmp_path / "t.npy")


# ---- the command line ------------------------------------------------------------------------------

@pytest.fixture
def trace_files(tmp_path, groups_trace):
    trace, groups = groups_trace
    np.save(tmp_path / "trace.npy", trace.ids)
    np.save(tmp_path / "trace.bags.npy", trace.lengths)
    np.savez(tmp_path / "groups.npz", ids=np.array(list(groups)), groups=np.array(list(groups.values())))
    return tmp_path


def test_cli_build_and_stats(trace_files, capsys, groups_trace):
    out = trace_files / "m.npz"
    assert cli.main(["mapping", "build", "--trace", str(trace_files / "trace.npy"), "--kind", "learned",
                     "--rows", "100", "--frequent-share", "0.2", "--seed", "3", "-o", str(out)]) == 0
    built = Mapping.load(out)
    direct = mapping.build_learned(groups_trace[0], 100, frequent_share=0.2, seed=3)
    assert built.kind == "learned" and built.ids.tolist() == direct.ids.tolist()
    assert built.rows.tolist() == direct.rows.tolist()
    printed = capsys.readouterr()
    assert "1000 ids listed" in printed.out and "[20, 100)" in printed.out
    assert "clustering" in printed.err and "embedding co-access" in printed.err     # the progress bars
    assert cli.main(["mapping", "stats", "--trace", str(trace_files / "trace.npy"), "--mapping", str(out),
                     "--groups", str(trace_files / "groups.npz")]) == 0
    printed = capsys.readouterr().out
    s = mapping.stats(direct, groups_trace[0], groups_trace[1])
    assert mapping.format_stats(s) in printed and "learned mapping, 1000 ids listed" in printed


def test_cli_build_frequency_is_build_frequency(trace_files, groups_trace):
    out = trace_files / "f.npz"
    assert cli.main(["mapping", "build", "--trace", str(trace_files / "trace.npy"), "--kind", "frequency",
                     "--rows", "100", "-o", str(out)]) == 0
    direct = mapping.build_frequency(groups_trace[0], 100)
    assert Mapping.load(out).ids.tolist() == direct.ids.tolist() and Mapping.load(out).hash_from == 50


@pytest.mark.parametrize("extra, message", [
    (["--kind", "frequency", "--from-table", "t"], "--from-table gives learned its vectors"),
    (["--kind", "hash", "--frequent-share", "0.3"], "--frequent-share is for"),
    (["--kind", "frequency", "--frequent-share", "1"], "frequent_share must be in"),
])
def test_cli_build_refuses_what_does_not_fit(trace_files, extra, message):
    with pytest.raises(SystemExit, match=message):
        cli.main(["mapping", "build", "--trace", str(trace_files / "trace.npy"), "--rows", "100",
                  "-o", str(trace_files / "x.npz"), *extra])


class FakeClient:
    """The two calls the mapping commands make of a daemon."""

    def __init__(self, rows: dict[int, np.ndarray]):
        self.rows = rows
        self.looked_up: list[int] = []

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False

    def lookup(self, table, ids):
        assert table == "old"
        self.looked_up += ids.tolist()
        return np.stack([self.rows[i] for i in ids.tolist()])

    def export_mapping(self, table):
        return SimpleNamespace(table=table, ids=np.array([7, 3]), rows=np.array([1, 0]), num_rows=9, hash_from=2,
                               seed=5)


def test_cli_build_from_a_table_reads_the_rows_of_the_ids_to_embed(trace_files, groups_trace, monkeypatch):
    trace, groups = groups_trace
    centres = np.random.default_rng(2).standard_normal((50, 4)).astype(np.float32)
    fake = FakeClient({i: centres[g] for i, g in groups.items()})
    monkeypatch.setattr(cli, "connect", lambda args: fake)
    out = trace_files / "t.npz"
    assert cli.main(["mapping", "build", "--trace", str(trace_files / "trace.npy"), "--kind", "learned",
                     "--rows", "100", "--frequent-share", "0.2", "--from-table", "old", "-o", str(out)]) == 0
    built = Mapping.load(out)
    assert sorted(fake.looked_up) == sorted(built.ids[20:].tolist())         # the frequent ids need no vector
    share, chance = same_group_share(built, trace, groups)
    assert share > 0.5 > 20 * chance


def test_cli_export_saves_the_tables_mapping(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(cli, "connect", lambda args: FakeClient({}))
    out = tmp_path / "e.npz"
    assert cli.main(["mapping", "export", "t", "-o", str(out)]) == 0
    exported = Mapping.load(out)
    assert exported.ids.tolist() == [7, 3] and exported.rows.tolist() == [1, 0]
    assert (exported.num_rows, exported.hash_from, exported.seed, exported.kind) == (9, 2, 5, "exported")
    assert "2 ids listed" in capsys.readouterr().out

