"""Crash safety of the write-ahead log and checkpoints: real daemons killed with SIGKILL (or
stopped with SIGTERM) while writers, table churn, checkpoints and restores run, restarted on the
same state directory; what comes back is checked row by row against what the clients were told.

The check (History): every call is recorded with the times it was sent and answered.  A row's
value after a restart must be the value of some change that could have been the last one applied
to it: acknowledged, or cut off by the kill (it may or may not have landed), and not certainly
followed by an acknowledged change (one sent after it was answered).  A change the client was told
failed must never show.  Table existence is checked the same way (creations, drops, restores)."""

from __future__ import annotations

import contextlib
import functools
import math
import os
import signal
import subprocess
import threading
import time
import urllib.request
from dataclasses import dataclass

import grpc
import numpy as np
import pytest
from embtier import Client, EmbtierClientError
from embtier.v1 import embtier_pb2 as pb
from prometheus_client.parser import text_string_to_metric_families

from tests.support import daemon_args, run_cli, start_daemon

ROWS, DIM, WRITERS = 4000, 8, 4
CHURN_ROWS = 500
# The managed table m: its raw ids (from the whole int64 range), twice as many as it has rows, so
# that it fills and evicts; what an unknown id reads (no write's value: those are positive).
MANAGED_ROWS, MANAGED_DEFAULT = 200, -0.5
MANAGED_KEYS = np.unique(np.concatenate([
    [np.iinfo(np.int64).min, np.iinfo(np.int64).max, -1, 0],
    np.random.default_rng(7).integers(np.iinfo(np.int64).min, np.iinfo(np.int64).max, 2 * MANAGED_ROWS - 4,
                                      dtype=np.int64)]))
# (a short tiering interval: a managed table's ids are protected from eviction for one or two of them)
CONFIG = ('[tiering]\nenabled = false\ninterval_seconds = 0.1\n[durability]\nfsync = "always"\n'
          '[durability.checkpoints]\nkeep = 1000\n')


def state_dir(tmp_path) -> tuple:
    """(a fresh state directory, the daemon configuration file in it)."""
    state = tmp_path / "s"
    state.mkdir()
    config = state / "embtierd.toml"
    config.write_text(CONFIG)
    return state, config


# what a call cut off by the SIGKILL (or refused while the daemon drains) fails with
KILLED = {grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.CANCELLED, grpc.StatusCode.DEADLINE_EXCEEDED}


class DaemonGone(Exception):
    """A call was cut off: the daemon was killed or is stopping."""


@dataclass
class Event:
    """One call: what it changes, when it was sent and answered, and how it ended."""

    kind: str                 # "write", "create", "drop", "restore"
    table: str
    start: float
    end: float                # math.inf when cut off: it may have landed at any time after start
    outcome: str              # "acked", "failed", "cut off"
    rows: np.ndarray | None = None
    value: float = 0.0        # a write's value (every written row is filled with it)


class History:
    """The calls of one daemon's life, from every client thread."""

    def __init__(self):
        self.events: list[Event] = []
        self.unexpected: list[str] = []
        self._lock = threading.Lock()

    def run(self, kind: str, table: str, call, rows=None, value: float = 0.0, expected=()) -> bool:
        """Makes the call and records it; True when acknowledged.  A failure whose code is not in
        expected is a finding; DaemonGone when the call was cut off."""
        start = time.monotonic()
        try:
            call()
        except EmbtierClientError as e:
            cut = e.code in KILLED
            with self._lock:
                self.events.append(Event(kind, table, start, math.inf if cut else time.monotonic(),
                                         "cut off" if cut else "failed", rows, value))
                if not cut and e.code not in expected:
                    self.unexpected.append(f"{kind} {table}: {e.code.name}: {e.message}")
            if cut:
                raise DaemonGone from None
            return False
        with self._lock:
            self.events.append(Event(kind, table, start, time.monotonic(), "acked", rows, value))
        return True

    def of(self, table: str, kinds) -> list[Event]:
        return [e for e in self.events if e.table == table and e.kind in kinds]


