"""Keyed tables end to end: a real daemon serving raw int64 ids over gRPC.

Managed tables against a dict model (assign and add, lookups, pooled lookups in every offload
mode, evictions, the full table's refusal), hashed tables against the client library's hash,
concurrent writers, readers and the mover, a checkpoint, a restore and a SIGKILL of a managed
table's map, and the CLI."""

from __future__ import annotations

import re
import threading
import time
import urllib.request

import numpy as np
import pytest
from embtier import Client, EmbtierClientError
from embtier.keys import hashed_rows
from prometheus_client.parser import text_string_to_metric_families

from tests.support import run_cli, running_daemon, start_daemon

I64 = np.iinfo(np.int64)
EPOCH = 0.05  # the tiering interval of these daemons: a managed id is protected for one or two of them
CONFIG = f"[tiering]\nenabled = false\ninterval_seconds = {EPOCH}\n"


@pytest.fixture(scope="module")
def keyed(tmp_path_factory):
    """A daemon whose managed tables protect ids for 50-100 ms (tiering off: rows stay put)."""
    with running_daemon(tmp_path_factory.mktemp("keyed"), CONFIG) as d, Client(d.target) as c:
        yield d, c


def raw_ids(rng: np.random.Generator, n: int) -> np.ndarray:
    """n distinct ids from the whole int64 range, its two ends among them now and then."""
    ids = rng.integers(I64.min, I64.max, n, dtype=np.int64, endpoint=True)
    if n >= 2 and rng.random() < 0.3:
        ids[:2] = I64.min, I64.max
    return np.unique(ids)


class ManagedModel:
    """What a managed table must hold: id -> row, and the default row unknown ids read."""

    def __init__(self, capacity: int, dim: int, default: float):
        self.capacity, self.dim = capacity, dim
        self.default = np.full(dim, default, np.float32)
        self.rows: dict[int, np.ndarray] = {}

    def write(self, ids: np.ndarray, values: np.ndarray, add: bool, scale: float) -> None:
        for i, v in zip(ids.tolist(), values, strict=True):
            base = self.rows.get(i, self.default)
            self.rows[i] = (base + np.float32(scale) * v).astype(np.float32) if add else v.copy()

    def lookup(self, ids: np.ndarray) -> tuple[np.ndarray, int]:
        rows = np.array([self.rows.get(i, self.default) for i in ids.tolist()], np.float32).reshape(-1, self.dim)
        return rows, sum(i not in self.rows for i in ids.tolist())


def reconcile(c: Client, table: str, model: ManagedModel, written_now: set[int]) -> int:
    """Looks up every id the model holds; those that read the default row were evicted: they leave the
    model.  Returns how many; none of written_now may be among them, and every other id must read
    exactly its model row."""
    ids = np.array(sorted(model.rows), dtype=np.int64)
    if not ids.size:
        return 0
    got, unknown = c.lookup_counted(table, ids)
    want, _ = model.lookup(ids)
    gone = np.flatnonzero((got == model.default).all(axis=1) & (want != model.default).any(axis=1))
    assert unknown == gone.size, f"{unknown} ids counted unknown, {gone.size} read the default row"
    keep = np.setdiff1d(np.arange(ids.size), gone)
    np.testing.assert_allclose(got[keep], want[keep], rtol=1e-6, atol=1e-6)
    evicted = set(ids[gone].tolist())
    assert not evicted & written_now, "an id written by the last write was evicted"
    for i in evicted:
        del model.rows[i]
    return len(evicted)


