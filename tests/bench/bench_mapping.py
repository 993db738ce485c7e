"""Benchmark of what an id -> row mapping does to a model's quality: the hash, frequency and learned
mappings of embtier_tools.mapping ("Learned Hash Functions") against a row per id, on a synthetic
click-through data set, and the learned one served through a real embtierd.

The data set (seeded, the same in every run of a size): D distinct ids (random int64; full 200K,
--quick 40K, --ids to change it) of one sparse feature and 5 D examples, each a bag of 4 to 12 ids
(uniform) and a click.
* Latent structure: the ids are dealt into G = D / 200 groups of equal size, the groups into topics
  of 10.  A group's effect is sqrt(0.5) x its topic's + sqrt(0.5) x its own (both N(0, 1), so the
  effect is N(0, 1) and the groups of a topic are correlated, r = 0.5); an id's effect is its
  group's plus N(0, 0.3^2) of its own.
* Popularity: the id of popularity rank r (ranks in random order of the ids) has weight r^-1.05
  (Zipf): the most popular id is in a fifth of the bags or more, most ids are seen in training 5
  times or fewer, a few percent never (some test ids are not in the training examples).
* Co-access: an example is one user's context.  Its primary group is drawn by popularity (the
  groups' summed weights); each id of the bag is drawn from the primary group with probability 0.6,
  from a group of the primary's topic with 0.25 (the group drawn by popularity within the topic) and
  from all ids with 0.15, the id within a group (or among all) by its weight.  Every id is accessed
  in proportion to its weight overall (the Zipf marginal is exact), and the ids a bag holds together
  are mostly of one group, then of one topic: co-access in bags says which ids have like effects,
  which is what the learned mapping reads (it never sees the groups, the effects or the clicks).
* Click: Bernoulli(sigmoid(-1.5 + mean over the bag of its ids' effects + N(0, 0.5^2))), about a
  fifth of the examples clicked.  The "oracle" line scores the test examples with their true click
  probabilities (the N(0, 0.5^2) integrated out): the best any model can do.
* Split: the examples are i.i.d.; the first 80 % train, the rest test.

Per row budget (rows = D / 4, D / 16, D / 64 by default; --budgets) and mapping kind:
* The mapping is built from the training examples' bags (a mapping.Trace: the ids in example order,
  the bag lengths): hash (build_hash: every id hashed over all rows), frequency (build_frequency: the
  rows / 2 most frequent ids get rows of their own, the rest hashed into the other half) and learned
  (build_learned with its defaults: the same frequent ids, every other id seen in training clustered
  by co-access into the other half, unseen ids hashed there), each with the seed of the run.
* The model: an EmbeddingBag of rows x 16 (mean pooling, rows N(0, 0.01^2) at first) indexed by
  mapping.rows_of(ids) of the bag's ids, then an MLP 16 -> 32 -> ReLU -> 1, binary cross-entropy;
  2 epochs over the training examples in batches of 2048 (reshuffled each epoch), Adam (SparseAdam
  for the embedding, lazy: a row's moments move only when it is read) at lr 0.01 decaying linearly
  to 0 over the run; 2 torch threads.  (3 epochs at a constant lr overfit: the row-per-id reference
  came out worse than every hashed table.  1 epoch left the spread over seeds larger than the gaps
  between kinds; the decay to 0 is what narrows it.)
* Per seed (0, 1, 2; --seeds N for N of them) the mapping's seed, the model's initial values and the
  batch order change, the data set does not.  Held-out log loss, normalized entropy (the log loss /
  the entropy of the training examples' click rate) and AUC (from numpy ranks, ties averaged) on the
  test examples, each as the mean over seeds with the spread (max - min over seeds); then the share
  of colliding pairs of the training ids that are of one group (mapping.stats over the distinct
  training ids, first seed; about 1 / G for a random mapping), the seconds to build a mapping and to
  train a model (means over seeds) and the line's wall time.
* A no-collision reference, once (first seed): a row for each id of the training examples, the
  test ids not seen in training all read one extra row, untrained.

Targets (printed, not asserted): at every budget below 1/4, held-out log loss learned < frequency <
hash, each gap (the difference of the means over seeds) larger than the spread of either kind it
separates; with, for information, how many seeds the lower kind won (the same seed: the same batch
order and initial values).

Serving check: for the learned mapping at 1/16 (or at the largest budget divisor given, if 1/16 is
not) and the first seed, an embtierd (DRAM 256M, no CXL, tiering off) gets a MAPPED table with that
mapping (key_seed and mapping_hash_from from the Mapping; ExportMapping must give it back), the
trained rows written by row (write_rows by_row, 65536 rows a call), then the test examples' raw int64
ids go through LookupPooled (mode mean, 16384 bags a call) and the trained MLP scores the pooled
vectors here.  Reported: the largest difference from the in-process model of the pooled vectors and
of the predicted click probabilities, and the held-out log loss of both paths.  The daemon is
stopped with SIGTERM and its exit status must be 0.

Each section prints its lines as soon as it has measured them, with its wall time; one that fails is
reported (its traceback on stderr), the next one runs, and the exit status is 1.

Run as a script (it imports bench_kernels and bench_keyed from its own directory):
  .venv/bin/python tests/bench/bench_mapping.py [--quick] [--ids N] [--budgets 4,16,64] [--seeds N] [--dir D]
The full run takes about 7 minutes on 2 shared cores, --quick about a minute.
"""