def possible_last(events: list[Event]) -> list[Event]:
    """The events that may be the last one applied: not failed, and not certainly followed by an
    acknowledged one (sent after they were answered)."""
    latest = max((e.start for e in events if e.outcome == "acked"), default=-math.inf)
    return [e for e in events if e.outcome != "failed" and e.end >= latest]


def check_exists(history: History, table: str, exists: bool, existed: bool, golden_tables=()) -> None:
    """Whether table may exist after the restart (creations, drops and restores of the golden
    checkpoint, which holds golden_tables)."""
    events = history.of(table, ("create", "drop")) + [
        Event("restore", table, e.start, e.end, e.outcome) for e in history.of("*", ("restore",))]
    value = {"create": True, "drop": False, "restore": table in golden_tables}
    allowed = {value[e.kind] for e in possible_last(events)}
    if not any(e.outcome == "acked" for e in events):
        allowed.add(existed)
    assert exists in allowed, f"table {table!r} {'exists' if exists else 'is gone'}; the calls allow {allowed}"


def check_rows(history: History, table: str, got: np.ndarray, before: np.ndarray | None,
               golden: np.ndarray | None = None, evicted: float | None = None) -> None:
    """Every row of table ([rows, dim], each row one value) holds a value its calls allow: writes,
    creations (zeros), restores of the golden checkpoint (golden; None when the golden checkpoint
    has no such table: a restore drops it), or before when none certainly landed; or evicted, when
    given (a full managed table's unknown ids, whose rows other ids took)."""
    assert np.all(got.min(axis=1) == got.max(axis=1)), f"table {table!r}: a torn row"
    got, n = got[:, 0], got.shape[0]
    events = history.of(table, ("write", "create")) + [
        Event("restore", table, e.start, e.end, e.outcome) for e in history.of("*", ("restore",))]
    everywhere = np.arange(n)
    latest = np.full(n, -math.inf)
    for e in events:
        if e.outcome == "acked":
            rows = everywhere if e.rows is None else e.rows
            latest[rows] = np.maximum(latest[rows], e.start)
    ok = (latest == -math.inf) & (got == before) if before is not None else np.zeros(n, dtype=bool)
    if evicted is not None:
        ok |= got == evicted
    for e in events:
        if e.outcome == "failed" or (e.kind == "restore" and golden is None):
            continue
        rows = everywhere if e.rows is None else e.rows
        value = {"write": e.value, "create": 0.0}.get(e.kind)
        value = golden[rows] if value is None else value
        last = e.end >= latest[rows]
        ok[rows[last]] |= (got[rows] == value)[last]
    bad = np.flatnonzero(~ok)
    if bad.size:
        r = bad[0]
        told = [(e.kind, e.outcome, e.value, round(e.start, 3), round(e.end, 3)) for e in events
                if e.rows is None or r in e.rows]
        raise AssertionError(f"table {table!r}: {bad.size} row(s) hold what no call allows; row {r} holds {got[r]} "
                             f"(before {None if before is None else before[r]}), its calls: {told[-6:]}")


class Versions:
    """Values no two writes share."""

    def __init__(self):
        self._next, self._lock = 1, threading.Lock()

    def __call__(self) -> int:
        with self._lock:
            self._next += 1
            return self._next


def writer(target: str, history: History, versions: Versions, table: str, rows, seed: int, stop: threading.Event,
           expected=(), keys: np.ndarray | None = None) -> None:
    """Writes random subsets of rows of table, each write filled with a fresh version, until stop
    or the daemon is gone; with keys (a managed table), row r is the raw id keys[r]."""
    rng = np.random.default_rng(seed)
    with Client(target, timeout=10) as c:
        while not stop.is_set():
            ids = np.unique(rng.choice(rows, 40))
            version = versions()
            try:
                values = np.full((ids.size, DIM), version, dtype=np.float32)
                history.run("write", table, functools.partial(c.write_rows, table, ids if keys is None else keys[ids],
                                                              values), ids, version, expected)
            except DaemonGone:
                return


def churner(target: str, history: History, table: str, stop: threading.Event, pause: float = 0.03) -> None:
    """Drops and re-creates table, again and again."""
    expected = (grpc.StatusCode.NOT_FOUND, grpc.StatusCode.ALREADY_EXISTS)
    with Client(target, timeout=10) as c:
        try:
            while not stop.is_set():
                history.run("drop", table, lambda: c.drop_table(table), expected=expected)
                history.run("create", table, lambda: c.create_table(table, CHURN_ROWS, DIM), expected=expected)
                time.sleep(pause)
        except DaemonGone:
            return