def test_managed_table_equals_a_dict_model_through_writes_lookups_and_evictions(keyed):
    _, c = keyed
    capacity, dim, default = 48, 4, 0.25
    info = c.create_table("managed", capacity, dim, key_space="managed", default_value=default)
    assert (info.key_space, info.live_ids, info.default_value) == ("managed", 0, default)
    model, rng = ManagedModel(capacity, dim, default), np.random.default_rng(11)
    seen: list[int] = []
    evictions = 0
    for step in range(60):
        time.sleep(2.5 * EPOCH)  # the last step's ids are no longer protected
        known = np.array(sorted(model.rows), dtype=np.int64)
        new = raw_ids(rng, int(rng.integers(1, 20)))
        old = rng.choice(known, min(known.size, int(rng.integers(0, 10))), replace=False) if known.size else known
        ids = rng.permutation(np.concatenate([new, old, new[:2]]))  # duplicates: the last assign wins
        values = rng.standard_normal((ids.size, dim)).astype(np.float32)
        add, scale = bool(rng.random() < 0.4), float(rng.choice([1.0, 0.5, -2.0]))
        before = c.describe("managed")
        fresh = len(set(ids.tolist()) - set(model.rows))
        c.write_rows("managed", ids, values, add=add, scale=scale)
        model.write(ids, values, add, scale)
        evicted = reconcile(c, "managed", model, set(ids.tolist()))
        after = c.describe("managed")
        # a new id takes a free row first; only once the table is full does it evict
        assert evicted == after.key_evictions - before.key_evictions == max(0, fresh - (capacity - before.live_ids))
        assert after.live_ids == len(model.rows) <= capacity
        evictions += evicted
        seen.extend(ids.tolist())
        # lookups of a mix of live, evicted and never-written ids, raw and pooled in every offload mode
        probe = np.concatenate([rng.choice(np.array(seen, np.int64), 30), raw_ids(rng, 5)])
        got, unknown = c.lookup_counted("managed", probe)
        want, want_unknown = model.lookup(probe)
        np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-6)
        assert unknown == want_unknown, f"step {step}"
        lengths = np.array([0, 5, 1, probe.size - 6], np.int32)
        weights = rng.uniform(0, 2, probe.size).astype(np.float32)
        offload = ("switch", "host", "device")[step % 3]
        for mode in ("sum", "mean", "max"):
            pooled, _, counted = c.lookup_pooled_counted({"managed": (probe, lengths, weights)}, mode=mode,
                                                         offload=offload)
            assert counted == {"managed": want_unknown}
            np.testing.assert_allclose(pooled["managed"], pool(want, lengths, weights, mode), rtol=1e-5, atol=1e-5)
    assert evictions > 50  # the table was full most of the time
    assert c.describe("managed").unknown_ids > 0


def pool(rows: np.ndarray, lengths: np.ndarray, weights: np.ndarray, mode: str) -> np.ndarray:
    out, start = np.zeros((lengths.size, rows.shape[1])), 0
    for b, n in enumerate(lengths):
        picked = rows[start:start + n].astype(np.float64) * weights[start:start + n, None]
        if n:
            out[b] = picked.max(0) if mode == "max" else picked.sum(0) / (n if mode == "mean" else 1)
        start += n
    return out


def test_a_bag_of_only_unknown_ids_pools_default_rows_and_lookups_never_insert(keyed):
    _, c = keyed
    c.create_table("empty_managed", 10, 3, key_space="managed", default_value=-1.5)
    ids = np.array([I64.min, 5, I64.max], np.int64)
    pooled, _, unknown = c.lookup_pooled_counted({"empty_managed": (ids, np.array([3], np.int32))}, mode="sum")
    np.testing.assert_array_equal(pooled["empty_managed"], [[-4.5] * 3])
    assert unknown == {"empty_managed": 3}
    rows, unknown = c.lookup_counted("empty_managed", ids)
    np.testing.assert_array_equal(rows, np.full((3, 3), -1.5))
    info = c.describe("empty_managed")
    assert (info.live_ids, info.unknown_ids) == (0, 6)


def test_a_full_table_whose_ids_are_all_protected_refuses_new_ids_and_applies_nothing(tmp_path):
    """Protection lasts one or two tiering intervals: a long one here, so the refusal is certain."""
    with running_daemon(tmp_path, "[tiering]\nenabled = false\ninterval_seconds = 600\n") as d, \
            Client(d.target) as c:
        c.create_table("full", 8, 2, key_space="managed")
        ids = np.arange(-4, 4, dtype=np.int64) * 10**17
        c.write_rows("full", ids, np.ones((8, 2), np.float32))
        version = c.describe("full").version
        with pytest.raises(EmbtierClientError) as err:
            c.write_rows("full", [ids[0], 77, 78], np.full((3, 2), 5, np.float32))
        assert err.value.code.name == "RESOURCE_EXHAUSTED"
        assert re.search(r"table 'full' has no row for ids\[1\] = 77: all 8 rows of its capacity", err.value.message)
        rows, unknown = c.lookup_counted("full", np.concatenate([ids, [77, 78]]))
        np.testing.assert_array_equal(rows[:8], np.ones((8, 2)))  # ids[0] kept its value: nothing applied
        assert unknown == 2 and c.describe("full").version == version
        c.write_rows("full", ids[:3], np.full((3, 2), 2, np.float32))  # live ids are still written
        np.testing.assert_array_equal(c.lookup("full", ids[:3]), np.full((3, 2), 2))


