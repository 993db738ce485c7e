"""XRBench-style usage scenarios against embtierd: the scenario files, the score, and the driver.

XRBench (Kwon et al., "XRBench: An Extended Reality (XR) Machine Learning Benchmark Suite for the
Metaverse", MLSys 2023) runs a usage scenario, a set of models each at a target frame rate, some
cascaded on others, and scores how well a system keeps their deadlines.  Here each model is a
tenant of the daemon (gRPC metadata "embtier-tenant") whose inference is one LookupPooled of a
pooling shape of its own; deploy/scenarios/ holds three scenarios modelled on the paper's.

Where the formulas and constants come from.  The paper's own text could not be read from here; the
formulas below are those of the authors' reference implementation, github.com/XRBench/XRBench-MLSys2023
("A version of XRBench-MAESTRO used for MLSys 2023 publication"): its ScoringModule
(lib/include/heterogeneous-space-exploration/HET_scoring-module.hpp), InferenceLog.ComputeDelay
(HET_logger.hpp), the deadlines of its LoadGenerator (HET_load-generator.hpp), the frame drops of its
Runtime (HET_runtime.hpp) and "XRBench v0.1 default parameters" in XRBench-MAESTRO.cpp.  Its published
summary for VR gaming (XRbench_evaluation/eval_data/summary/) agrees with them: its per-model figures
give 86.466, its overall score is 86.466141 (the per-model figures are means of products, rounded).

    deadline of frame i     = its capture time + 1/FPS (the next frame's arrival); a cascaded model's
                              frame i is captured with its upstream's frame i, so the cascade shares it
    real-time score RT      = 1 / (1 + exp(k * (completion - deadline))), times in ms, k = 15 per ms
                              (0.5 at the deadline, 0.82 at 0.1 ms early, 3e-7 at 1 ms late)
    energy score EN         = (E_max - E) / E_max, E_max = 1500 (mJ per inference)
    inference score         = RT x EN  (the paper also names an accuracy score; the artefact has none)
    frame-drop rate         = dropped frames / frames
    QoE ("user-experience") = 1 - frame-drop rate
    model score             = (sum of the inference scores of the frames served / frames) x QoE
                              (a dropped frame scores 0 in the mean and counts again in the QoE)
    scenario score          = 100 x the mean of the model scores; overall = mean over scenarios

What is kept and what is fixed.  RT, the frame drops and QoE are kept as they are: they are what a
daemon's scheduling changes.  EN is fixed at 1 (left out): nothing here measures the energy of a lookup,
and an energy score without a measurement would be invented.  The accuracy score is fixed at 1: the
daemon returns exact pooled rows (float32 on the wire), so it cannot change a model's accuracy.  The
score of a run is therefore 100 x mean over tenants of QoE x (sum of RT over requests / frames).

Streams: how the load is scaled.  A shared inference host serves many users at once, each running
the whole scenario; the driver offers load the same way, as a number of concurrent STREAMS.  Each
stream is a full instance of the scenario: every model at its file's FPS with its file's deadline,
its cascades within the stream, at most one request in flight per (stream, model), as a model serves
one frame at a time.  The streams of a model all send as its tenant (the same metadata), so the
daemon's queue holds up to streams x models requests and its priorities and deadlines decide which
are served.  Frame rates and deadlines are never scaled.  A stream's clock is offset from the start
of the run (stream_offsets: one offset in each of `streams` equal slices of the longest frame period,
random within it, seeded by the scenario), so that the streams' frames do not all arrive at once;
each stream captures frames for the run's duration from its offset.

Capacity and --load.  The capacity of a daemon for a scenario (measure_capacity) is the requests/s it
answers closed-loop on the scenario's mix (each tenant's requests in proportion to its frame rate, a
fixed number of requests kept in flight, no timeouts) divided by the requests/s of one stream: the
number of streams whose offered rate it could serve.  Load x is streams_at_load(x, capacity) =
round(x x that number) streams, at least one (`embtier bench --load X` measures the capacity first).

The driver.  Each (stream, model) is a lane.  A concurrent model's frames are released on its
stream's clock; a cascaded model's frame becomes ready when its upstream lane's request for that
frame finishes, and exists only for the share `probability` of its upstream's frames (XRBench draws
at random; here every (1/p)-th frame, evenly, so that short runs are reproducible).  A frame waits
while its lane's previous request is in flight; the oldest waiting frame goes next, and a frame
whose deadline passes before it could be sent is DROPPED (never sent), as the artefact's runtime
drops late frames, and so is a cascaded frame whose upstream request failed (it has no input).  A
sent request carries its tenant and a gRPC timeout = the time left to its frame's deadline (the full
deadline for a frame sent when captured).  A request that fails (DEADLINE_EXCEEDED,
RESOURCE_EXHAUSTED, ...) or answers after its deadline is a deadline MISS: RT 0 for a failure (no
result: the artefact's infinite delay), the sigmoid of its lateness for a late answer.  Results are
reported per tenant over all its streams (the score above, unchanged), with the score of each stream
alone beside them.

Threads and the generator's own cost.  The load generator shares the host's cores with the daemon,
so it is kept light.  Each lane is a thread of its own (streams x models threads, a few hundred at
most) that sleeps until its next frame and sends it with a blocking call on its tenant's channel
(one channel per tenant, shared by its streams); a blocking gRPC call waits for its answer on a
completion queue of its own, in its own thread.  Asynchronous calls with one clock thread were
measured too and cost about twice the CPU per request at these rates (1.0 against 0.5 ms at 400
requests/s on 2 cores): each answer crosses the channel's polling thread before its callback runs.
Requests are serialized before the clock starts and replies are not parsed, so the Python cost per
request is one call.  A run reports the CPU time of this process over it: the generator's share of
the host.
"""