def restorer(target: str, history: History, checkpoint_id: int, times: int, stop: threading.Event) -> None:
    """Restores checkpoint_id times times, spread over the round."""
    with Client(target, timeout=30) as c:
        try:
            for _ in range(times):
                if stop.wait(np.random.default_rng().uniform(0.05, 0.3)):
                    return
                history.run("restore", "*", lambda: c.restore(checkpoint_id))
        except DaemonGone:
            return


def checkpointer(target: str, taken: list, unexpected: list, stop: threading.Event) -> None:
    """Checkpoints of every kind, one after another (chains cut off at random points too; the
    quantized ones must never be what a restart recovers from)."""
    cycle = [("auto", 0), ("incremental", 0), ("incremental", 0), ("differential", 0), ("incremental", 8),
             ("full", 0), ("incremental", 0)]
    with Client(target, timeout=30) as c:
        while not stop.is_set():
            kind, bits = cycle[len(taken) % len(cycle)]
            try:
                c.checkpoint(kind, bits)
            except EmbtierClientError as e:
                if e.code not in KILLED:
                    unexpected.append(f"checkpoint: {e.code.name}: {e.message}")
                return
            taken.append(1)


def start_threads(*targets) -> list[threading.Thread]:
    threads = [threading.Thread(target=t, args=a) for t, *a in targets]
    for t in threads:
        t.start()
    return threads


def table_state(target: str, table: str) -> np.ndarray | None:
    with Client(target) as c:
        names = {t.name for t in c.tables()}
        return c.lookup(table, np.arange(c.describe(table).num_rows)) if table in names else None


def managed_state(target: str) -> tuple[np.ndarray, int]:
    """(the values of table m's ids MANAGED_KEYS [keys, dim], its live ids), checking that its lookups
    count as unknown exactly the ids that read the default row."""
    with Client(target) as c:
        got, unknown = c.lookup_counted("m", MANAGED_KEYS)
        info = c.describe("m")
    assert unknown == np.count_nonzero((got == MANAGED_DEFAULT).all(axis=1))
    assert MANAGED_KEYS.size - unknown == info.live_ids <= MANAGED_ROWS  # (no other ids are written)
    return got, info.live_ids


def golden_checkpoint(target: str) -> tuple[int, np.ndarray]:
    """Table w with a value of its own in every row (-1 - row), and the managed table m with no ids,
    checkpointed: (its id, w's values)."""
    golden = -1.0 - np.arange(ROWS)
    with Client(target) as c:
        c.create_table("m", MANAGED_ROWS, DIM, key_space="managed", default_value=MANAGED_DEFAULT)
        c.create_table("w", ROWS, DIM)
        c.write_rows("w", np.arange(ROWS), np.repeat(golden[:, None], DIM, axis=1).astype(np.float32))
        return c.checkpoint("full").id, golden