@pytest.mark.parametrize("seed", [0, 1, 2**64 - 1])
def test_hashed_rows_are_the_client_librarys_hash(keyed, seed):
    """A hashed table and a dense one of the same initial values: hashed[id] == dense[hashed_rows(id)]."""
    _, c = keyed
    rows = 1009
    c.create_table(f"hashed{seed}", rows, 4, initializer="uniform", seed=3, key_space="hashed", key_seed=seed)
    if seed == 0:
        c.create_table("dense_twin", rows, 4, initializer="uniform", seed=3)
    rng = np.random.default_rng(seed % 1000)
    ids = np.concatenate([[I64.min, I64.max, -1, 0, 1], rng.integers(I64.min, I64.max, 5000, dtype=np.int64)])
    np.testing.assert_array_equal(c.lookup(f"hashed{seed}", ids), c.lookup("dense_twin", hashed_rows(ids, rows, seed)))
    # ids that hash to one row share it: a write through one is read through the other
    home = hashed_rows(ids, rows, seed)
    first, second = next((i, j) for i, j in ((a, b) for a in range(ids.size) for b in range(a + 1, ids.size))
                         if home[i] == home[j])
    c.write_rows(f"hashed{seed}", ids[[first]], np.full((1, 4), 9, np.float32))
    rows_, unknown = c.lookup_counted(f"hashed{seed}", ids[[second]])
    np.testing.assert_array_equal(rows_, np.full((1, 4), 9))
    assert unknown == 0
    info = c.describe(f"hashed{seed}")
    assert (info.key_space, info.key_seed, info.live_ids) == ("hashed", seed, 0)


def test_dense_ids_stay_rows(keyed):
    _, c = keyed
    c.create_table("dense_keys", 10, 2)
    with pytest.raises(EmbtierClientError) as err:
        c.lookup("dense_keys", [3, 10])
    assert err.value.code.name == "INVALID_ARGUMENT" and "ids[1] = 10 is out of range [0, 10)" in err.value.message
    with pytest.raises(EmbtierClientError) as err:
        c.write_rows("dense_keys", [-7], np.zeros((1, 2), np.float32))
    assert err.value.code.name == "INVALID_ARGUMENT" and "ids[0] = -7" in err.value.message


def encode(ids: np.ndarray, dim: int) -> np.ndarray:
    """A row that names its id: (id mod 999983) + column, exact in float32."""
    return ((ids % 999983)[:, None] + np.arange(dim)).astype(np.float32)


def test_concurrent_lookups_writers_and_the_mover_never_serve_a_wrong_row(tmp_path):
    """Writers insert new ids (each once, its row naming it) into a managed table larger than DRAM and
    CXL while readers look ids up and the tiering engine migrates rows: every row read is its id's
    or the default row, and at the end every acknowledged id is there unless it was evicted, and
    exactly as many were evicted as the table counted."""
    dim, capacity = 16, 60_000  # 64-byte rows: more than the 2 MiB DRAM and CXL tiers hold
    config = "[tiering]\nenabled = true\ninterval_seconds = 0.1\n"
    with running_daemon(tmp_path, config) as d, Client(d.target) as c:
        c.create_table("live", capacity, dim, key_space="managed", default_value=-1)
        acked: list[np.ndarray] = []
        lock, stop, problems = threading.Lock(), threading.Event(), []

        def write(seed: int) -> None:
            rng = np.random.default_rng(seed)
            with Client(d.target) as w:
                while not stop.is_set():
                    ids = np.unique(rng.integers(I64.min, I64.max, 2000, dtype=np.int64))
                    try:
                        w.write_rows("live", ids, encode(ids, dim))
                    except EmbtierClientError as e:  # every live id protected: a refusal, nothing written
                        if e.code.name != "RESOURCE_EXHAUSTED":
                            problems.append(repr(e))
                        continue
                    with lock:
                        acked.append(ids)

        def read(seed: int) -> None:
            rng = np.random.default_rng(seed)
            with Client(d.target) as r:
                while not stop.is_set():
                    with lock:
                        pool_ = np.concatenate(acked[-20:]) if acked else np.zeros(1, np.int64)
                    ids = np.concatenate([rng.choice(pool_, 3000), rng.integers(0, 10, 10)])
                    got, unknown = r.lookup_counted("live", ids)
                    default = (got == -1).all(axis=1)
                    right = (got == encode(ids, dim)).all(axis=1)
                    # (an id whose first write or eviction is under way reads the default row uncounted)
                    if not (default | right).all() or unknown > default.sum():
                        problems.append(f"{np.count_nonzero(~(default | right))} wrong rows, {unknown} unknown "
                                        f"for {default.sum()} default rows")

        threads = [threading.Thread(target=write, args=(k,)) for k in range(2)] + \
                  [threading.Thread(target=read, args=(10 + k,)) for k in range(2)]
        for t in threads:
            t.start()
        time.sleep(6)
        stop.set()
        for t in threads:
            t.join(timeout=60)
        assert problems == []
        every = np.concatenate(acked)
        got, unknown = c.lookup_counted("live", every)
        info = c.describe("live")
        assert ((got == encode(every, dim)).all(axis=1) | (got == -1).all(axis=1)).all()
        assert unknown == info.key_evictions > 0 and every.size - unknown == info.live_ids == capacity
        assert sum(info.rows_by_tier.values()) == capacity + 1
        assert migrated(d) > 0  # the mover moved rows while it all ran


