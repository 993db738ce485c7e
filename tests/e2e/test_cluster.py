"""Tables sharded over several daemons (embtier.cluster): a real etcd and three real embtierd
processes, each in its own network namespace (loopback ports where namespaces cannot be made),
driven through ClusterClient and compared with numpy: table-, row- and column-wise tables in
every pooling mode; replicas that survive a SIGKILL without losing an acknowledged write or
failing a request past one lease period; without replicas only the dead daemon's shards fail,
UNAVAILABLE naming shard and host; a move under load that loses no acknowledged write (checked
row by row); a stale plan corrected by FAILED_PRECONDITION and a retry."""

from __future__ import annotations

import itertools
import threading
import time
from pathlib import Path

import grpc
import numpy as np
import pytest
from embtier import ClusterClient
from embtier.client import Client, EmbtierClientError
from embtier.cluster.placement import apply_plan
from embtier.cluster.plan import Replica, make_layout, with_layout
from embtier.wire import PLAN_METADATA_KEY
from embtier_tools.cluster_bed import ClusterBed

from tests.support import TIER_FLAGS

LEASE = 2
_SERIAL = itertools.count()


def pooled_model(table: np.ndarray, ids, lengths, weights, mode: str) -> np.ndarray:
    out = np.zeros((len(lengths), table.shape[1]), dtype=np.float64)
    at = 0
    for b, n in enumerate(lengths):
        rows = table[ids[at:at + n]].astype(np.float64)
        if weights is not None:
            rows = rows * weights[at:at + n, None]
        if n:
            out[b] = rows.max(axis=0) if mode == "max" else rows.sum(axis=0) / (n if mode == "mean" else 1)
        at += n
    return out


@pytest.fixture(scope="module")
def bed(tmp_path_factory) -> ClusterBed:
    base = tmp_path_factory.mktemp("cluster")
    with ClusterBed(3, f"ecl{next(_SERIAL)}", base) as bed:
        bed.cluster = "c0"
        for i in range(3):
            start(bed, i)
        yield bed


def start(bed: ClusterBed, i: int, state_dir: Path | None = None):
    config = bed.base_dir / "cluster.toml"
    config.write_text(f"[cluster]\nlease_seconds = {LEASE}\n")
    args = (*TIER_FLAGS, "--dram-bytes", "64M", "--config", str(config), "--cluster",
            f"{bed.cluster}@{bed.etcd_endpoint(i)}", "--node-id", f"n{i}", "--advertise", bed.target(i))
    daemon = bed.start_daemon(i, state_dir, extra_args=args)
    return daemon


def cluster_client(bed: ClusterBed, **kw) -> ClusterClient:
    client = ClusterClient(f"{bed.cluster}@{bed.etcd.endpoint()}", **kw)
    deadline = time.monotonic() + 30
    while len(client.nodes()) < sum(1 for d in bed.daemons.values() if d.proc.poll() is None):
        assert time.monotonic() < deadline, f"daemons did not register: {client.nodes()}"
        time.sleep(0.1)
        client.refresh()
    return client


@pytest.fixture(scope="module")
def client(bed):
    with cluster_client(bed) as c:
        yield c


def fill(client, name: str, rows: int, dim: int, seed: int) -> np.ndarray:
    values = np.random.default_rng(seed).standard_normal((rows, dim)).astype(np.float32)
    client.write_rows(name, np.arange(rows), values)
    return values


@pytest.mark.parametrize("sharding", ["table", "row", "column"])
@pytest.mark.parametrize("mode", ["sum", "mean", "max"])
def test_pooled_and_raw_equal_numpy(client, sharding, mode):
    name = f"t_{sharding}_{mode}"
    client.create_table(name, 1000, 16, sharding=sharding, shards=3 if sharding != "table" else 0)
    table = fill(client, name, 1000, 16, seed=len(name))
    rng = np.random.default_rng(1)
    lengths = rng.integers(0, 12, 64).astype(np.int32)
    lengths[3] = 0
    ids = rng.integers(0, 1000, int(lengths.sum()))
    weights = rng.random(ids.size).astype(np.float32)
    for w in (None, weights):
        got = client.lookup_pooled({name: (ids, lengths, w)}, mode=mode)[name]
        np.testing.assert_allclose(got, pooled_model(table, ids, lengths, w, mode), rtol=1e-5, atol=1e-5)
    np.testing.assert_array_equal(client.lookup(name, ids), table[ids])
    half = client.lookup_pooled({name: (ids, lengths)}, mode=mode, wire_dtype="float16")[name]  # reduced precision
    np.testing.assert_allclose(half, pooled_model(table, ids, lengths, None, mode), rtol=2e-3, atol=2e-2)
    np.testing.assert_allclose(client.lookup(name, ids, wire_dtype="float16"), table[ids], rtol=1e-3, atol=1e-3)
    info = client.describe(name)
    assert (info.num_rows, info.dim, sum(info.rows_by_tier.values())) == (1000, 16, 1000)
    layout = client.plan.tables[name].layout
    assert layout.sharding == sharding and len(layout.shards) == (1 if sharding == "table" else 3)