from __future__ import annotations

import itertools
import math
import os
import queue
import threading
import time
import tomllib
from collections import Counter, deque
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple, Self

import grpc
import numpy as np
from embtier.client import MAX_MESSAGE_BYTES, Client, EmbtierClientError, TlsOptions
from embtier.v1 import embtier_pb2 as pb
from embtier.wire import (
    ID_TYPES,
    POOL_MODES,
    TENANT_METADATA_KEY,
    TENANT_NAME_RE,
    TENANT_PRIORITIES,
    WIRE_DTYPES,
)

from embtier_tools.loadgen import ZipfIds

RT_K_PER_MS = 15.0              # XRBench v0.1 default (XRBench-MAESTRO.cpp: rt_score_param_k)
DEFAULT_ALPHA = 1.05            # Zipf exponent of a table's ids (as `embtier bench`)
REQUESTS_PER_MODEL = 64         # distinct requests drawn per tenant before the clock starts
_LOOKUP_POOLED = f"/{pb.DESCRIPTOR.services_by_name['EmbeddingStore'].full_name}/LookupPooled"  # the method's path


class ScenarioError(ValueError):
    """A scenario file that cannot be used; the message names the file and the field."""


# ---- scenarios ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Table:
    name: str
    rows: int
    dim: int
    alpha: float                # Zipf exponent of the ids read from it


@dataclass(frozen=True)
class Model:
    """One model of the scenario = one tenant of the daemon."""

    name: str
    fps: float                  # frames per second of one stream (a cascaded model: its upstream's)
    deadline_seconds: float     # after the frame's capture
    tables: tuple[str, ...]     # read by every request, each with bags x ids_per_bag ids
    bags: int
    ids_per_bag: int
    after: str | None           # the upstream model this one is cascaded on
    probability: float          # share of the upstream's frames that this model runs on


@dataclass(frozen=True)
class TenantSettings:
    """What the daemon's [tenants.NAME] table holds for one model."""

    priority: int
    deadline_ms: float
    max_in_flight: int


@dataclass(frozen=True)
class Scenario:
    name: str
    description: str
    seed: int
    tables: dict[str, Table]
    models: dict[str, Model]    # in file order
    tenants: dict[str, TenantSettings]

    @property
    def mode(self) -> str:
        """XRBench's execution mode: concurrent, cascaded, or cascaded-concurrent."""
        roots = sum(m.after is None for m in self.models.values())
        return "concurrent" if roots == len(self.models) else "cascaded" if roots == 1 else "cascaded-concurrent"

    def frames_per_second(self, name: str) -> float:
        """Frames per second one stream offers model name (its fps x the probabilities up its cascade)."""
        model, share = self.models[name], 1.0
        while model.after is not None:
            share *= model.probability
            model = self.models[model.after]
        return model.fps * share

    def offered_rate(self, streams: int = 1) -> float:
        """Requests per second the scenario offers with streams streams (every frame served)."""
        return streams * sum(self.frames_per_second(name) for name in self.models)

    @property
    def longest_period_seconds(self) -> float:
        """The time between two frames of its slowest concurrent model (a cascade runs on its upstream's)."""
        return 1.0 / min(m.fps for m in self.models.values() if m.after is None)


_REQUIRED = object()


class _Fields:
    """The keys of one table of a scenario file, each read checked; errors name the field."""

    def __init__(self, source: str, where: str, table: Any, known: Iterable[str]):
        self.source, self.where = source, where
        if not isinstance(table, dict):
            self.fail("", f"must be a table, got {table!r}")
        unknown = sorted(set(table) - set(known))
        if unknown:
            self.fail("", f"unknown key(s) {', '.join(unknown)}; known: {', '.join(sorted(known))}")
        self.table = table

    def fail(self, key: str, problem: str):
        field = f"{self.where}.{key}" if key else self.where
        raise ScenarioError(f"{self.source}: {field}: {problem}")

    def _value(self, key: str, default: Any) -> Any:
        if key in self.table:
            return self.table[key]
        if default is _REQUIRED:
            self.fail(key, "is required")
        return default

    def integer(self, key: str, low: int, high: int | None = None, default: Any = _REQUIRED) -> int:
        value = self._value(key, default)
        if isinstance(value, bool) or not isinstance(value, int) or value < low or (high is not None and value > high):
            self.fail(key, f"must be an integer {f'>= {low}' if high is None else f'in {low}..{high}'}, got {value!r}")
        return value

    def number(self, key: str, high: float | None = None, default: Any = _REQUIRED) -> float:
        """A number > 0 (and <= high)."""
        value = self._value(key, default)
        if isinstance(value, bool) or not isinstance(value, int | float) or not 0 < value <= (high or math.inf):
            self.fail(key, f"must be a number > 0{'' if high is None else f' and <= {high}'}, got {value!r}")
        return float(value)

    def string(self, key: str, default: Any = _REQUIRED) -> str:
        value = self._value(key, default)
        if not isinstance(value, str):
            self.fail(key, f"must be a string, got {value!r}")
        return value

    def names(self, key: str, among: dict, what: str) -> tuple[str, ...]:
        value = self._value(key, _REQUIRED)
        if not isinstance(value, list) or not value or not all(isinstance(v, str) for v in value):
            self.fail(key, f"must be a non-empty list of {what} names, got {value!r}")
        for name in value:
            if name not in among:
                self.fail(key, f"{name!r} is not a {what} of this file (known: {', '.join(among) or 'none'})")
        return tuple(value)