def migrated(daemon) -> float:
    text = urllib.request.urlopen(f"http://{daemon.metrics}/metrics", timeout=10).read().decode()
    return sum(s.value for f in text_string_to_metric_families(text) for s in f.samples
               if s.name == "embtier_migrations_total")


def test_managed_maps_survive_checkpoint_restore_and_sigkill(tmp_path):
    """A managed table written past its capacity (evicting), checkpointed (full, then incremental),
    written on; SIGKILL and a restart replay the log onto the checkpoints; a restore goes back to
    the first checkpoint: each time every id reads exactly what the model says, unknown ids too."""
    state = tmp_path / "s"
    state.mkdir()
    config = state / "embtierd.toml"
    config.write_text(CONFIG)
    d = start_daemon(state, config=config)
    model, rng = ManagedModel(40, 3, 0.5), np.random.default_rng(5)
    everything: list[int] = []

    def churn(c: Client, steps: int) -> None:
        for _ in range(steps):
            time.sleep(2.5 * EPOCH)
            ids = raw_ids(rng, 15)
            values = rng.standard_normal((ids.size, 3)).astype(np.float32)
            add = bool(rng.random() < 0.5)
            c.write_rows("m", ids, values, add=add, scale=0.5)
            model.write(ids, values, add, 0.5)
            reconcile(c, "m", model, set(ids.tolist()))
            everything.extend(ids.tolist())

    def check(target: str, want: ManagedModel) -> None:
        ids = np.array(everything, np.int64)
        with Client(target) as c:
            got, unknown = c.lookup_counted("m", ids)
            info = c.describe("m")
        rows, want_unknown = want.lookup(ids)
        np.testing.assert_array_equal(got, rows)
        assert unknown == want_unknown and info.live_ids == len(want.rows)

    with Client(d.target) as c:
        c.create_table("m", 40, 3, key_space="managed", default_value=0.5)
        churn(c, 6)
        first = c.checkpoint("full").id
        at_first = ManagedModel(40, 3, 0.5)
        at_first.rows = {k: v.copy() for k, v in model.rows.items()}
        churn(c, 4)
        c.checkpoint("incremental")
        churn(c, 4)
    check(d.target, model)
    d.proc.kill()
    d.proc.wait(timeout=30)
    d = start_daemon(state, config=config)
    check(d.target, model)
    with Client(d.target) as c:
        c.restore(first)
    check(d.target, at_first)
    assert d.stop() == 0, d.log()
    d = start_daemon(state, config=config)
    check(d.target, at_first)
    assert d.stop() == 0, d.log()


def test_cli_creates_describes_and_looks_up_a_managed_table(keyed):
    d, c = keyed
    made = run_cli(d.target, "create", "cli_keys", "--rows", "100", "--dim", "4", "--key-space", "managed",
                   "--default-value", "0.5")
    assert made.returncode == 0, made.stderr
    c.write_rows("cli_keys", [-(2**40), 2**62], np.ones((2, 4), np.float32))
    described = run_cli(d.target, "describe", "cli_keys")
    assert described.returncode == 0, described.stderr
    line = re.search(r"keys managed: (\d+) live ids of 100, (\d+) evicted .* default value 0.5; map .* "
                     r"\(([\d.]+) bytes/live id", described.stdout)
    assert line and line.group(1, 2) == ("2", "0"), described.stdout
    assert float(line.group(3)) == pytest.approx(c.describe("cli_keys").map_bytes / 2)
    looked = run_cli(d.target, "lookup", "cli_keys", str(2**62), "12345")
    assert looked.returncode == 0, looked.stderr
    assert "1 of the 2 ids are unknown to cli_keys (they read its default row)" in looked.stdout
    listed = run_cli(d.target, "tables")
    assert re.search(r"cli_keys .*\(managed ids\)", listed.stdout), listed.stdout
    bad = run_cli(d.target, "create", "cli_bad", "--rows", "10", "--dim", "4", "--default-value", "nan",
                  "--key-space", "managed")
    assert bad.returncode != 0 and "default_value must be finite, got nan" in bad.stderr
