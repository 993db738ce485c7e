"""Crash safety of the write-ahead log and checkpoints: a real daemon killed
with SIGKILL while writers and checkpoints run, restarted on the same state
directory, 20 rounds."""

from __future__ import annotations

import subprocess
import threading
import time
import urllib.request

import grpc
import numpy as np
import pytest
from embtier import Client, EmbtierClientError
from embtier.v1 import embtier_pb2 as pb
from prometheus_client.parser import text_string_to_metric_families

from .conftest import daemon_args, run_cli, start_daemon

ROWS, DIM, WRITERS = 4000, 8, 4
CONFIG = '[tiering]\nenabled = false\n[durability]\nfsync = "always"\n'


def state_dir(tmp_path) -> tuple:
    """(a fresh state directory, the daemon configuration file in it)."""
    state = tmp_path / "s"
    state.mkdir()
    config = state / "embtierd.toml"
    config.write_text(CONFIG)
    return state, config


# what a call cut off by the SIGKILL fails with; anything else is a failure of the test
KILLED = {grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.CANCELLED, grpc.StatusCode.DEADLINE_EXCEEDED}


def _cut_off(e: EmbtierClientError, unexpected: list) -> None:
    if e.code not in KILLED:
        unexpected.append(f"{e.code.name}: {e.message}")