def _named_tables(source: str, doc: dict, section: str) -> dict[str, Any]:
    tables = doc.get(section, {})
    if not isinstance(tables, dict) or not tables:
        raise ScenarioError(f"{source}: {section}: needs at least one [{section}.NAME] table")
    for name in tables:
        if not TENANT_NAME_RE.fullmatch(name):
            raise ScenarioError(f"{source}: {section}.{name}: a name is 1-64 letters, digits, '_', '.' or '-'")
    return tables


def _model(source: str, name: str, table: Any, tables: dict[str, Table], upstream: Model | None) -> Model:
    f = _Fields(source, f"models.{name}", table,
                ("fps", "deadline_ms", "after", "probability", "tables", "bags", "ids_per_bag"))
    if upstream is None:
        if "probability" in table:
            f.fail("probability", "is for a cascaded model (one with `after`)")
        fps, probability = f.number("fps"), 1.0
    else:
        fps = f.number("fps", default=upstream.fps)
        if fps != upstream.fps:
            f.fail("fps", f"a cascaded model runs on its upstream's frames: {fps:g} differs from "
                          f"models.{upstream.name}.fps = {upstream.fps:g}")
        probability = f.number("probability", high=1.0, default=1.0)
    return Model(name=name, fps=fps, deadline_seconds=f.number("deadline_ms", default=1000.0 / fps) / 1000.0,
                 tables=f.names("tables", tables, "table"), bags=f.integer("bags", 1),
                 ids_per_bag=f.integer("ids_per_bag", 1), after=upstream.name if upstream else None,
                 probability=probability)


def _models(source: str, doc: dict, tables: dict[str, Table]) -> dict[str, Model]:
    """The [models.NAME] tables, each upstream read before the models cascaded on it."""
    raw = _named_tables(source, doc, "models")
    models: dict[str, Model] = {}

    def read(name: str, chain: tuple[str, ...]) -> Model:
        if name in models:
            return models[name]
        after = raw[name].get("after") if isinstance(raw[name], dict) else None
        upstream = None
        if after is not None:
            if not isinstance(after, str) or after not in raw:
                raise ScenarioError(f"{source}: models.{name}.after: {after!r} is not a model of this file "
                                    f"(known: {', '.join(raw)})")
            if after in chain:
                raise ScenarioError(f"{source}: models.{name}.after: cascade loop "
                                    f"{' -> '.join((*chain, after))}")
            upstream = read(after, (*chain, after))
        models[name] = _model(source, name, raw[name], tables, upstream)
        return models[name]

    for name in raw:
        read(name, (name,))
    return {name: models[name] for name in raw}


def _tenants(source: str, doc: dict, models: dict[str, Model]) -> dict[str, TenantSettings]:
    daemon = doc.get("daemon", {})
    if not isinstance(daemon, dict) or set(daemon) - {"tenants"}:
        raise ScenarioError(f"{source}: daemon: holds only [daemon.tenants.NAME] tables")
    raw = daemon.get("tenants", {})
    if not isinstance(raw, dict):
        raise ScenarioError(f"{source}: daemon.tenants: must hold [daemon.tenants.NAME] tables")
    missing = [name for name in models if name not in raw]
    if missing:
        raise ScenarioError(f"{source}: daemon.tenants.{missing[0]}: missing: every model is a tenant the daemon "
                            f"must know (priority, deadline_ms, max_in_flight)")
    tenants = {}
    for name, table in raw.items():
        if name not in models:
            raise ScenarioError(f"{source}: daemon.tenants.{name}: no model of that name in [models]")
        f = _Fields(source, f"daemon.tenants.{name}", table, ("priority", "deadline_ms", "max_in_flight"))
        tenants[name] = TenantSettings(priority=f.integer("priority", *TENANT_PRIORITIES),
                                       deadline_ms=f.number("deadline_ms"),
                                       max_in_flight=f.integer("max_in_flight", 1))
    return tenants


