"""A stateful property test of durability: hypothesis drives a real daemon through creations,
drops, writes (assign and add, duplicates and out-of-range ids among them), pooled lookups (sum,
mean and max, weighted or not, every offload), tiering policy changes, checkpoints of every kind,
restores, clean restarts and SIGKILL, and compares every answer and, after every step, every row
and the tiering settings of every table with a pure-Python model of what was acknowledged.

SetPolicy is logged like the other changes: a restart, clean or not, brings back every table's
last acknowledged settings.

CI runs a bounded number of examples; EMBTIER_STATEFUL_EXAMPLES (`make stateful`) runs more."""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

import grpc
import numpy as np
from embtier import Client, EmbtierClientError
from embtierd.native import row_stride
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule

from tests.support import start_daemon

NAMES = ("a", "b", "c")
SHAPES = [(1, 4), (7, 1), (300, 16), (20_000, 8)]  # the last one lives mostly on SCM (DRAM and CXL are 256K)
CONFIG = ('[tiering]\nenabled = false\n[durability]\nfsync = "always"\n'
          '[durability.checkpoints]\ninterval_seconds = 0\nkeep = 2\n')
EXAMPLES = int(os.environ.get("EMBTIER_STATEFUL_EXAMPLES", "10"))
TIER_BYTES = 256 << 10  # --dram-bytes and --cxl-bytes
DEFAULT_POLICY = ("lfu", "", -1, -1)  # (policy, pin_tier, dram_capacity_bytes, cxl_capacity_bytes) at creation


class Table:
    """The model of one table: its rows as the daemon must hold them (float32), its tiering settings
    (policy, pin_tier, dram_capacity_bytes, cxl_capacity_bytes)."""

    def __init__(self, rows: np.ndarray, dtype: str, policy: tuple = DEFAULT_POLICY):
        self.rows, self.dtype, self.policy = rows, dtype, policy

    def copy(self) -> Table:
        return Table(self.rows.copy(), self.dtype, self.policy)


def pooled(rows: np.ndarray, ids: np.ndarray, lengths: np.ndarray, weights: np.ndarray | None, mode: str) -> np.ndarray:
    """What LookupPooled answers, by the proto's definitions (float64 here)."""
    out = np.zeros((lengths.size, rows.shape[1]))
    weighted = rows[ids].astype(np.float64) * (1.0 if weights is None else weights[:, None])
    for bag, (start, n) in enumerate(zip(np.cumsum(lengths) - lengths, lengths, strict=True)):
        if n:
            part = weighted[start:start + n]
            out[bag] = part.max(0) if mode == "max" else part.sum(0) / (n if mode == "mean" else 1)
    return out


def encoded(values: np.ndarray, dtype: str) -> np.ndarray:
    """What a table of dtype stores of float32 values (the model's rows are always what reads return)."""
    return values.astype(np.float16).astype(np.float32) if dtype == "float16" else values