def test_acknowledged_changes_survive_sigkill_amid_churn_checkpoints_and_restores(tmp_path):
    """20 rounds: writers on w, a table dropped and re-created every 30 ms with writers of its own,
    writers of raw ids into the managed table m (which fills, evicts, and refuses new ids while all
    of its ids are protected), a table created per round, checkpoints of every kind, and in every
    other round a restore in flight; each round ends with SIGKILL at a random moment."""
    state, config = state_dir(tmp_path)
    rng = np.random.default_rng(0)
    d = start_daemon(state, config=config)
    golden_id, golden = golden_checkpoint(d.target)
    before, before_c, created, versions, taken, writes = golden.copy(), None, set(), Versions(), [], 0
    before_m, golden_m, evictions = np.full(MANAGED_KEYS.size, MANAGED_DEFAULT), np.full(MANAGED_KEYS.size,
                                                                                       MANAGED_DEFAULT), 0
    full = (grpc.StatusCode.RESOURCE_EXHAUSTED,)
    for round_ in range(20):
        history, stop, unexpected = History(), threading.Event(), []
        name = f"t{round_}"
        threads = start_threads(
            *[(writer, d.target, history, versions, "w", np.arange(k, ROWS, WRITERS), round_ * 10 + k, stop)
              for k in range(WRITERS)],
            *[(writer, d.target, history, versions, "c", np.arange(CHURN_ROWS), round_ * 10 + 5 + k, stop,
               (grpc.StatusCode.NOT_FOUND,)) for k in range(2)],
            *[(writer, d.target, history, versions, "m", np.arange(k, MANAGED_KEYS.size, 2), round_ * 10 + 7 + k,
               stop, full, MANAGED_KEYS) for k in range(2)],
            (churner, d.target, history, "c", stop),
            (_create_once, d.target, history, name),
            (checkpointer, d.target, taken, unexpected, stop),
            *([(restorer, d.target, history, golden_id, 1, stop)] if round_ % 2 else []))
        time.sleep(rng.uniform(0.3, 1.0))
        d.proc.kill()
        d.proc.wait(timeout=30)
        stop.set()
        for t in threads:
            t.join(timeout=60)
        assert history.unexpected == [] and unexpected == [], f"round {round_}: calls failed for another reason"
        writes += sum(e.outcome == "acked" for e in history.events if e.kind == "write")
        d = start_daemon(state, config=config)
        got_w, got_c = table_state(d.target, "w"), table_state(d.target, "c")
        with Client(d.target) as c:
            tables = {t.name for t in c.tables()}
        check_rows(history, "w", got_w, before, golden)
        got_m, live = managed_state(d.target)
        with Client(d.target) as c:
            evictions += c.describe("m").key_evictions  # (counted since the replay began)
        # a full table may have evicted any id not protected; one with room evicted none
        check_rows(history, "m", got_m, before_m, golden_m, MANAGED_DEFAULT if live == MANAGED_ROWS else None)
        before_m = got_m[:, 0]
        check_exists(history, "c", got_c is not None, before_c is not None)
        if got_c is not None:
            check_rows(history, "c", got_c, before_c)
        for table in created | {name}:
            check_exists(history, table, table in tables, table in created)
        created = {t for t in tables if t.startswith("t")}
        assert tables <= {"w", "m", "c", *created}
        before, before_c = got_w[:, 0], None if got_c is None else got_c[:, 0]
    assert writes > 200  # the writers really wrote, and were really cut off
    assert evictions > 0  # m was full and evicted ids
    assert sum(taken) > 10  # and checkpoints were taken (and some cut off) among them
    assert d.stop() == 0, d.log()


def _create_once(target: str, history: History, name: str) -> None:
    with Client(target, timeout=10) as c:
        try:
            history.run("create", name, lambda: c.create_table(name, 1000, 4, initializer="uniform", seed=len(name)))
        except DaemonGone:
            pass


@pytest.mark.parametrize("stop_with", [signal.SIGTERM, signal.SIGKILL], ids=["SIGTERM", "SIGKILL"])
def test_writes_racing_drops_and_creations_never_stop_a_restart(tmp_path, stop_with):
    """Three writers on t while another client drops and re-creates t every 30 ms: every restart
    starts, t holds what the calls allow, no write that failed shows."""
    state, config = state_dir(tmp_path)
    d = start_daemon(state, config=config)
    with Client(d.target) as c:
        c.create_table("t", CHURN_ROWS, DIM)
    history, stop, versions = History(), threading.Event(), Versions()
    threads = start_threads(*[(writer, d.target, history, versions, "t", np.arange(CHURN_ROWS), k, stop,
                               (grpc.StatusCode.NOT_FOUND,)) for k in range(3)],
                            (churner, d.target, history, "t", stop))
    time.sleep(3)
    d.proc.send_signal(stop_with)
    code = d.proc.wait(timeout=60)
    stop.set()
    for t in threads:
        t.join(timeout=60)
    assert code == (0 if stop_with == signal.SIGTERM else -signal.SIGKILL), d.log()
    assert history.unexpected == []
    failed = [e for e in history.events if e.kind == "write" and e.outcome == "failed"]
    acked = [e for e in history.events if e.kind == "write" and e.outcome == "acked"]
    assert len(failed) > 10 and len(acked) > 50  # the race was really run
    d = start_daemon(state, config=config)
    got = table_state(d.target, "t")
    check_exists(history, "t", got is not None, True)
    if got is not None:
        check_rows(history, "t", got, np.zeros(CHURN_ROWS))
    assert d.stop() == 0, d.log()