def parse_scenario(text: str, source: str = "<scenario>") -> Scenario:
    """A scenario from the text of its TOML file (source names it in errors)."""
    try:
        doc = tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        raise ScenarioError(f"{source}: not valid TOML: {e}") from None
    unknown = sorted(set(doc) - {"scenario", "tables", "models", "daemon"})
    if unknown:
        raise ScenarioError(f"{source}: unknown top-level key(s) {', '.join(unknown)}; "
                            f"known: daemon, models, scenario, tables")
    head = _Fields(source, "scenario", doc.get("scenario", {}), ("name", "description", "seed"))
    tables = {}
    for name, table in _named_tables(source, doc, "tables").items():
        f = _Fields(source, f"tables.{name}", table, ("rows", "dim", "alpha"))
        tables[name] = Table(name, f.integer("rows", 1), f.integer("dim", 1), f.number("alpha", default=DEFAULT_ALPHA))
    models = _models(source, doc, tables)
    return Scenario(name=head.string("name"), description=head.string("description", ""),
                    seed=head.integer("seed", 0, default=0), tables=tables, models=models,
                    tenants=_tenants(source, doc, models))


def load_scenario(path: str | Path) -> Scenario:
    try:
        text = Path(path).read_text()
    except OSError as e:
        raise ScenarioError(f"{path}: cannot read it: {e.strerror}") from None
    return parse_scenario(text, str(path))


def daemon_config(scenario: Scenario, streams: int = 1) -> str:
    """The daemon's [tenants.NAME] tables for the scenario run with up to streams streams, as TOML to
    append to its configuration: max_in_flight is the file's, raised to streams where that is less
    (the driver keeps one request per stream in flight for each tenant, which is never refused)."""
    return "".join(f"[tenants.{name}]\npriority = {t.priority}\ndeadline_ms = {t.deadline_ms!r}\n"
                   f"max_in_flight = {max(t.max_in_flight, streams)}\n\n" for name, t in scenario.tenants.items())


# ---- the score (pure functions over arrays) -----------------------------------------------------


def realtime_scores(finish_seconds: np.ndarray, deadline_seconds: np.ndarray, k_per_ms: float = RT_K_PER_MS
                    ) -> np.ndarray:
    """XRBench's RT = 1 / (1 + exp(k (completion - deadline))), the delay in ms; a failed request
    (finish = inf) scores 0.  Written as (1 - tanh(x / 2)) / 2, which does not overflow."""
    delay_ms = (np.asarray(finish_seconds, dtype=np.float64) - np.asarray(deadline_seconds, dtype=np.float64)) * 1e3
    return 0.5 * (1.0 - np.tanh(0.5 * k_per_ms * delay_ms))


def frame_drop_rate(dropped: int, frames: int) -> float:
    """Dropped frames / frames; a model that had no frame at all has dropped everything (as the artefact)."""
    return dropped / frames if frames else 1.0


def qoe_score(dropped: int, frames: int) -> float:
    return 1.0 - frame_drop_rate(dropped, frames)


def model_score(rt: np.ndarray, dropped: int) -> float:
    """XRBench's per-model score: the inference scores (RT here) of the frames sent, summed over every
    frame (a dropped one adds 0), times QoE.  rt: one per request sent; dropped: frames never sent."""
    frames = len(rt) + dropped
    return float(np.sum(rt)) / frames * qoe_score(dropped, frames) if frames else 0.0


def scenario_score(model_scores: Iterable[float]) -> float:
    """100 x the mean of the model scores (overall, over scenarios: the mean of these)."""
    scores = list(model_scores)
    return 100.0 * sum(scores) / len(scores) if scores else 0.0


# ---- the schedule -------------------------------------------------------------------------------


class Frame(NamedTuple):
    stream: int
    index: int                  # the frame number of the stream's root model clock
    release: float              # capture time, seconds from the start of the run
    deadline: float             # release + the model's deadline


class FrameResult(NamedTuple):
    stream: int
    index: int
    release: float
    deadline: float
    issue: float                # when the request was sent (nan: DROPPED, never sent)
    finish: float               # when its answer (or error) came back (nan: DROPPED)
    code: str                   # "OK", a grpc.StatusCode name, or "DROPPED"


DROPPED = "DROPPED"
START_SECONDS = 0.05            # from starting the lanes' threads to the first frame: they are all up


def stream_offsets(scenario: Scenario, streams: int) -> np.ndarray:
    """Each stream's clock offset in seconds from the start of the run: stream s's offset is random
    (seeded by the scenario's seed) in the s-th of `streams` equal slices of the longest frame period,
    so that the streams' frames spread over it."""
    if streams < 1:
        raise ValueError(f"streams must be >= 1, got {streams}")
    jitter = np.random.default_rng([scenario.seed, streams]).random(streams)
    return scenario.longest_period_seconds * (np.arange(streams) + jitter) / streams


def streams_at_load(load: float, capacity_streams: float) -> int:
    """The streams offered at load x the capacity (in streams): round(load x capacity), at least one."""
    if load <= 0:
        raise ValueError(f"load must be > 0, got {load}")
    return max(1, round(load * capacity_streams))


def release_times(fps: float, duration_seconds: float, offset_seconds: float = 0.0) -> np.ndarray:
    """Capture times of a concurrent model's frames in [offset, offset + duration): every 1 / fps s."""
    return offset_seconds + np.arange(math.ceil(duration_seconds * fps - 1e-9)) / fps