def test_hashed_table_sharded_row_wise(client):
    from embtier.keys import hashed_rows
    client.create_table("h", 500, 8, key_space="hashed", key_seed=7, sharding="row")
    keys = np.random.default_rng(2).integers(-2**62, 2**62, 300)
    values = np.random.default_rng(3).standard_normal((300, 8)).astype(np.float32)
    client.write_rows("h", keys, values)
    rows = hashed_rows(keys, 500, 7)
    model = np.zeros((500, 8), np.float32)
    model[rows] = values  # (a later duplicate row wins, as in the daemon)
    np.testing.assert_array_equal(client.lookup("h", keys), model[rows])
    lengths = np.full(30, 10, np.int32)
    np.testing.assert_allclose(client.lookup_pooled({"h": (keys, lengths)})["h"],
                               pooled_model(model, rows, lengths, None, "sum"), rtol=1e-5, atol=1e-5)


def test_bad_ids_and_unknown_tables_are_clear(client):
    client.create_table("b", 10, 4, sharding="row")
    with pytest.raises(EmbtierClientError) as e:
        client.lookup("b", [3, 10])
    assert e.value.code == grpc.StatusCode.INVALID_ARGUMENT and "10 is out of range [0, 10)" in e.value.message
    with pytest.raises(EmbtierClientError) as e:
        client.lookup("nope", [1])
    assert e.value.code == grpc.StatusCode.NOT_FOUND and "'nope'" in e.value.message


def test_stale_plan_is_refused_then_retried(bed, client):
    client.create_table("s", 100, 4, sharding="table")
    table = fill(client, "s", 100, 4, seed=5)
    plan = client.plan
    shard = plan.tables["s"].layout.shards[0]
    node = shard.replicas[0].node
    raw = Client(client.nodes()[node].address, retries=0)
    raw.metadata = ((PLAN_METADATA_KEY, str(plan.version - 1)),)
    with pytest.raises(EmbtierClientError) as e:
        raw.lookup(shard.name, [1])
    assert e.value.code == grpc.StatusCode.FAILED_PRECONDITION
    assert f"routed by plan version {plan.version - 1}" in e.value.message and f"serves version {plan.version}" \
        in e.value.message
    # a second client whose plan goes stale: the next request is refused once, reloads, and succeeds
    with cluster_client(bed, refresh_seconds=3600) as other:
        old = other.plan.version
        client.create_table("s2", 10, 4)  # a new plan
        from embtier.cluster.placement import wait_taken_up
        wait_taken_up(client, client.plan.version)
        assert other.plan.version == old
        np.testing.assert_array_equal(other.lookup("s", [1, 2]), table[[1, 2]])
        assert other.plan.version == client.plan.version > old


def test_cli_with_cluster_creates_imports_looks_up_and_drops(bed, client, tmp_path):
    import subprocess
    import sys
    spec = f"{bed.cluster}@{bed.etcd.endpoint()}"

    def cli(*args: str) -> str:
        out = subprocess.run([sys.executable, "-m", "embtier.cli", "--cluster", spec, *args], check=False,
                             capture_output=True, text=True, timeout=120)
        assert out.returncode == 0, out.stderr
        return out.stdout

    values = np.random.default_rng(21).standard_normal((300, 4)).astype(np.float32)
    np.save(tmp_path / "rows.npy", values)
    cli("create", "clitab", "--rows", "300", "--dim", "4", "--sharding", "column", "--shards", "2", "--replicas", "2")
    cli("import", "clitab", str(tmp_path / "rows.npy"))
    np.testing.assert_array_equal(client.lookup("clitab", np.arange(300)), values)
    assert "clitab" in cli("tables") and "300" in cli("describe", "clitab")
    pooled = cli("lookup", "clitab", "3", "7", "--pooled")
    np.testing.assert_allclose(np.array(pooled.strip(" []\n").split(), dtype=np.float32), values[[3, 7]].sum(0),
                               rtol=1e-4, atol=1e-4)
    refused = subprocess.run([sys.executable, "-m", "embtier.cli", "--cluster", spec, "heat", "clitab"], check=False,
                             capture_output=True, text=True, timeout=60)
    assert refused.returncode != 0 and "not offered with --cluster" in refused.stderr
    cli("drop", "clitab")
    assert "clitab" not in client.refresh().tables