from __future__ import annotations

import argparse
import math
import os
import platform
import shutil
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from functools import cached_property
from pathlib import Path

# torch's OpenMP threads sleep when idle instead of spinning: set before torch starts its runtime.  On a
# shared 2-core host a spinning thread waits for a core someone else holds, and training ran 20x slower.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import numpy as np
import torch
from bench_kernels import Sections, log
from bench_keyed import distinct_keys
from embtier import Client
from embtier_tools import mapping
from embtier_tools.daemon import free_port, start

DATA_SEED = 2024
IDS_PER_GROUP = 200
GROUPS_PER_TOPIC = 10
TOPIC_SHARE = 0.5            # of a group's effect's variance, from its topic
ID_EFFECT_SD = 0.3
ZIPF_S = 1.05
EXAMPLES_PER_ID = 5
BAG_LENGTHS = (4, 12)        # inclusive
PRIMARY_SHARE, TOPIC_DRAW_SHARE = 0.6, 0.25   # of a bag's ids; the rest from all ids
CLICK_BIAS = -1.5
CLICK_NOISE_SD = 0.5
TRAIN_SHARE = 0.8
ORACLE_POINTS = 20

KINDS = ("hash", "frequency", "learned")
FREQUENT_SHARE = 0.5
DIM = 16
HIDDEN = 32
INIT_SD = 0.01
EPOCHS = 2
BATCH_BAGS = 2048
LEARNING_RATE = 0.01
TORCH_THREADS = 2
EVAL_BAGS = 65536
FULL_BUDGET = 4              # the targets are for the budgets below 1 / FULL_BUDGET

SERVING_BUDGET = 16
SERVING_TABLE = "clicks"
WRITE_CHUNK_ROWS = 65536
LOOKUP_CHUNK_BAGS = 16384
TIER_FLAGS = ("--dram-bytes", "256M", "--cxl-bytes", "0", "--scm-bytes", "64M")