def triggered(n: int, probability: float) -> bool:
    """Whether a cascaded model runs on the n-th (from 0) frame its upstream served: a share
    `probability` of them, evenly spaced, the first included."""
    return math.floor(n * probability + 1e-9) != math.floor((n - 1) * probability + 1e-9)


def take_frame(pending: deque[Frame], now: float) -> tuple[Frame | None, list[Frame]]:
    """(the oldest pending frame that can still make its deadline, the frames before it that cannot:
    dropped); both are removed from pending."""
    expired = []
    while pending and pending[0].deadline <= now:
        expired.append(pending.popleft())
    return (pending.popleft() if pending else None), expired


Send = Callable[[float | None], str]   # timeout in seconds (None: none) -> "OK" or the status code's name


class _Lane:
    """One model of one stream, on a thread of its own: takes its frames (its stream's clock, or its
    upstream lane's answers), sends them one at a time."""

    def __init__(self, stream: int, model: Model, send: Send, clock: Callable[[], float],
                 releases: np.ndarray | None):
        self.stream, self.model, self.send, self.clock = stream, model, send, clock
        self.releases = releases.tolist() if releases is not None else None
        self.inbox: queue.SimpleQueue = queue.SimpleQueue()  # ((index, release), has_input); None: upstream done
        self.downstream: list[_Lane] = []   # the same stream's models cascaded on this one
        self.offered: Counter[str] = Counter()  # per downstream model: how many of our frames it was offered
        self.results: list[FrameResult] = []

    def run(self) -> None:
        try:
            self._loop()
        finally:  # even when it failed: its downstream stops waiting
            for d in self.downstream:
                d.inbox.put(None)

    def _loop(self) -> None:
        pending: deque[Frame] = deque()
        released, upstream_done = 0, False
        while True:
            now = self.clock()
            if self.releases is not None:
                while released < len(self.releases) and self.releases[released] <= now:
                    pending.append(self._frame(released, self.releases[released]))
                    released += 1
                done = released == len(self.releases)
            else:
                upstream_done = self._receive(pending, block=False) or upstream_done
                done = upstream_done
            frame, expired = take_frame(pending, now)
            for f in expired:
                self._drop(f)
            if frame is not None:
                self._serve(frame)
            elif done:
                return
            elif self.releases is not None:
                time.sleep(max(0.0, self.releases[released] - now))
            else:
                upstream_done = self._receive(pending, block=True)

    def _frame(self, index: int, release: float) -> Frame:
        return Frame(self.stream, index, release, release + self.model.deadline_seconds)

    def _receive(self, pending: deque[Frame], block: bool) -> bool:
        """Moves what the upstream sent into pending (frames without input are dropped); True when
        the upstream is done."""
        while True:
            try:
                item = self.inbox.get(block=block)
            except queue.Empty:
                return False
            if item is None:
                return True
            (index, release), has_input = item
            if has_input:
                pending.append(self._frame(index, release))
            else:
                self._drop(self._frame(index, release))
            block = False

    def _drop(self, frame: Frame) -> None:
        self.results.append(FrameResult(*frame, math.nan, math.nan, DROPPED))
        self._hand_on(frame, has_input=False)

    def _serve(self, frame: Frame) -> None:
        issue = self.clock()
        code = self.send(frame.deadline - issue)
        self.results.append(FrameResult(*frame, issue, self.clock(), code))
        self._hand_on(frame, has_input=code == "OK")

    def _hand_on(self, frame: Frame, has_input: bool) -> None:
        for d in self.downstream:
            n = self.offered[d.model.name]
            self.offered[d.model.name] += 1
            if triggered(n, d.model.probability):
                d.inbox.put(((frame.index, frame.release), has_input))


def run_schedule(scenario: Scenario, senders: dict[str, Send], duration_seconds: float,
                 offsets_seconds: Iterable[float] = (0.0,), clock: Callable[[], float] = time.perf_counter
                 ) -> dict[str, list[FrameResult]]:
    """Runs one stream of the scenario per offset, each for duration_seconds of frame captures from
    its offset (then lets the last requests finish): a thread per (stream, model), senders[model]
    sending one request of model (thread-safe: every stream's thread of the model calls it).  Per
    model, the results of its frames of every stream, stream by stream."""
    offsets = [float(o) for o in offsets_seconds]
    start = clock() + START_SECONDS

    def since_start() -> float:
        return clock() - start

    lanes = {(s, name): _Lane(s, m, senders[name], since_start,
                              release_times(m.fps, duration_seconds, offset) if m.after is None else None)
             for s, offset in enumerate(offsets) for name, m in scenario.models.items()}
    for (s, _), lane in lanes.items():
        if lane.model.after is not None:
            lanes[s, lane.model.after].downstream.append(lane)
    with ThreadPoolExecutor(len(lanes), thread_name_prefix="xrbench") as pool:
        running = {key: pool.submit(lane.run) for key, lane in lanes.items()}
    for (s, name), future in running.items():
        if future.exception() is not None:
            raise RuntimeError(f"xrbench: tenant {name}, stream {s} failed: {future.exception()!r}"
                               ) from future.exception()
    return {name: [r for s in range(len(offsets)) for r in lanes[s, name].results] for name in scenario.models}