class Writer(threading.Thread):
    """Writes rows k, k + WRITERS, ... (its own) with values = a version number unique to each write;
    remembers per row the last acknowledged version and the one in flight when the daemon died."""

    def __init__(self, target: str, k: int, acked: np.ndarray, versions, seed: int):
        super().__init__()
        self.target, self.k, self.acked, self.versions = target, k, acked, versions
        self.unexpected: list[str] = []
        self.in_flight: tuple[np.ndarray, int] | None = None
        self.rng = np.random.default_rng(seed)
        self.writes = 0

    def run(self) -> None:
        with Client(self.target, timeout=10) as c:
            while True:
                ids = np.unique(self.rng.integers(0, ROWS // WRITERS, 40)) * WRITERS + self.k
                version = next(self.versions)
                self.in_flight = (ids, version)
                try:
                    c.write_rows("w", ids, np.full((ids.size, DIM), version, dtype=np.float32))
                except EmbtierClientError as e:
                    _cut_off(e, self.unexpected)
                    return  # the daemon is gone: this write may or may not have been logged
                self.acked[ids] = version
                self.in_flight = None
                self.writes += 1


def test_acknowledged_writes_survive_sigkill(tmp_path):
    state, config = state_dir(tmp_path)
    rng = np.random.default_rng(0)
    acked = np.zeros(ROWS)
    counter = iter(range(1, 1 << 40))
    lock = threading.Lock()

    def versions():
        while True:
            with lock:
                yield next(counter)

    shared = versions()
    d = start_daemon(state, config=config)
    with Client(d.target) as c:
        c.create_table("w", ROWS, DIM)
    created, checkpoints = [], []
    total_writes = 0
    for round_ in range(20):
        writers = [Writer(d.target, k, acked, shared, seed=round_ * WRITERS + k) for k in range(WRITERS)]
        for w in writers:
            w.start()
        name = f"t{round_}"
        unexpected = []
        creator = threading.Thread(target=_create, args=(d.target, name, created, unexpected))
        creator.start()
        checkpointer = threading.Thread(target=_checkpoints, args=(d.target, checkpoints, unexpected))
        checkpointer.start()
        time.sleep(rng.uniform(0.3, 1.0))
        d.proc.kill()
        d.proc.wait(timeout=30)
        for w in writers:
            w.join(timeout=30)
        creator.join(timeout=30)
        checkpointer.join(timeout=30)
        total_writes += sum(w.writes for w in writers)
        unexpected += [error for w in writers for error in w.unexpected]
        assert unexpected == [], f"round {round_}: calls failed for another reason than the kill"
        maybe = np.zeros(ROWS)
        for w in writers:
            if w.in_flight is not None:
                ids, version = w.in_flight
                maybe[ids] = version
        d = start_daemon(state, config=config)
        with Client(d.target) as c:
            values = c.lookup("w", np.arange(ROWS))
            tables = {t.name for t in c.tables()}
        assert np.all(values.min(axis=1) == values.max(axis=1)), f"round {round_}: a torn row"
        got = values[:, 0]
        ok = (got == acked) | ((maybe > 0) & (got == maybe))
        bad = np.flatnonzero(~ok)
        assert bad.size == 0, (f"round {round_}: row {bad[0]} holds {got[bad[0]]}, acknowledged {acked[bad[0]]}, "
                               f"in flight {maybe[bad[0]]}")
        acked[:] = got  # what survived is the baseline of the next round
        assert set(created) <= tables, f"round {round_}: acknowledged tables {set(created) - tables} are gone"
        assert tables <= {"w", *(f"t{i}" for i in range(round_ + 1))}
    assert total_writes > 200  # the writers really wrote, and were really cut off
    assert sum(checkpoints) > 10  # and checkpoints were taken (and some cut off) among them
    assert d.stop() == 0, d.log()


# Every kind of checkpoint, so that chains (full -> differential / incremental ...) are cut off at
# random points too; the quantized one must never be what a restart recovers from.
CHECKPOINT_CYCLE = [("auto", 0), ("incremental", 0), ("incremental", 0), ("differential", 0), ("incremental", 8),
                    ("full", 0), ("incremental", 0)]


def _checkpoints(target: str, taken: list, unexpected: list) -> None:
    """Checkpoints one after another until the daemon dies."""
    with Client(target, timeout=10) as c:
        while True:
            kind, bits = CHECKPOINT_CYCLE[len(taken) % len(CHECKPOINT_CYCLE)]
            try:
                c.checkpoint(kind, bits)
            except EmbtierClientError as e:
                _cut_off(e, unexpected)
                return
            taken.append(1)


def _create(target: str, name: str, created: list, unexpected: list) -> None:
    try:
        with Client(target, timeout=10) as c:
            c.create_table(name, 1000, 4, initializer="uniform", seed=len(name))
        created.append(name)
    except EmbtierClientError as e:
        _cut_off(e, unexpected)


def test_a_torn_log_tail_is_cut_and_the_rest_replayed(tmp_path):
    state, config = state_dir(tmp_path)
    d = start_daemon(state, config=config)
    with Client(d.target) as c:
        c.create_table("w", 100, 4)
        for v in (1, 2, 3):
            c.write_rows("w", np.arange(10 * v, 10 * v + 10), np.full((10, 4), v, dtype=np.float32))
    d.proc.kill()
    d.proc.wait(timeout=30)
    segment = max((state / "wal").glob("wal-*.log"))
    size = segment.stat().st_size
    with open(segment, "r+b") as f:
        f.truncate(size - 5)  # the last write's record loses its end, as a crash mid-write would leave it
    d = start_daemon(state, config=config)
    with Client(d.target) as c:
        got = c.lookup("w", np.arange(100))[:, 0]
    assert np.all(got[10:20] == 1) and np.all(got[20:30] == 2)
    assert np.all(got[30:40] == 0)  # the torn record is dropped, not half applied
    assert "torn" in d.log() and segment.name in d.log()
    with Client(d.target) as c:  # and the log goes on after the cut
        c.write_rows("w", np.arange(30, 40), np.full((10, 4), 4, dtype=np.float32))
    assert d.stop() == 0, d.log()
    d = start_daemon(state, config=config)
    with Client(d.target) as c:
        assert np.all(c.lookup("w", np.arange(30, 40))[:, 0] == 4)
    assert d.stop() == 0, d.log()


def test_a_log_the_tiers_cannot_hold_any_more_stops_the_start_with_a_clear_message(tmp_path):
    state, config = state_dir(tmp_path)
    d = start_daemon(state, config=config)
    with Client(d.target) as c:
        c.create_table("big", 200_000, 64)  # 51 MB: most of it on SCM
    assert d.stop() == 0, d.log()
    args, *_ = daemon_args(state, "--scm-bytes", "8M", config=config)
    result = subprocess.run(args, check=False, capture_output=True, text=True, timeout=60)
    assert result.returncode == 2
    assert "write-ahead log record 1 cannot be replayed" in result.stderr and "'big'" in result.stderr, result.stderr


def test_checkpoint_then_sigkill_restores_everything_and_shortens_the_log(tmp_path):
    state, config = state_dir(tmp_path)
    d = start_daemon(state, config=config)
    rng = np.random.default_rng(3)
    with Client(d.target) as c:
        c.create_table("w", 20_000, 16, initializer="uniform", seed=9)
        for _ in range(30):
            ids = rng.integers(0, 20_000, 500)
            c.write_rows("w", ids, rng.standard_normal((500, 16), dtype=np.float32))
        log_bytes = sum(p.stat().st_size for p in (state / "wal").glob("wal-*.log"))
        info = c.checkpoint()
        assert info.rows_written == 20_000 and info.id == 1
        c.write_rows("w", np.arange(100), np.full((100, 16), 5, dtype=np.float32))  # after the checkpoint
        expected = c.lookup("w", np.arange(20_000)).copy()
        bad = [("Checkpoint", pb.CheckpointRequest(quant_bits=5), grpc.StatusCode.INVALID_ARGUMENT,
                "quant_bits must be one of 0, 2, 3, 4, 8; got 5"),
               ("Checkpoint", pb.CheckpointRequest(tables=["nope"]), grpc.StatusCode.NOT_FOUND, "table 'nope'"),
               ("RestoreCheckpoint", pb.RestoreCheckpointRequest(id=0), grpc.StatusCode.INVALID_ARGUMENT, "got 0"),
               ("RestoreCheckpoint", pb.RestoreCheckpointRequest(id=99), grpc.StatusCode.NOT_FOUND,
                "checkpoint 99 does not exist")]
        for method, request, code, message in bad:
            with pytest.raises(EmbtierClientError) as err:
                c._call(method, request, idempotent=False)
            assert err.value.code == code and message in err.value.message, err.value.message
    cli = run_cli(d.target, "checkpoint")
    assert cli.returncode == 0 and "     2 full " in cli.stdout and " 20000 " in cli.stdout, cli.stdout + cli.stderr
    metrics = {s.name: s.value for f in text_string_to_metric_families(
        urllib.request.urlopen(f"http://{d.metrics}/metrics", timeout=10).read().decode()) for s in f.samples}
    assert metrics["embtier_checkpoint_rows_total"] == 40_000
    on_disk = sum(p.stat().st_size for p in (state / "checkpoints").glob("ckpt-*/*"))
    assert metrics["embtier_checkpoint_bytes_total"] == on_disk > 2 * 20_000 * 16 * 4
    assert metrics["embtier_checkpoint_duration_seconds_count"] == 2
    assert abs(metrics["embtier_checkpoint_last_success_timestamp_seconds"] - time.time()) < 60
    assert metrics["embtier_wal_bytes_total"] > 0 and metrics["embtier_wal_fsync_duration_seconds_count"] > 0
    d.proc.kill()
    d.proc.wait(timeout=30)
    assert sum(p.stat().st_size for p in (state / "wal").glob("wal-*.log")) < log_bytes
    d = start_daemon(state, config=config)
    with Client(d.target) as c:
        np.testing.assert_array_equal(c.lookup("w", np.arange(20_000)), expected)
    assert "restored checkpoint 2" in d.log()
    assert d.stop() == 0, d.log()
