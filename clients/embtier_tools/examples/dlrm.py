"""A small DLRM trained in process, then served with its embedding tables in embtier.

The model (Naumov et al.'s DLRM, sized down): a bottom MLP over 13 dense features, an
EmbeddingBagCollection of 8 tables, one sparse feature each, the pairwise dot products of the
bottom MLP's output and the 8 pooled vectors (interaction), and a top MLP over them to one logit.
The data is synthetic and shaped like Criteo's (13 log-scaled counts, 8 categorical features with
power-law ids; labels from a hidden rule the model can learn).

Steps: train --steps steps in process (TorchRec's EmbeddingBagCollection when TorchRec imports,
embtier.torch's otherwise); copy the tables into embtier (RemoteEmbeddingBagCollection.from_module,
streamed with progress); swap the remote collection in; serve held-out batches with the tables in
embtier and the MLPs in PyTorch, and check that the predictions equal the in-process model's.
Without --target it starts an embtierd of its own in a temporary directory.

    python -m embtier_tools.examples.dlrm [--target ADDR] [--steps N] [--rows N] [--save MODEL.pt]
"""

from __future__ import annotations

import argparse
import copy
import itertools
import shutil
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from embtier import Client
from embtier.torch import (
    TORCHREC,
    EmbeddingBagCollection,
    EmbeddingBagConfig,
    KeyedJaggedTensor,
    RemoteEmbeddingBagCollection,
)

from embtier_tools.daemon import free_port, start

DENSE_FEATURES = 13
SPARSE_FEATURES = 8
DIM = 16
ZIPF_EXPONENT = 1.05   # of the categorical ids


def cardinalities(largest: int) -> list[int]:
    """Rows of the 8 tables: largest, halving down to largest / 128 (Criteo's spread of sizes)."""
    return [max(2, largest >> i) for i in range(SPARSE_FEATURES)]


def table_configs(rows: list[int], dim: int = DIM) -> list:
    return [EmbeddingBagConfig(num_embeddings=n, embedding_dim=dim, name=f"t_cat_{i}", feature_names=[f"cat_{i}"])
            for i, n in enumerate(rows)]


def mlp(sizes: list[int], last_relu: bool) -> torch.nn.Sequential:
    layers: list[torch.nn.Module] = []
    for i, (n_in, n_out) in enumerate(itertools.pairwise(sizes)):
        layers.append(torch.nn.Linear(n_in, n_out))
        if last_relu or i < len(sizes) - 2:
            layers.append(torch.nn.ReLU())
    return torch.nn.Sequential(*layers)