# ---- the report ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class TenantReport:
    """One model's frames over every stream."""

    name: str
    frames_per_second: float    # offered, all streams together
    frames: int
    requests: int               # sent (frames - dropped)
    dropped: int
    deadline_met: int           # answered OK by the deadline
    errors: dict[str, int]      # failed requests per status code
    p50_ms: float               # latency of the requests answered OK (nan: none)
    p99_ms: float
    mean_rt: float              # mean real-time score of the requests sent (nan: none)
    qoe: float
    score: float                # XRBench model score, 0-1

    @property
    def deadline_met_fraction(self) -> float:
        return self.deadline_met / self.requests if self.requests else math.nan

    @property
    def frame_drop_rate(self) -> float:
        return frame_drop_rate(self.dropped, self.frames)


@dataclass(frozen=True)
class ScenarioReport:
    scenario: str
    mode: str
    streams: int
    duration_seconds: float     # of frame captures
    offered_rate: float         # requests per second offered (every frame of every stream)
    tenants: list[TenantReport]
    stream_scores: list[float]  # the score of each stream's frames alone, 0-100
    score: float                # 0-100
    elapsed_seconds: float      # the run's wall time: its threads' start to the last answer
    generator_cpu_seconds: float  # CPU time of the load generator (this process) over the run

    @property
    def requests(self) -> int:
        return sum(t.requests for t in self.tenants)

    @property
    def generator_cpu_share(self) -> float:
        """The load generator's share of the host's CPU time over the run (all its cores)."""
        return self.generator_cpu_seconds / (self.elapsed_seconds * (os.cpu_count() or 1))


def tenant_report(name: str, frames_per_second: float, results: list[FrameResult],
                  k_per_ms: float = RT_K_PER_MS) -> TenantReport:
    """The scores and figures of one tenant's frames."""
    sent = [r for r in results if r.code != DROPPED]
    dropped = len(results) - len(sent)
    ok = np.array([r.code == "OK" for r in sent], dtype=bool)
    finish = np.array([r.finish for r in sent], dtype=np.float64)
    deadline = np.array([r.deadline for r in sent], dtype=np.float64)
    rt = realtime_scores(np.where(ok, finish, np.inf), deadline, k_per_ms)
    latency_ms = (finish - np.array([r.issue for r in sent], dtype=np.float64))[ok] * 1e3
    p50, p99 = np.percentile(latency_ms, [50, 99]) if latency_ms.size else (math.nan, math.nan)
    return TenantReport(name=name, frames_per_second=frames_per_second, frames=len(results), requests=len(sent),
                        dropped=dropped, deadline_met=int(np.sum(ok & (finish <= deadline))),
                        errors=dict(Counter(r.code for r in sent if r.code != "OK")),
                        p50_ms=float(p50), p99_ms=float(p99), mean_rt=float(rt.mean()) if rt.size else math.nan,
                        qoe=qoe_score(dropped, len(results)), score=model_score(rt, dropped))


def results_score(results: list[FrameResult], k_per_ms: float = RT_K_PER_MS) -> float:
    """XRBench's model score of these frames (0-1)."""
    return tenant_report("", math.nan, results, k_per_ms).score


def stream_scores(results: dict[str, list[FrameResult]], streams: int) -> list[float]:
    """The scenario score of each stream's frames alone."""
    by_stream: dict[tuple[int, str], list[FrameResult]] = {}
    for name, rs in results.items():
        for r in rs:
            by_stream.setdefault((r.stream, name), []).append(r)
    return [scenario_score(results_score(by_stream.get((s, name), [])) for name in results) for s in range(streams)]


def scenario_report(scenario: Scenario, results: dict[str, list[FrameResult]], streams: int,
                    duration_seconds: float, elapsed_seconds: float = math.nan,
                    generator_cpu_seconds: float = math.nan) -> ScenarioReport:
    tenants = [tenant_report(name, streams * scenario.frames_per_second(name), results[name])
               for name in scenario.models]
    return ScenarioReport(scenario.name, scenario.mode, streams, duration_seconds, scenario.offered_rate(streams),
                          tenants, stream_scores(results, streams), scenario_score(t.score for t in tenants),
                          elapsed_seconds, generator_cpu_seconds)