class DurableStore(RuleBasedStateMachine):
    def __init__(self):
        super().__init__()
        self.dir = Path(tempfile.mkdtemp(prefix="embtier-model-"))
        (self.dir / "embtierd.toml").write_text(CONFIG)
        self.daemon = None
        self.client = None
        self.model: dict[str, Table] = {}
        self.checkpoints: dict[int, dict[str, Table]] = {}  # exact ones: the model when each was taken

    @initialize()
    def start(self):
        self._start()

    def _start(self):
        self.daemon = start_daemon(self.dir, "--dram-bytes", "256K", "--cxl-bytes", "256K",
                                   config=self.dir / "embtierd.toml")
        self.client = Client(self.daemon.target, timeout=60)

    def _expect(self, code, call):
        """call() must fail with code and change nothing."""
        try:
            call()
        except EmbtierClientError as e:
            assert e.code == code, f"{e.code.name}: {e.message} (expected {code.name})"
            return
        raise AssertionError(f"the call succeeded; expected {code.name}")

    @rule(name=st.sampled_from(NAMES), shape=st.sampled_from(SHAPES), dtype=st.sampled_from(["float32", "float16"]),
          uniform=st.booleans(), seed=st.integers(0, 3))
    def create(self, name, shape, dtype, uniform, seed):
        rows, dim = shape
        create = lambda: self.client.create_table(name, rows, dim, dtype=dtype,
                                                   initializer="uniform" if uniform else "zeros", seed=seed)
        if name in self.model:
            self._expect(grpc.StatusCode.ALREADY_EXISTS, create)
            return
        info = create()
        assert (info.num_rows, info.dim, info.dtype) == (rows, dim, dtype)
        values = self.client.lookup(name, np.arange(rows))  # (initial values: checked by the unit tests)
        if not uniform:
            assert not values.any()
        else:
            assert np.abs(values).max() <= 1 / np.sqrt(rows) + 1e-3
        self.model[name] = Table(values.copy(), dtype)

    @rule(name=st.sampled_from(NAMES))
    def drop(self, name):
        if name not in self.model:
            self._expect(grpc.StatusCode.NOT_FOUND, lambda: self.client.drop_table(name))
            return
        self.client.drop_table(name)
        del self.model[name]

    @rule(name=st.sampled_from(NAMES), data=st.data(), add=st.booleans(), scale=st.sampled_from([1.0, 2.0, -1.0]))
    def write(self, name, data, add, scale):
        table = self.model.get(name)
        num_rows, dim = (table.rows.shape if table is not None else (10, 4))
        n = data.draw(st.integers(1, 40), label="n")
        ids = np.array(data.draw(st.lists(st.integers(0, num_rows - 1), min_size=n, max_size=n), label="ids"))
        bad = data.draw(st.sampled_from([None, -1, num_rows]), label="bad id")
        if bad is not None:
            ids[data.draw(st.integers(0, n - 1), label="at")] = bad
        values = np.array(data.draw(st.lists(st.integers(-8, 8), min_size=n * dim, max_size=n * dim), label="values"),
                          dtype=np.float32).reshape(n, dim)
        write = lambda: self.client.write_rows(name, ids, values, add=add, scale=scale)
        if table is None:
            self._expect(grpc.StatusCode.NOT_FOUND, write)
        elif bad is not None:
            self._expect(grpc.StatusCode.INVALID_ARGUMENT, write)
        else:
            write()
            if add:  # duplicates accumulate: float32, as the store adds
                unique, inverse = np.unique(ids, return_inverse=True)
                delta = np.zeros((unique.size, dim), np.float32)
                np.add.at(delta, inverse, values)
                table.rows[unique] = encoded(table.rows[unique] + np.float32(scale) * delta, table.dtype)
            else:  # a later duplicate wins
                last = ids.size - 1 - np.unique(ids[::-1], return_index=True)[1]
                table.rows[ids[last]] = encoded(values[last], table.dtype)

    @rule(name=st.sampled_from(NAMES), data=st.data(), mode=st.sampled_from(["sum", "mean", "max"]),
          weighted=st.booleans(), offload=st.sampled_from([None, None, "host", "device"]))
    def lookup_pooled(self, name, data, mode, weighted, offload):
        table = self.model.get(name)
        num_rows = table.rows.shape[0] if table is not None else 10
        lengths = np.array(data.draw(st.lists(st.integers(0, 5), min_size=1, max_size=6), label="lengths"), np.int32)
        n = int(lengths.sum())
        ids = np.array(data.draw(st.lists(st.integers(0, num_rows - 1), min_size=n, max_size=n), label="ids"), np.int64)
        weights = (np.array(data.draw(st.lists(st.sampled_from([1.0, 0.5, -2.0, 0.0, 3.0]), min_size=n, max_size=n),
                                      label="weights"), np.float32) if weighted else None)
        bad = data.draw(st.sampled_from([None, None, None, -1, num_rows]), label="bad id") if n else None
        if bad is not None:
            ids[data.draw(st.integers(0, n - 1), label="at")] = bad
        lookup = lambda: self.client.lookup_pooled({name: (ids, lengths) if weights is None else (ids, lengths, weights)},
                                                   mode=mode, offload=offload)[name]
        if table is None:
            self._expect(grpc.StatusCode.NOT_FOUND, lookup)
        elif bad is not None:
            self._expect(grpc.StatusCode.INVALID_ARGUMENT, lookup)
        else:
            expected = pooled(table.rows, ids, lengths, weights, mode)
            np.testing.assert_allclose(lookup(), expected, rtol=1e-5, atol=1e-5 * max(1.0, np.abs(expected).max(initial=0)),
                                       err_msg=f"table {name!r}, {mode}, offload {offload}")

    @rule(name=st.sampled_from(NAMES), policy=st.sampled_from([None, "lfu", "lru"]),
          pin=st.sampled_from([None, "", "dram", "cxl", "scm"]),
          dram=st.sampled_from([None, -1, 0, 4096, 1 << 20]), cxl=st.sampled_from([None, -1, 8192]))
    def set_policy(self, name, policy, pin, dram, cxl):
        table = self.model.get(name)
        change = lambda: self.client.set_policy(name, policy=policy, pin_tier=pin, dram_capacity_bytes=dram,
                                                cxl_capacity_bytes=cxl)
        if table is None:
            self._expect(grpc.StatusCode.NOT_FOUND, change)
            return
        old = table.policy
        new = tuple(o if v is None else v for o, v in zip(old, (policy, pin, dram, cxl), strict=True))
        if new[1] in ("dram", "cxl"):  # pinned to a memory tier: it must hold every row, within the table's limit
            limit = new[2] if new[1] == "dram" else new[3]
            stride = row_stride(table.rows.shape[1], table.dtype)
            fits = TIER_BYTES // stride if limit == -1 else min(TIER_BYTES, limit) // stride
            if fits < table.rows.shape[0]:
                self._expect(grpc.StatusCode.RESOURCE_EXHAUSTED, change)
                return
        answer = change()
        assert answer.table == name
        table.policy = new
        assert self._settings(answer) == new

    @staticmethod
    def _settings(answer) -> tuple:
        return answer.policy, answer.pin_tier, answer.dram_capacity_bytes, answer.cxl_capacity_bytes

    @rule(kind=st.sampled_from(["full", "incremental", "differential", "auto"]), bits=st.sampled_from([0, 0, 8]))
    def checkpoint(self, kind, bits):
        info = self.client.checkpoint(kind, bits)
        assert sorted(info.tables) == sorted(self.model)
        assert info.exact_chain == (bits == 0 and (info.kind == "full" or info.parent_id in self.checkpoints))
        if info.exact_chain:  # (an exact checkpoint on a quantized parent restores lossy: not modelled)
            self.checkpoints[info.id] = {name: t.copy() for name, t in self.model.items()}

    @precondition(lambda self: self.checkpoints)
    @rule(data=st.data())
    def restore(self, data):
        listed = {c.id: c for c in self.client.checkpoints()}
        ids = sorted(set(listed) & set(self.checkpoints))
        if not ids:
            self._expect(grpc.StatusCode.NOT_FOUND, lambda: self.client.restore(max(self.checkpoints) + 100))
            return
        checkpoint_id = data.draw(st.sampled_from(ids), label="checkpoint")
        assert listed[checkpoint_id].damage == ""
        restored, saved = self.client.restore(checkpoint_id)
        assert restored.id == checkpoint_id and saved is not None and saved.exact_chain
        self.model = {name: t.copy() for name, t in self.checkpoints[checkpoint_id].items()}
        self.checkpoints[saved.id] = {name: t.copy() for name, t in self.model.items()}

    @rule(kill=st.booleans())
    def restart(self, kill):
        self.client.close()
        if kill:
            self.daemon.proc.kill()
            self.daemon.proc.wait(timeout=60)
        else:
            assert self.daemon.stop() == 0, self.daemon.log()
        self._start()  # (the invariant compares every table's settings with the model's)

    @invariant()
    def every_row_is_what_was_acknowledged(self):
        if self.client is None:
            return
        tables = {t.name: t for t in self.client.tables()}
        assert sorted(tables) == sorted(self.model), (sorted(tables), sorted(self.model))
        for name, table in self.model.items():
            assert (tables[name].num_rows, tables[name].dim, tables[name].dtype) == (*table.rows.shape, table.dtype)
            np.testing.assert_array_equal(self.client.lookup(name, np.arange(table.rows.shape[0])), table.rows,
                                          err_msg=f"table {name!r}")
            assert self._settings(self.client.policy(name)) == table.policy, name

    def teardown(self):
        if self.client is not None:
            self.client.close()
        if self.daemon is not None:
            assert self.daemon.stop() == 0, self.daemon.log()
        shutil.rmtree(self.dir, ignore_errors=True)


DurableStore.TestCase.settings = settings(max_examples=EXAMPLES, stateful_step_count=25, deadline=None,
                                          suppress_health_check=list(HealthCheck), derandomize=False)
test_the_daemon_equals_a_model_of_what_was_acknowledged = DurableStore.TestCase