MOVES = [  # (key space, sharding before, (sharding, split) after)
    ("dense", "table", ("row", "mod")),
    ("dense", "row", ("column", "")),
    ("hashed", "column", ("row", "range")),
]


@pytest.mark.parametrize("key_space, before, after", MOVES, ids=[f"{k}-{b}-to-{a[0]}" for k, b, a in MOVES])
def test_move_under_load_loses_no_acknowledged_write(bed, client, key_space, before, after):
    """A table moves to another layout while a writer and a reader run through their own clients: no
    request fails, and every row holds the last write acknowledged for it (or its value before)."""
    from embtier.keys import hashed_rows
    name = f"mv_{key_space}_{before}"
    rows, dim = 20000, 8
    client.create_table(name, rows, dim, sharding=before, key_space=key_space, key_seed=5)
    keys = np.arange(rows) if key_space == "dense" else np.random.default_rng(3).integers(-2**62, 2**62, rows)
    row_of = keys if key_space == "dense" else hashed_rows(keys, rows, 5)
    base = np.zeros((rows, dim), np.float32)
    init = np.random.default_rng(9).standard_normal((rows, dim)).astype(np.float32)
    client.write_rows(name, keys, init)
    base[row_of] = init  # (hashed: the later of two keys on one row wins, as in the daemon)
    acked: dict[int, float] = {}
    stop = threading.Event()
    errors = []

    def writer(seed: int):
        rng = np.random.default_rng(seed)
        with cluster_client(bed) as w:
            while not stop.is_set():
                picked = np.unique(rng.integers(0, rows, 64))
                value = float(rng.integers(1, 1 << 20))
                try:
                    w.write_rows(name, keys[picked], np.full((picked.size, dim), value, np.float32))
                except EmbtierClientError as e:
                    errors.append(e)
                    continue
                for r in row_of[picked]:
                    acked[int(r)] = value

    def reader():
        with cluster_client(bed) as r:
            rng = np.random.default_rng(4)
            while not stop.is_set():
                try:
                    r.lookup_pooled({name: (keys[rng.integers(0, rows, 256)], np.full(8, 32, np.int32))})
                except EmbtierClientError as e:
                    errors.append(e)

    threads = [threading.Thread(target=writer, args=(11,)), threading.Thread(target=reader)]
    for t in threads:
        t.start()
    time.sleep(0.5)
    plan = client.refresh()
    t = plan.tables[name]
    nodes = client.nodes()
    reps = [[Replica(n, nodes[n].incarnation)] for n in sorted(nodes)]
    sharding, split = after
    bounds = [0, rows // 5, rows // 2, rows] if split == "range" else None
    layout = make_layout(t, plan.version + 1, sharding, reps, split=split or "mod", bounds=bounds)
    final = apply_plan(client, plan.successor({**plan.tables, name: with_layout(t, layout)}))
    time.sleep(0.3)
    stop.set()
    for th in threads:
        th.join(timeout=60)
    assert not errors, errors[:3]
    assert final.tables[name].layout.sharding == sharding and final.tables[name].next is None
    want = base.copy()
    for r, v in acked.items():
        want[r] = v
    first = {}
    for k, r in zip(keys.tolist(), row_of.tolist(), strict=True):
        first.setdefault(r, k)  # one key per row to read it by
    readers = np.array([first[r] for r in range(rows) if r in first])
    got = client.lookup(name, readers)
    np.testing.assert_array_equal(got, want[row_of_of(readers, keys, row_of)])
    old = t.layout.shards[0]
    with pytest.raises(EmbtierClientError) as e:  # the old shards are gone
        Client(nodes[old.replicas[0].node].address, retries=0).describe(old.name)
    assert e.value.code == grpc.StatusCode.NOT_FOUND


def row_of_of(picked_keys: np.ndarray, keys: np.ndarray, row_of: np.ndarray) -> np.ndarray:
    """The rows of picked_keys (each one of keys)."""
    order = np.argsort(keys)
    return row_of[order[np.searchsorted(keys[order], picked_keys)]]


class Load:
    """Writers and readers of table name through their own ClusterClients, recording every acknowledged
    write, every failure and the slowest request."""

    def __init__(self, bed, name: str, rows: int, dim: int, ids_for_reads=None):
        self.bed, self.name, self.rows, self.dim = bed, name, rows, dim
        self.ids_for_reads = ids_for_reads
        self.acked: dict[int, float] = {}
        self.errors: list = []
        self.slowest = 0.0
        self.requests = 0
        self.stop = threading.Event()
        self.threads = [threading.Thread(target=self._write, args=(21,)), threading.Thread(target=self._read)]

    def __enter__(self):
        for t in self.threads:
            t.start()
        return self

    def __exit__(self, *exc):
        self.stop.set()
        for t in self.threads:
            t.join(timeout=60)

    def _timed(self, fn):
        start = time.monotonic()
        try:
            fn()
            self.requests += 1
        except EmbtierClientError as e:
            self.errors.append((time.monotonic(), e))
            return False
        finally:
            self.slowest = max(self.slowest, time.monotonic() - start)
        return True

    def _write(self, seed: int):
        rng = np.random.default_rng(seed)
        with cluster_client(self.bed) as w:
            while not self.stop.is_set():
                ids = np.unique(rng.integers(0, self.rows, 32))
                value = float(rng.integers(1, 1 << 20))
                if self._timed(lambda ids=ids, value=value: w.write_rows(
                        self.name, ids, np.full((ids.size, self.dim), value, np.float32))):
                    for i in ids:
                        self.acked[int(i)] = value

    def _read(self):
        rng = np.random.default_rng(5)
        with cluster_client(self.bed) as r:
            while not self.stop.is_set():
                pool = self.ids_for_reads if self.ids_for_reads is not None else np.arange(self.rows)
                ids = rng.choice(pool, 256)
                self._timed(lambda ids=ids: r.lookup_pooled({self.name: (ids, np.full(8, 32, np.int32))}))


def restart(bed, i: int) -> None:
    start(bed, i, bed.base_dir / f"host{i}")


def test_sigkilled_daemon_with_replicas_loses_no_write_and_fails_no_request(bed, client):
    rows, dim = 3000, 8
    client.create_table("rep", rows, dim, sharding="row", shards=3, replicas=2)
    base = fill(client, "rep", rows, dim, seed=12)
    victim = 1
    with Load(bed, "rep", rows, dim) as load:
        time.sleep(0.5)
        bed.kill(victim)
        killed = time.monotonic()
        time.sleep(2 * LEASE + 1)
    assert not load.errors, load.errors[:3]
    assert load.requests > 20 and load.slowest < LEASE + 1.5, (load.requests, load.slowest)
    assert f"n{victim}" not in client.nodes()
    want = base.copy()
    for i, v in load.acked.items():
        want[i] = v
    np.testing.assert_array_equal(client.lookup("rep", np.arange(rows)), want)
    assert time.monotonic() - killed < 60
    restart(bed, victim)  # (a new incarnation: its old copies do not count until a plan refills them)
    wait_registered(client, f"n{victim}")
    np.testing.assert_array_equal(client.lookup("rep", np.arange(rows)), want)


def wait_registered(client, node: str) -> None:
    deadline = time.monotonic() + 30
    while node not in client.nodes():
        assert time.monotonic() < deadline, f"{node} did not register"
        time.sleep(0.1)
        client.refresh()


def test_without_replicas_only_the_dead_daemons_shards_fail(bed, client):
    rows, dim = 900, 4
    client.create_table("solo", rows, dim, sharding="row", shards=3)
    table = fill(client, "solo", rows, dim, seed=13)
    shards = client.plan.tables["solo"].layout.shards
    victim_shard = shards[2]
    victim = int(victim_shard.replicas[0].node[1:])
    client.create_table("safe", 50, dim, sharding="table")  # whole, on whichever daemon had most room
    safe = fill(client, "safe", 50, dim, seed=14)
    safe_on = client.plan.tables["safe"].layout.shards[0].replicas[0].node
    bed.kill(victim)
    for wait in (0.0, LEASE + 1.0):  # before and after its lease expired
        time.sleep(wait)
        start = time.monotonic()
        with pytest.raises(EmbtierClientError) as e:
            client.lookup("solo", np.arange(rows))
        assert time.monotonic() - start < 2.0
        assert e.value.code == grpc.StatusCode.UNAVAILABLE
        assert victim_shard.name in e.value.message and f"n{victim}" in e.value.message, e.value.message
        ids = np.arange(rows)[np.arange(rows) % 3 != 2]  # rows of the other two shards
        np.testing.assert_array_equal(client.lookup("solo", ids), table[ids])
        lengths = np.full(ids.size // 10, 10, np.int32)
        np.testing.assert_allclose(client.lookup_pooled({"solo": (ids[:lengths.sum()], lengths)})["solo"],
                                   pooled_model(table, ids[:lengths.sum()], lengths, None, "sum"), rtol=1e-5)
        if safe_on != f"n{victim}":  # a table wholly elsewhere serves on
            np.testing.assert_array_equal(client.lookup("safe", np.arange(50)), safe)
        else:  # ... and one wholly on the dead daemon fails the same way
            with pytest.raises(EmbtierClientError) as e:
                client.lookup("safe", np.arange(50))
            assert e.value.code == grpc.StatusCode.UNAVAILABLE and safe_on in e.value.message
    restart(bed, victim)
    wait_registered(client, f"n{victim}")


def test_etcd_unreachable_daemons_serve_the_last_plan(bed, client):
    client.create_table("e", 100, 4, sharding="row")
    table = fill(client, "e", 100, 4, seed=15)
    bed.etcd.pause()
    try:
        time.sleep(LEASE + 1)  # past a lease period: the daemons cannot renew, and keep serving
        np.testing.assert_array_equal(client.lookup("e", np.arange(100)), table)
        client.write_rows("e", [7], np.full((1, 4), 3.0, np.float32))
        with pytest.raises(ConnectionError, match="unreachable"):
            client.create_table("e2", 10, 4)  # creating (and moving) tables needs etcd
    finally:
        bed.etcd.resume()
    deadline = time.monotonic() + 30
    while len(client.coord.nodes()) < 3:  # the daemons register anew (their leases expired meanwhile)
        assert time.monotonic() < deadline
        time.sleep(0.2)
    table[7] = 3.0
    client.refresh()
    # no write skipped any daemon while etcd was away: they came back under their incarnations, and serve
    np.testing.assert_array_equal(client.lookup("e", np.arange(100)), table)


def test_partitioned_replica_is_failed_over_and_comes_back_as_a_new_incarnation(bed, client):
    if bed.mode != "netns":
        pytest.skip("a partition needs network namespaces")
    rows, dim = 600, 4
    client.create_table("part", rows, dim, sharding="row", shards=3, replicas=2)
    base = fill(client, "part", rows, dim, seed=16)
    victim = 0
    before = client.nodes()[f"n{victim}"].incarnation
    with Load(bed, "part", rows, dim) as load:
        time.sleep(0.3)
        bed.partition(victim)
        time.sleep(2 * LEASE + 1)
        bed.heal(victim)
        time.sleep(LEASE + 1)
    assert not load.errors, load.errors[:3]
    assert load.slowest < 2 * LEASE + 1.5, load.slowest
    wait_registered(client, f"n{victim}")
    assert client.nodes()[f"n{victim}"].incarnation != before  # writes went on without it
    want = base.copy()
    for i, v in load.acked.items():
        want[i] = v
    np.testing.assert_array_equal(client.lookup("part", np.arange(rows)), want)


def test_cli_plans_and_applies_a_rereplication(bed, client):
    """After the daemons above came back under new incarnations, `embtier cluster plan --apply` fills
    their copies again: every replica of every table is live, and the rows are unchanged."""
    import subprocess
    import sys
    spec = f"{bed.cluster}@{bed.etcd.endpoint()}"
    before = {name: client.lookup(name, np.arange(t.num_rows)) for name, t in client.plan.tables.items()
              if t.key_space == "dense" and all(any(client.live(r) for r in s.replicas) for s in t.layout.shards)}
    out = subprocess.run([sys.executable, "-m", "embtier.cli", "--cluster", spec, "cluster", "plan", "--replicas",
                          "2", "--apply"], check=False, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    assert "slowest node" in out.stdout and all(f"n{i}" in out.stdout for i in range(3))
    plan = client.refresh()
    for name, rows in before.items():
        t = plan.tables[name]
        assert all(client.live(r) for s in t.layout.shards for r in s.replicas), name
        np.testing.assert_array_equal(client.lookup(name, np.arange(t.num_rows)), rows)
    status = subprocess.run([sys.executable, "-m", "embtier.cli", "--cluster", spec, "cluster", "status"],
                            check=False, capture_output=True, text=True, timeout=60)
    assert status.returncode == 0 and f"plan version {plan.version}" in status.stdout
    for name in before:
        assert f"table {name}:" in status.stdout
    assert "stays as it was" in out.stderr  # table b: its only copy of a shard went stale above