@dataclass(frozen=True)
class Plan:
    ids: int
    budgets: tuple[int, ...]      # rows = ids / budget
    seeds: int

    @property
    def examples(self) -> int:
        return self.ids * EXAMPLES_PER_ID

    @property
    def groups(self) -> int:
        return max(GROUPS_PER_TOPIC, self.ids // IDS_PER_GROUP)

    @property
    def serving_budget(self) -> int:
        return SERVING_BUDGET if SERVING_BUDGET in self.budgets else max(self.budgets)


FULL = Plan(ids=200_000, budgets=(4, 16, 64), seeds=3)
QUICK = Plan(ids=40_000, budgets=(4, 16, 64), seeds=3)


# ---- the data set -------------------------------------------------------------------------------

@dataclass(frozen=True)
class Clicks:
    """Examples: bags of ids (int64, concatenated; lengths int32) and their clicks (float32 0 / 1)."""

    ids: np.ndarray
    lengths: np.ndarray
    labels: np.ndarray

    @property
    def offsets(self) -> np.ndarray:
        return np.concatenate([[0], np.cumsum(self.lengths[:-1], dtype=np.int64)])

    def take(self, examples: np.ndarray) -> Clicks:
        """The examples of the given indices, in that order."""
        return Clicks(self.ids[ragged_positions(self.offsets[examples], self.lengths[examples])],
                      self.lengths[examples], self.labels[examples])


def ragged_positions(starts: np.ndarray, lengths: np.ndarray) -> np.ndarray:
    """The positions starts[i] .. starts[i] + lengths[i] - 1 of every i, in order."""
    ends = np.cumsum(lengths, dtype=np.int64)
    return np.repeat(starts - (ends - lengths), lengths) + np.arange(ends[-1] if ends.size else 0)


@dataclass(frozen=True)
class DataSet:
    train: Clicks
    test: Clicks
    ids: np.ndarray          # the distinct ids
    groups: np.ndarray       # the group of each
    test_oracle: np.ndarray  # the test examples' true click probabilities (the noise integrated out)

    @property
    def base_rate(self) -> float:
        return float(self.train.labels.mean())

    @cached_property
    def seen(self) -> np.ndarray:
        """The distinct ids of the training examples, ascending."""
        return np.unique(self.train.ids)


def draw_by_weight(cumulative: np.ndarray, low: np.ndarray, width: np.ndarray, rng: np.random.Generator
                   ) -> np.ndarray:
    """For each draw, the index i whose span of cumulative (the running sum of weights) holds a point
    uniform in [low, low + width): an index drawn by weight within the span."""
    at = np.searchsorted(cumulative, low + rng.random(low.size) * width, side="right")
    return np.minimum(at, cumulative.size - 1)


def click_data(plan: Plan) -> DataSet:
    """The module docstring's data set of plan.ids distinct ids."""
    rng = np.random.default_rng(DATA_SEED)
    n, groups_count = plan.ids, plan.groups
    topics_count = -(-groups_count // GROUPS_PER_TOPIC)
    ids = distinct_keys(n, rng)
    weight = rng.permutation(np.arange(1, n + 1, dtype=np.float64)) ** -ZIPF_S
    group = rng.permutation(n) % groups_count
    topic_of_group = np.arange(groups_count) // GROUPS_PER_TOPIC
    group_effect = (math.sqrt(TOPIC_SHARE) * rng.normal(size=topics_count)[topic_of_group]
                    + math.sqrt(1 - TOPIC_SHARE) * rng.normal(size=groups_count))
    id_effect = group_effect[group] + ID_EFFECT_SD * rng.normal(size=n)

    by_group = np.argsort(group, kind="stable")            # ids by group, the groups by topic
    id_cumulative = np.cumsum(weight[by_group])
    group_weight = np.bincount(group, weight, groups_count)
    group_cumulative = np.cumsum(group_weight)
    topic_weight = np.bincount(topic_of_group, group_weight, topics_count)
    topic_cumulative = np.cumsum(topic_weight)
    total = id_cumulative[-1]

    examples = plan.examples
    lengths = rng.integers(BAG_LENGTHS[0], BAG_LENGTHS[1] + 1, examples).astype(np.int32)
    primary = draw_by_weight(group_cumulative, np.zeros(examples), np.full(examples, total), rng)
    slot_group = np.repeat(primary, lengths)
    draw = rng.random(slot_group.size)
    in_topic = (draw >= PRIMARY_SHARE) & (draw < PRIMARY_SHARE + TOPIC_DRAW_SHARE)
    topic = topic_of_group[slot_group[in_topic]]
    slot_group[in_topic] = draw_by_weight(group_cumulative, topic_cumulative[topic] - topic_weight[topic],
                                          topic_weight[topic], rng)
    anywhere = draw >= PRIMARY_SHARE + TOPIC_DRAW_SHARE
    low = group_cumulative[slot_group] - group_weight[slot_group]
    width = group_weight[slot_group]
    low[anywhere], width[anywhere] = 0.0, total
    slot_id = by_group[draw_by_weight(id_cumulative, low, width, rng)]

    starts = np.concatenate([[0], np.cumsum(lengths[:-1], dtype=np.int64)])
    logit = CLICK_BIAS + np.add.reduceat(id_effect[slot_id], starts) / lengths
    labels = (rng.random(examples) < sigmoid(logit + CLICK_NOISE_SD * rng.normal(size=examples))).astype(np.float32)
    clicks = Clicks(ids[slot_id], lengths, labels)
    cut = round(TRAIN_SHARE * examples)
    return DataSet(clicks.take(np.arange(cut)), clicks.take(np.arange(cut, examples)), ids, group,
                   noisy_sigmoid(logit[cut:], CLICK_NOISE_SD))


def sigmoid(x: np.ndarray) -> np.ndarray:
    return 1 / (1 + np.exp(-x))


def noisy_sigmoid(logit: np.ndarray, sd: float) -> np.ndarray:
    """E[sigmoid(logit + N(0, sd^2))], by Gauss-Hermite quadrature."""
    points, weights = np.polynomial.hermite_e.hermegauss(ORACLE_POINTS)
    return sigmoid(logit[:, None] + sd * points) @ (weights / weights.sum())


def data_summary(data: DataSet, plan: Plan, seconds: float) -> str:
    train, test = data.train, data.test
    seen = data.seen
    counts = np.bincount(np.searchsorted(seen, train.ids), minlength=seen.size)
    top = seen[counts.argmax()]
    train_bags = np.repeat(np.arange(train.lengths.size), train.lengths)
    unseen = ~np.isin(test.ids, seen)
    test_bags = np.repeat(np.arange(test.lengths.size), test.lengths)
    return "\n".join([
        (f"data ({seconds:.1f} s): {data.ids.size} distinct ids in {plan.groups} groups "
         f"({-(-plan.groups // GROUPS_PER_TOPIC)} topics of {GROUPS_PER_TOPIC}), Zipf s={ZIPF_S}; "
         f"{train.lengths.size} training and {test.lengths.size} test examples, bags of "
         f"{BAG_LENGTHS[0]}-{BAG_LENGTHS[1]} ids ({train.ids.size} training accesses)"),
        (f"  click rate: training {data.base_rate:.3f}, test {test.labels.mean():.3f}; ids seen in training "
         f"{seen.size} ({seen.size / data.ids.size:.1%}), {int((counts == 1).sum())} of them once, "
         f"{int((counts <= 5).sum())} at most 5 times; the most popular in "
         f"{np.unique(train_bags[train.ids == top]).size / train.lengths.size:.1%} of the training bags"),
        (f"  test accesses of ids never seen in training: {unseen.mean():.2%} (in "
         f"{np.unique(test_bags[unseen]).size / test.lengths.size:.1%} of the test bags)")])


# ---- the model ----------------------------------------------------------------------------------

class ClickModel(torch.nn.Module):
    """The mean of the bag's rows, then an MLP to the click's logit."""

    def __init__(self, num_rows: int) -> None:
        super().__init__()
        self.embedding = torch.nn.EmbeddingBag(num_rows, DIM, mode="mean", sparse=True)
        torch.nn.init.normal_(self.embedding.weight, std=INIT_SD)
        self.mlp = torch.nn.Sequential(torch.nn.Linear(DIM, HIDDEN), torch.nn.ReLU(), torch.nn.Linear(HIDDEN, 1))

    def forward(self, rows: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
        return self.head(self.embedding(rows, offsets))

    def head(self, pooled: torch.Tensor) -> torch.Tensor:
        return self.mlp(pooled).squeeze(1)


def batches(rows: np.ndarray, clicks: Clicks, order: np.ndarray, size: int):
    """(rows, offsets, labels) tensors of the examples order[i:i + size], i = 0, size, ..."""
    offsets = clicks.offsets
    for at in range(0, order.size, size):
        examples = order[at:at + size]
        lengths = clicks.lengths[examples]
        yield (torch.from_numpy(rows[ragged_positions(offsets[examples], lengths)]),
               torch.from_numpy(np.concatenate([[0], np.cumsum(lengths[:-1], dtype=np.int64)])),
               torch.from_numpy(clicks.labels[examples]))


def train(rows: np.ndarray, clicks: Clicks, num_rows: int, seed: int) -> ClickModel:
    """A model trained on the examples, each id read at rows[its position in clicks.ids]."""
    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    model = ClickModel(num_rows)
    optimizers = (torch.optim.SparseAdam(model.embedding.parameters(), lr=LEARNING_RATE),
                  torch.optim.Adam(model.mlp.parameters(), lr=LEARNING_RATE))
    loss_of = torch.nn.BCEWithLogitsLoss()
    steps = EPOCHS * -(-clicks.lengths.size // BATCH_BAGS)
    step = 0
    for _ in range(EPOCHS):
        for batch_rows, offsets, labels in batches(rows, clicks, rng.permutation(clicks.lengths.size), BATCH_BAGS):
            for optimizer in optimizers:
                optimizer.zero_grad()
                for group in optimizer.param_groups:
                    group["lr"] = LEARNING_RATE * (1 - step / steps)
            loss_of(model(batch_rows, offsets), labels).backward()
            for optimizer in optimizers:
                optimizer.step()
            step += 1
    return model


def predict(model: ClickModel, rows: np.ndarray, clicks: Clicks) -> np.ndarray:
    """Click probabilities (float64) of the examples."""
    with torch.no_grad():
        return np.concatenate([torch.sigmoid(model(r, o)).double().numpy()
                               for r, o, _ in batches(rows, clicks, np.arange(clicks.lengths.size), EVAL_BAGS)])


# ---- quality ------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Quality:
    log_loss: float
    ne: float
    auc: float


def log_loss(p: np.ndarray, labels: np.ndarray) -> float:
    p = np.clip(p, 1e-7, 1 - 1e-7)
    return float(-np.mean(labels * np.log(p) + (1 - labels) * np.log1p(-p)))


def auc(scores: np.ndarray, labels: np.ndarray) -> float:
    """Area under the ROC curve: the Mann-Whitney statistic from ranks (ties get their mean rank)."""
    _, inverse, counts = np.unique(scores, return_inverse=True, return_counts=True)
    mean_rank = np.cumsum(counts) - (counts - 1) / 2            # 1-based mean rank of each distinct score
    positive = labels > 0.5
    n_pos, n_neg = int(positive.sum()), int((~positive).sum())
    return float((mean_rank[inverse][positive].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


def quality(p: np.ndarray, labels: np.ndarray, base_rate: float) -> Quality:
    entropy = -(base_rate * math.log(base_rate) + (1 - base_rate) * math.log(1 - base_rate))
    loss = log_loss(p, labels)
    return Quality(loss, loss / entropy, auc(p, labels))


# ---- the grid -----------------------------------------------------------------------------------

@dataclass(frozen=True)
class Run:
    """One model: its mapping and what it scored."""

    mapping: mapping.Mapping
    model: ClickModel
    quality: Quality
    build_seconds: float
    train_seconds: float


def build(kind: str, trace: mapping.Trace, num_rows: int, seed: int) -> mapping.Mapping:
    options = {} if kind == "hash" else {"frequent_share": FREQUENT_SHARE}
    return mapping.BUILDERS[kind](trace, num_rows, seed=seed, **options)


def run_model(data: DataSet, make_mapping: Callable[[], mapping.Mapping], seed: int) -> Run:
    began = time.perf_counter()
    built = make_mapping()
    build_seconds = time.perf_counter() - began
    began = time.perf_counter()
    model = train(built.rows_of(data.train.ids), data.train, built.num_rows, seed)
    train_seconds = time.perf_counter() - began
    p = predict(model, built.rows_of(data.test.ids), data.test)
    return Run(built, model, quality(p, data.test.labels, data.base_rate), build_seconds, train_seconds)


def reference_mapping(data: DataSet) -> mapping.Mapping:
    """A row for each id seen in training; every other id reads the one row after them."""
    seen = data.seen
    return mapping.Mapping(seen, np.arange(seen.size), seen.size + 1, seen.size, 0, "reference")


COLUMNS = (("budget", 6, "<"), ("rows", 6, ">"), ("kind", 9, "<"), ("log loss", 8, ">"), ("spread", 7, ">"),
           ("NE", 6, ">"), ("spread", 6, ">"), ("AUC", 6, ">"), ("spread", 6, ">"), ("same-group", 10, ">"),
           ("build s", 7, ">"), ("train s", 7, ">"), ("wall s", 6, ">"))


def format_cells(cells: list[str]) -> str:
    return "  ".join(f"{c:{align}{width}}" for c, (_, width, align) in zip(cells, COLUMNS)).rstrip()


def table_head(plan: Plan) -> str:
    return "\n".join([
        "",
        (f"held-out quality per row budget (rows = ids / budget) and mapping kind: means over {plan.seeds} seed(s), "
         "spread = max - min over them;"),
        (f"  same-group = colliding pairs of training ids that are of one group (first seed; chance ~1/{plan.groups}); "
         "build / train s = means per seed; wall s = the line's"),
        format_cells([name for name, _, _ in COLUMNS]),
        format_cells(["-" * width for _, width, _ in COLUMNS])])


def spread(values: list[float]) -> float:
    return max(values) - min(values)


def quality_line(budget: str, rows: str, kind: str, qualities: list[Quality], same_group: str = "-",
                 build_seconds: str = "-", train_seconds: str = "-", wall_seconds: str = "-") -> str:
    losses, nes, aucs = ([getattr(q, k) for q in qualities] for k in ("log_loss", "ne", "auc"))
    return format_cells([
        budget, rows, kind, f"{np.mean(losses):.5f}", f"{spread(losses):.5f}", f"{np.mean(nes):.4f}",
        f"{spread(nes):.4f}", f"{np.mean(aucs):.4f}", f"{spread(aucs):.4f}", same_group, build_seconds,
        train_seconds, wall_seconds])


def runs_line(budget: str, runs: list[Run], same_group: str, began: float) -> str:
    first = runs[0].mapping
    return quality_line(budget, str(first.num_rows), first.kind, [r.quality for r in runs], same_group,
                        f"{np.mean([r.build_seconds for r in runs]):.1f}",
                        f"{np.mean([r.train_seconds for r in runs]):.1f}", f"{time.perf_counter() - began:.0f}")


def same_group_share(built: mapping.Mapping, data: DataSet) -> str:
    """The share of colliding pairs of the training ids within one group (pairs of distinct ids: their
    counts do not matter, so the trace is the distinct ids)."""
    return f"{mapping.stats(built, mapping.Trace(data.seen), (data.ids, data.groups)).same_group_share:.2%}"


def measure_oracle(data: DataSet) -> None:
    q = quality(data.test_oracle, data.test.labels, data.base_rate)
    print(quality_line("-", "-", "oracle", [q]) + "   (the true click probabilities)", flush=True)


def measure_reference(data: DataSet) -> None:
    began = time.perf_counter()
    log("reference: a row per id")
    run = run_model(data, lambda: reference_mapping(data), 0)
    print(runs_line("1/1", [run], "-", began) + "   (a row per training id, first seed)", flush=True)


def measure_kind(data: DataSet, plan: Plan, budget: int, kind: str, results: dict, kept: dict) -> None:
    began = time.perf_counter()
    trace = mapping.Trace(data.train.ids, data.train.lengths)
    num_rows = max(2, round(data.ids.size / budget))
    runs = []
    for seed in range(plan.seeds):
        log(f"1/{budget}, {kind}, seed {seed}")
        runs.append(run_model(data, lambda s=seed: build(kind, trace, num_rows, s), seed))
    results.setdefault(budget, {})[kind] = [r.quality.log_loss for r in runs]
    if budget == plan.serving_budget and kind == "learned":
        kept["run"] = runs[0]
    print(runs_line(f"1/{budget}", runs, same_group_share(runs[0].mapping, data), began), flush=True)


# ---- targets ------------------------------------------------------------------------------------

def verdict(ok: bool) -> str:
    return "met" if ok else "NOT met"


def target_lines(results: dict[int, dict[str, list[float]]]) -> list[str]:
    lines = ["", ("targets (printed, not asserted): held-out log loss learned < frequency < hash at every budget "
                  f"below 1/{FULL_BUDGET}, each gap of the means larger than the spread of either kind")]
    budgets = sorted(b for b in results if b > FULL_BUDGET)
    if not budgets:
        lines.append(f"  no budget below 1/{FULL_BUDGET} was measured")
    for budget in budgets:
        losses = results[budget]
        if any(kind not in losses for kind in KINDS):
            lines.append(f"  1/{budget}: not measured (a kind failed)")
            continue
        parts, ok = [], True
        for better, worse in (("learned", "frequency"), ("frequency", "hash")):
            gap = float(np.mean(losses[worse]) - np.mean(losses[better]))
            widest = max(spread(losses[better]), spread(losses[worse]))
            ok &= gap > widest
            wins = sum(b < w for b, w in zip(losses[better], losses[worse], strict=True))
            parts.append(f"{worse} - {better} = {gap:+.5f} (spread {widest:.5f}; {better} lower with "
                         f"{wins}/{len(losses[better])} seeds)")
        lines.append(f"  1/{budget}: " + "; ".join(parts) + f": {verdict(ok)}")
    return lines


# ---- serving through a daemon -------------------------------------------------------------------

def same_mapping(exported, built: mapping.Mapping) -> bool:
    """Whether the table's exported mapping (embtier.client.TableMapping) is built, up to the listed
    ids' order."""
    if (exported.num_rows, exported.hash_from, exported.seed, exported.ids.size) != (
            built.num_rows, built.hash_from, built.seed, built.ids.size):
        return False
    back = mapping.Mapping(exported.ids, exported.rows, exported.num_rows, exported.hash_from, exported.seed)
    return bool(np.array_equal(np.sort(exported.ids), np.sort(built.ids))
                and np.array_equal(back.rows_of(built.ids), built.rows))


def serve(built: mapping.Mapping, weights: np.ndarray, test: Clicks, state: Path) -> tuple[np.ndarray, str]:
    """The test bags' mean-pooled rows through an embtierd whose MAPPED table holds built and weights (its
    rows), and what was checked on the way."""
    home = state / "embtierd"
    home.mkdir(parents=True)
    config = home / "embtierd.toml"
    config.write_text("[tiering]\nenabled = false\n")
    log("serving: starting embtierd")
    daemon = start(home, [f"unix://{home / 'embtierd.sock'}"], f"127.0.0.1:{free_port()}", "--config", str(config),
                   *TIER_FLAGS)
    try:
        with Client(daemon.target, timeout=120) as client:
            client.create_table(SERVING_TABLE, built.num_rows, DIM, key_space="mapped", key_seed=built.seed,
                                mapping_ids=built.ids, mapping_rows=built.rows, mapping_hash_from=built.hash_from)
            exported = same_mapping(client.export_mapping(SERVING_TABLE), built)
            log(f"serving: writing {built.num_rows} rows")
            for at in range(0, built.num_rows, WRITE_CHUNK_ROWS):
                stop = min(at + WRITE_CHUNK_ROWS, built.num_rows)
                client.write_rows(SERVING_TABLE, np.arange(at, stop, dtype=np.int64), weights[at:stop], by_row=True)
            log(f"serving: pooling {test.lengths.size} test bags through LookupPooled")
            began = time.perf_counter()
            pooled = [client.lookup_pooled({SERVING_TABLE: (chunk.ids, chunk.lengths)}, mode="mean")[SERVING_TABLE]
                      for chunk in (test.take(np.arange(at, min(at + LOOKUP_CHUNK_BAGS, test.lengths.size)))
                                    for at in range(0, test.lengths.size, LOOKUP_CHUNK_BAGS))]
            lookup_seconds = time.perf_counter() - began
    finally:
        status = daemon.stop()
    if status != 0:
        raise RuntimeError(f"embtierd exited with status {status}; the end of its log:\n{daemon.log()[-2000:]}")
    if not exported:
        raise RuntimeError("the table's exported mapping differs from the one it was created with")
    return np.concatenate(pooled), (f"mapping exported back the same; {test.lengths.size} bags ({test.ids.size} "
                                    f"raw int64 ids) pooled in {lookup_seconds:.1f} s; embtierd exit status {status}")


def serving_check(run: Run, data: DataSet, budget: int, state: Path) -> None:
    began = time.perf_counter()
    built, model, test = run.mapping, run.model, data.test
    served, checked = serve(built, model.embedding.weight.detach().numpy(), test, state)
    rows = built.rows_of(test.ids)
    with torch.no_grad():
        local = model.embedding(torch.from_numpy(rows), torch.from_numpy(test.offsets)).numpy()
        p_served = torch.sigmoid(model.head(torch.from_numpy(served))).double().numpy()
    p_local = predict(model, rows, test)
    print("\n".join([
        "",
        (f"serving check: the learned mapping at 1/{budget} ({built.num_rows} rows, {built.ids.size} ids listed, "
         f"hash_from {built.hash_from}, seed {built.seed}) and its first seed's model, through embtierd "
         f"({time.perf_counter() - began:.1f} s)"),
        f"  {checked}",
        (f"  largest difference from the in-process model: pooled vectors {np.abs(served - local).max():.2e}, "
         f"click probabilities {np.abs(p_served - p_local).max():.2e}"),
        (f"  held-out log loss: served {log_loss(p_served, test.labels):.6f}, in process "
         f"{log_loss(p_local, test.labels):.6f}")]), flush=True)


# ---- main ---------------------------------------------------------------------------------------

def header(plan: Plan, quick: bool) -> str:
    cpu = next((ln.split(":", 1)[1].strip() for ln in Path("/proc/cpuinfo").read_text().splitlines()
                if ln.startswith("model name")), platform.processor())
    return "\n".join([
        (f"embtier mapping-quality benchmark ({'quick' if quick else 'full'} run): {plan.ids} ids, budgets "
         f"{', '.join(f'1/{b}' for b in plan.budgets)}, {plan.seeds} seed(s)"),
        (f"host: {cpu}, {os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.1f}; torch {torch.__version__} "
         f"({TORCH_THREADS} threads), numpy {np.__version__}"),
        (f"model: EmbeddingBag rows x {DIM} (mean) -> MLP {DIM}-{HIDDEN}-1; {EPOCHS} epoch(s), batch {BATCH_BAGS}, "
         f"Adam lr {LEARNING_RATE} decaying linearly to 0; frequent share {FREQUENT_SHARE}")])


def budgets_arg(text: str) -> tuple[int, ...]:
    try:
        budgets = tuple(int(b) for b in text.split(","))
    except ValueError:
        budgets = ()
    if not budgets or min(budgets) < 1:
        raise argparse.ArgumentTypeError(f"expected positive integers separated by commas, got {text!r}")
    return budgets


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help=f"{QUICK.ids} ids (about a minute)")
    parser.add_argument("--ids", type=int, help=f"distinct ids (default {FULL.ids}, --quick {QUICK.ids})")
    parser.add_argument("--budgets", type=budgets_arg, help="row budgets as divisors of the ids (default 4,16,64)")
    parser.add_argument("--seeds", type=int, help="seeds per budget and kind (default 3)")
    parser.add_argument("--dir", default=tempfile.gettempdir(), help="parent of the daemon's state directory")
    args = parser.parse_args()
    plan = QUICK if args.quick else FULL
    plan = replace(plan, ids=args.ids or plan.ids, budgets=args.budgets or plan.budgets,
                   seeds=args.seeds or plan.seeds)
    if plan.ids < 1000 or plan.seeds < 1:
        parser.error(f"--ids must be at least 1000 and --seeds at least 1, got {plan.ids} and {plan.seeds}")
    torch.set_num_threads(TORCH_THREADS)
    sections = Sections()
    started = time.perf_counter()
    print(header(plan, args.quick), flush=True)
    data: list[DataSet] = []
    log("making the data set")
    if not sections.run("the data set", lambda: data.append(click_data(plan))):
        return sections.exit_code()
    print(data_summary(data[0], plan, time.perf_counter() - started), flush=True)
    print(table_head(plan), flush=True)
    sections.run("oracle", measure_oracle, data[0])
    sections.run("reference", measure_reference, data[0])
    results: dict[int, dict[str, list[float]]] = {}
    kept: dict[str, Run] = {}
    for budget in plan.budgets:
        for kind in KINDS:
            sections.run(f"1/{budget} {kind}", measure_kind, data[0], plan, budget, kind, results, kept)
    print("\n".join(target_lines(results)), flush=True)
    if "run" in kept:
        state = Path(tempfile.mkdtemp(prefix="embtier-bench-mapping-", dir=args.dir))
        try:
            sections.run("serving check", serving_check, kept["run"], data[0], plan.serving_budget, state)
        finally:
            shutil.rmtree(state, ignore_errors=True)
    print(f"\ntotal time {time.perf_counter() - started:.0f} s", flush=True)
    return sections.exit_code()


if __name__ == "__main__":
    sys.exit(main())