class DLRM(torch.nn.Module):
    """Bottom MLP, embedding bags (sparse: any collection returning a KeyedTensor [batch, features
    x dim]), dot-product interaction, top MLP; forward -> logits [batch]."""

    def __init__(self, sparse: torch.nn.Module, features: int = SPARSE_FEATURES, dim: int = DIM,
                 bottom: tuple[int, ...] = (64, 32), top: tuple[int, ...] = (64, 32)) -> None:
        super().__init__()
        self.bottom = mlp([DENSE_FEATURES, *bottom, dim], last_relu=True)
        self.sparse = sparse
        vectors = features + 1
        self.register_buffer("pairs", torch.triu_indices(vectors, vectors, offset=1), persistent=False)
        self.top = mlp([dim + vectors * (vectors - 1) // 2, *top, 1], last_relu=False)
        self.features, self.dim = features, dim

    def forward(self, dense: torch.Tensor, sparse) -> torch.Tensor:
        x = self.bottom(dense)
        pooled = self.sparse(sparse).values().view(-1, self.features, self.dim)
        z = torch.cat([x.unsqueeze(1), pooled], dim=1)
        dots = torch.bmm(z, z.transpose(1, 2))[:, self.pairs[0], self.pairs[1]]
        return self.top(torch.cat([x, dots], dim=1)).squeeze(1)


@dataclass
class Batch:
    dense: torch.Tensor          # [batch, 13] float32
    sparse: object               # KeyedJaggedTensor of the 8 features
    labels: torch.Tensor         # [batch] float32, 0 or 1


def zipf_ids(rng: np.random.Generator, n: int, rows: int) -> np.ndarray:
    """n ids in [0, rows), bounded Zipf: rank r drawn with probability ~ 1 / r^ZIPF_EXPONENT, the ranks
    scattered over the rows by a fixed permutation (multiplication by a prime, modulo rows)."""
    u = rng.random(n)
    ranks = np.floor((1 + u * (rows ** (1 - ZIPF_EXPONENT) - 1)) ** (1 / (1 - ZIPF_EXPONENT))).astype(np.int64) - 1
    return (np.clip(ranks, 0, rows - 1) * 2654435761) % rows


def id_effect(ids: np.ndarray) -> np.ndarray:
    """The hidden rule's weight of an id: a fixed pseudo-random value in [-1, 1)."""
    return ((ids * 40503 + 17) % 1009) / 504.5 - 1.0


def criteo_batch(rng: np.random.Generator, batch: int, rows: list[int], pooling_factor: int = 1) -> Batch:
    """batch samples: 13 dense features log(1 + exponential counts), 8 categorical features of
    pooling_factor ids on average (1: one id a feature, as Criteo; more: bags of 1 to
    2 x pooling_factor - 1 ids), and labels drawn from a logistic rule over both."""
    counts = rng.exponential(scale=np.geomspace(1, 1000, DENSE_FEATURES), size=(batch, DENSE_FEATURES))
    dense = np.log1p(counts).astype(np.float32)
    if pooling_factor == 1:
        lengths = np.ones((len(rows), batch), dtype=np.int64)
    else:
        lengths = rng.integers(1, 2 * pooling_factor, size=(len(rows), batch))
    ids = [zipf_ids(rng, int(lengths[f].sum()), n) for f, n in enumerate(rows)]
    score = dense[:, :4].sum(axis=1) / 4 - 2.0
    for f, feature_ids in enumerate(ids):
        bag = np.repeat(np.arange(batch), lengths[f])
        score += np.bincount(bag, weights=id_effect(feature_ids), minlength=batch) / np.maximum(lengths[f], 1)
    labels = (rng.random(batch) < 1 / (1 + np.exp(-score))).astype(np.float32)
    sparse = KeyedJaggedTensor.from_lengths_sync(keys=[f"cat_{f}" for f in range(len(rows))],
                                                 values=torch.from_numpy(np.concatenate(ids)),
                                                 lengths=torch.from_numpy(lengths.reshape(-1)))
    return Batch(torch.from_numpy(dense), sparse, torch.from_numpy(labels))


def train(model: DLRM, rows: list[int], steps: int, batch: int, rng: np.random.Generator) -> list[float]:
    """steps of Adagrad on fresh batches; the loss of each."""
    optimizer = torch.optim.Adagrad(model.parameters(), lr=0.05)
    loss_fn = torch.nn.BCEWithLogitsLoss()
    losses = []
    model.train()
    for _ in range(steps):
        b = criteo_batch(rng, batch, rows)
        optimizer.zero_grad()
        loss = loss_fn(model(b.dense, b.sparse), b.labels)
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    model.eval()
    return losses


@contextmanager
def a_daemon(target: str | None) -> Iterator[str]:
    """target, or an embtierd of this process's own in a temporary directory (stopped, and the
    directory removed, on leaving)."""
    if target:
        yield target
        return
    state = Path(tempfile.mkdtemp(prefix="embtier-dlrm-"))
    try:
        daemon = start(state, [f"unix://{state / 'embtierd.sock'}"], f"127.0.0.1:{free_port()}")
        try:
            yield daemon.target
        finally:
            daemon.stop()
    finally:
        shutil.rmtree(state, ignore_errors=True)


def progress_line(table: str, done: int, total: int) -> None:
    sys.stderr.write(f"\r  {table}: {done}/{total} rows")
    if done == total:
        sys.stderr.write("\n")
    sys.stderr.flush()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m embtier_tools.examples.dlrm", description=__doc__.split("\n\n")[0])
    p.add_argument("--target", help="an embtierd to use (default: start one in a temporary directory)")
    p.add_argument("--rows", type=int, default=100_000, help="rows of the largest table (default: %(default)s)")
    p.add_argument("--steps", type=int, default=50, help="training steps (default: %(default)s)")
    p.add_argument("--batch", type=int, default=256)
    p.add_argument("--eval-batches", type=int, default=10)
    p.add_argument("--prefix", default="dlrm_", help="the tables' names in embtier start with this")
    p.add_argument("--wire-dtype", default="float32", choices=["float32", "float16"])
    p.add_argument("--save", metavar="MODEL.pt", help="also save the trained state_dict (for embtier import-torch)")
    p.add_argument("--torch-threads", type=int, default=1, help="torch's intra-op threads (default %(default)s: "
                   "on a small host the daemon needs the other cores, and a parallel region waits for its "
                   "slowest thread)")
    args = p.parse_args(argv)
    torch.set_num_threads(args.torch_threads)
    torch.manual_seed(0)
    rng = np.random.default_rng(0)
    rows = cardinalities(args.rows)
    model = DLRM(EmbeddingBagCollection(table_configs(rows)))
    print(f"DLRM: {DENSE_FEATURES} dense features, {SPARSE_FEATURES} tables of {', '.join(map(str, rows))} x {DIM} "
          f"({'TorchRec ' + TORCHREC if TORCHREC else 'embtier.torch.compat'} EmbeddingBagCollection)")
    started = time.perf_counter()
    losses = train(model, rows, args.steps, args.batch, rng)
    tenth = max(1, len(losses) // 10)
    print(f"trained {args.steps} steps of {args.batch} in {time.perf_counter() - started:.1f} s: loss "
          f"{np.mean(losses[:tenth]):.4f} (first steps) -> {np.mean(losses[-tenth:]):.4f} (last steps)")
    if args.save:
        torch.save(model.state_dict(), args.save)
        print(f"saved the state_dict to {args.save}")
    with a_daemon(args.target) as target, Client(target, timeout=120) as client:
        started = time.perf_counter()
        remote = RemoteEmbeddingBagCollection.from_module(model.sparse, client, table_prefix=args.prefix,
                                                          wire_dtype=args.wire_dtype, progress=progress_line)
        print(f"exported {len(rows)} tables ({sum(rows)} rows) into embtier at {target} in "
              f"{time.perf_counter() - started:.1f} s")
        served = copy.deepcopy(model)
        served.sparse = remote
        worst, seconds = 0.0, {"in process": 0.0, "embtier": 0.0}
        with torch.inference_mode():
            for _ in range(args.eval_batches):
                b = criteo_batch(rng, args.batch, rows)
                began = time.perf_counter()
                local = torch.sigmoid(model(b.dense, b.sparse))
                seconds["in process"] += time.perf_counter() - began
                began = time.perf_counter()
                remote_p = torch.sigmoid(served(b.dense, b.sparse))
                seconds["embtier"] += time.perf_counter() - began
                worst = max(worst, (local - remote_p).abs().max().item())
    tolerance = 1e-5 if args.wire_dtype == "float32" else 1e-2
    per_batch = ", ".join(f"{k} {v / args.eval_batches * 1e3:.2f} ms" for k, v in seconds.items())
    print(f"served {args.eval_batches} batches of {args.batch}: largest |p(in process) - p(embtier)| = "
          f"{worst:.2e} (tolerance {tolerance:g}); per batch: {per_batch}")
    return 0 if worst <= tolerance else 1


if __name__ == "__main__":
    sys.exit(main())