def format_report(report: ScenarioReport) -> str:
    per_stream = report.offered_rate / report.streams
    lines = [(f"scenario {report.scenario} ({report.mode}), {report.streams} stream{'s' * (report.streams > 1)}: "
              f"{report.offered_rate:.1f} requests/s offered ({per_stream:.1f} a stream) for "
              f"{report.duration_seconds:g} s, {report.requests / report.duration_seconds:.1f}/s sent"),
             (f"{'tenant':24} {'frames/s':>8} {'frames':>7} {'requests':>8} {'met %':>6} {'p50 ms':>8} "
              f"{'p99 ms':>8} {'drop %':>6} {'RT':>6} {'QoE':>6} {'score':>6}")]
    for t in report.tenants:
        lines.append(f"{t.name:24} {t.frames_per_second:8.1f} {t.frames:7d} {t.requests:8d} "
                     f"{100 * t.deadline_met_fraction:6.1f} {t.p50_ms:8.2f} {t.p99_ms:8.2f} "
                     f"{100 * t.frame_drop_rate:6.1f} {t.mean_rt:6.3f} {t.qoe:6.3f} {t.score:6.3f}")
    for t in report.tenants:
        if t.errors:
            lines.append(f"  {t.name}: failed requests: "
                         + ", ".join(f"{n} {code}" for code, n in sorted(t.errors.items())))
    low, mid, high = np.percentile(report.stream_scores, [0, 50, 100])
    lines.append(f"per-stream score: min {low:.1f}, median {mid:.1f}, max {high:.1f} over {report.streams} "
                 f"stream{'s' * (report.streams > 1)}")
    if report.requests and not math.isnan(report.generator_cpu_seconds):
        lines.append(f"load generator (this process): {1e3 * report.generator_cpu_seconds / report.requests:.2f} ms "
                     f"CPU per request sent, {100 * report.generator_cpu_share:.1f} % of the host's "
                     f"{os.cpu_count()} CPUs over the run")
    lines.append(f"score {report.score:.1f} / 100  (XRBench: 100 x mean over tenants of QoE x sum of real-time "
                 f"scores / frames, k = {RT_K_PER_MS:g}/ms; energy and accuracy scores fixed at 1)")
    return "\n".join(lines)


# ---- against a daemon ---------------------------------------------------------------------------


def ensure_tables(client: Client, scenario: Scenario) -> dict[str, int]:
    """Creates the scenario's tables that the daemon does not have; {table: its number of rows} (a
    table that exists keeps its own size)."""
    rows = {}
    for i, table in enumerate(scenario.tables.values()):
        try:
            rows[table.name] = client.describe(table.name).num_rows
        except EmbtierClientError as e:
            if e.code != grpc.StatusCode.NOT_FOUND:
                raise
            client.create_table(table.name, table.rows, table.dim, initializer="uniform", seed=scenario.seed + i,
                                init_scale=0.05)
            rows[table.name] = table.rows
    return rows


def request_pool(model: Model, ids: dict[str, ZipfIds], rng: np.random.Generator, count: int) -> list[bytes]:
    """count serialized LookupPooledRequests of the model's shape: bags x ids_per_bag Zipf ids per table."""
    lengths = np.full(model.bags, model.ids_per_bag, dtype="<i4").tobytes()
    n = model.bags * model.ids_per_bag
    return [pb.LookupPooledRequest(
        features=[pb.FeatureBags(table=t, ids=ids[t].draw(rng, n).astype("<i4").tobytes(), lengths=lengths,
                                 id_type=ID_TYPES["int32"]) for t in model.tables],
        mode=POOL_MODES["sum"], wire_dtype=WIRE_DTYPES["float32"]).SerializeToString() for _ in range(count)]


def _channel(target: str, tls: TlsOptions | None) -> grpc.Channel:
    options = [("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
               ("grpc.max_send_message_length", MAX_MESSAGE_BYTES)]
    return grpc.secure_channel(target, tls.credentials(), options) if tls else grpc.insecure_channel(target, options)


class _Tenants:
    """A channel per tenant and its requests, drawn before the clock starts; closed on leaving."""

    def __init__(self, target: str, scenario: Scenario, rows: dict[str, int], tls: TlsOptions | None):
        ids = {name: ZipfIds(rows[name], t.alpha, scenario.seed + i)
               for i, (name, t) in enumerate(scenario.tables.items())}
        self.channels = {name: _channel(target, tls) for name in scenario.models}
        self.requests = {name: request_pool(m, ids, np.random.default_rng([scenario.seed, i]), REQUESTS_PER_MODEL)
                         for i, (name, m) in enumerate(scenario.models.items())}

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc) -> None:
        for channel in self.channels.values():
            channel.close()

    def sender(self, name: str, channel: grpc.Channel | None = None) -> Send:
        """Sends the tenant's next request with its metadata and a timeout, blocking: its status code's
        name.  Bytes in, bytes out: the reply is not parsed.  Thread-safe (the requests are cycled by
        one C iterator)."""
        call = (channel or self.channels[name]).unary_unary(_LOOKUP_POOLED)
        requests, metadata = itertools.cycle(self.requests[name]), ((TENANT_METADATA_KEY, name),)

        def send(timeout_seconds: float | None) -> str:
            try:
                call(next(requests), timeout=timeout_seconds, metadata=metadata)
            except grpc.RpcError as e:
                return e.code().name
            return "OK"

        return send

    def warm_up(self) -> None:
        """One untimed request per tenant (connections up, first-touch costs paid); a refusal here
        (an unknown tenant, a missing table) is an error of the setup, not a deadline miss."""
        for name in self.channels:
            call = self.channels[name].unary_unary(_LOOKUP_POOLED)
            try:
                call(self.requests[name][0], timeout=30.0, metadata=((TENANT_METADATA_KEY, name),))
            except grpc.RpcError as e:
                hint = (" (is the scenario's [daemon.tenants] in the daemon's configuration? see "
                        "xrbench.daemon_config)" if e.code() == grpc.StatusCode.INVALID_ARGUMENT else "")
                raise RuntimeError(f"xrbench: the first request of tenant {name} failed: {e.code().name}: "
                                   f"{e.details()}{hint}") from None