def test_writes_during_restores_wait_apply_to_the_restored_table_and_survive_sigkill(tmp_path):
    """Three writers on w while the golden checkpoint is restored five times: every write succeeds
    (they wait while a restore runs), and after SIGKILL every row holds what the calls allow."""
    state, config = state_dir(tmp_path)
    d = start_daemon(state, config=config)
    golden_id, golden = golden_checkpoint(d.target)
    history, stop, versions = History(), threading.Event(), Versions()
    threads = start_threads(*[(writer, d.target, history, versions, "w", np.arange(k, ROWS, 3), k, stop)
                              for k in range(3)])
    restores = threading.Thread(target=restorer, args=(d.target, history, golden_id, 5, threading.Event()))
    restores.start()
    restores.join(timeout=120)
    time.sleep(0.2)
    d.proc.kill()
    d.proc.wait(timeout=30)
    stop.set()
    for t in threads:
        t.join(timeout=60)
    assert history.unexpected == []
    assert sum(e.kind == "restore" and e.outcome == "acked" for e in history.events) == 5
    d = start_daemon(state, config=config)
    check_rows(history, "w", table_state(d.target, "w"), golden, golden)
    assert d.stop() == 0, d.log()


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


@pytest.fixture
def small_state_device(tmp_path):
    """A 16 MiB tmpfs for the state directory (a device that fills up), unmounted afterwards."""
    mount = tmp_path / "small"
    mount.mkdir()
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=16m,mode=0700", "tmpfs", str(mount)],
                          capture_output=True, text=True, check=False)
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {done.stderr.strip()}")
    yield mount
    subprocess.run(["umount", "-l", str(mount)], check=False)


def fill(path) -> None:
    """Fills the device of path up to the last byte."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT, 0o600)
    try:
        for size in (1 << 20, 4096, 1):
            with contextlib.suppress(OSError):
                while True:
                    os.write(fd, b"\0" * size)
    finally:
        os.close(fd)


def test_a_full_device_is_resource_exhausted_naming_the_path_and_writes_resume(tmp_path, small_state_device):
    state = small_state_device / "s"
    state.mkdir()
    config = state / "embtierd.toml"  # the SCM file needs O_DIRECT, which tmpfs lacks: it stays on disk
    config.write_text(CONFIG + f'[tiers.scm]\npath = "{tmp_path / "scm.dat"}"\n')
    d = start_daemon(state, config=config)
    with Client(d.target) as c:
        c.create_table("w", ROWS, DIM)
        c.write_rows("w", np.arange(10), np.full((10, DIM), 1, np.float32))
        fill(small_state_device / "filler")
        for call, where in [(lambda: c.write_rows("w", np.arange(100, 2100), np.full((2000, DIM), 2, np.float32)),
                             f"no space left on the device of {state / 'wal'}"),
                            (lambda: c.checkpoint("full"), f"no space left on the device of {state / 'checkpoints'}")]:
            with pytest.raises(EmbtierClientError) as err:
                call()
            assert err.value.code == grpc.StatusCode.RESOURCE_EXHAUSTED and where in err.value.message, err.value
        np.testing.assert_array_equal(c.lookup("w", [9, 100, 2000])[:, 0], [1, 0, 0])  # nothing half written
        (small_state_device / "filler").unlink()
        c.write_rows("w", np.arange(3000, 3010), np.full((10, DIM), 3, np.float32))  # room again: writes go on
        assert c.checkpoint("full").rows_written == ROWS
        c.write_rows("w", np.arange(3010, 3020), np.full((10, DIM), 4, np.float32))
    d.proc.kill()
    d.proc.wait(timeout=30)
    d = start_daemon(state, config=config)
    got = table_state(d.target, "w")[:, 0]
    expected = np.zeros(ROWS)
    expected[:10], expected[3000:3010], expected[3010:3020] = 1, 3, 4  # and the refused write never shows
    np.testing.assert_array_equal(got, expected)
    assert d.stop() == 0, d.log()