def run_scenario(target: str, scenario: Scenario, rows: dict[str, int], streams: int = 1,
                 duration_seconds: float = 10.0, tls: TlsOptions | None = None) -> ScenarioReport:
    """streams streams of the scenario against the daemon at target (its tables already there:
    ensure_tables), their clocks offset by stream_offsets, scored."""
    offsets = stream_offsets(scenario, streams)
    with _Tenants(target, scenario, rows, tls) as tenants:
        tenants.warm_up()
        senders = {name: tenants.sender(name) for name in scenario.models}
        cpu, started = time.process_time(), time.perf_counter()
        results = run_schedule(scenario, senders, duration_seconds, offsets)
        elapsed, cpu = time.perf_counter() - started, time.process_time() - cpu
    return scenario_report(scenario, results, streams, duration_seconds, elapsed, cpu)


@dataclass(frozen=True)
class Capacity:
    clients: int
    seconds: float
    requests: int               # answered OK
    errors: dict[str, int]
    p50_ms: float
    p99_ms: float
    requests_per_second: float
    streams: float              # requests_per_second / the requests per second of one stream


def measure_capacity(target: str, scenario: Scenario, rows: dict[str, int], clients: int,
                     duration_seconds: float = 3.0, tls: TlsOptions | None = None) -> Capacity:
    """The scenario's mix (each tenant's requests in proportion to its frame rate) closed-loop: clients
    threads, each sending its next request when the last answers, without timeouts, for duration_seconds.
    Its capacity in streams is the requests/s answered OK / the requests/s of one stream."""
    names = list(scenario.models)
    rates = np.array([scenario.frames_per_second(n) for n in names])
    mix = np.random.default_rng(scenario.seed).choice(len(names), size=4096, p=rates / rates.sum())
    latencies: list[list[float]] = [[] for _ in range(clients)]
    codes: list[Counter[str]] = [Counter() for _ in range(clients)]
    stop = threading.Event()
    with _Tenants(target, scenario, rows, tls) as tenants:
        tenants.warm_up()

        def client(k: int) -> None:
            with _channel(target, tls) as channel:
                senders = [tenants.sender(n, channel) for n in names]
                for i in itertools.count(k * len(mix) // clients):
                    if stop.is_set():
                        return
                    start = time.perf_counter()
                    code = senders[mix[i % len(mix)]](None)
                    codes[k][code] += 1
                    if code == "OK":
                        latencies[k].append(time.perf_counter() - start)

        threads = [threading.Thread(target=client, args=(k,), daemon=True) for k in range(clients)]
        started = time.perf_counter()
        for t in threads:
            t.start()
        stop.wait(duration_seconds)
        stop.set()
        for t in threads:
            t.join()
        seconds = time.perf_counter() - started
    done = np.concatenate([np.asarray(x) for x in latencies]) * 1e3
    total = sum(codes, Counter())
    errors = {code: n for code, n in total.items() if code != "OK"}
    p50, p99 = np.percentile(done, [50, 99]) if done.size else (math.nan, math.nan)
    rate = done.size / seconds
    return Capacity(clients, seconds, int(done.size), errors, float(p50), float(p99), rate,
                    rate / scenario.offered_rate())


def format_capacity(capacity: Capacity, scenario: Scenario) -> str:
    errors = ", ".join(f"{n} {code}" for code, n in sorted(capacity.errors.items())) or "no errors"
    return (f"capacity of scenario {scenario.name}: {capacity.requests_per_second:.0f} requests/s closed-loop with "
            f"{capacity.clients} clients over {capacity.seconds:.1f} s (p50 {capacity.p50_ms:.2f} ms, "
            f"p99 {capacity.p99_ms:.2f} ms; {errors}) = {capacity.streams:.2f} streams of the scenario "
            f"({scenario.offered_rate():.1f} requests/s a stream)")


def bench(client: Client, args, tls: TlsOptions | None) -> None:
    """`embtier bench --scenario FILE [--streams N | --load X] [--duration S] [--capacity]`: --load X
    measures the capacity first (as --capacity, for --duration s) and runs streams_at_load(X, it)."""
    try:
        scenario = load_scenario(args.scenario)
        if args.streams is not None and args.load is not None:
            raise ScenarioError("give --streams or --load, not both")
        if args.streams is not None and args.streams < 1:
            raise ScenarioError(f"--streams must be >= 1, got {args.streams}")
        if args.load is not None and args.load <= 0:
            raise ScenarioError(f"--load must be > 0, got {args.load}")
        rows = ensure_tables(client, scenario)
        streams = args.streams or 1
        if args.capacity or args.load is not None:
            capacity = measure_capacity(args.target, scenario, rows, args.concurrency, args.duration, tls)
            print(format_capacity(capacity, scenario), flush=True)
            if args.capacity:
                return
            streams = streams_at_load(args.load, capacity.streams)
            print(f"load {args.load:g} = {streams} stream{'s' * (streams > 1)}", flush=True)
        print(format_report(run_scenario(args.target, scenario, rows, streams, args.duration, tls)))
    except (ScenarioError, RuntimeError) as e:
        raise SystemExit(f"embtier bench: {e}") from None
