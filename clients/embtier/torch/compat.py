"""TorchRec's sparse types as embtier.torch uses them, for when TorchRec is not installed.

The same names, constructor arguments and methods as TorchRec's (torchrec.EmbeddingBagConfig,
PoolingType, DataType, KeyedJaggedTensor, KeyedTensor, EmbeddingBagCollection), cut down to what
a pooled embedding-bag model reads: code written against these runs unchanged on TorchRec's.
embtier.torch exports TorchRec's own classes instead whenever TorchRec imports."""

from __future__ import annotations

import enum
from dataclasses import dataclass, field

import torch


class PoolingType(enum.Enum):
    SUM = "SUM"
    MEAN = "MEAN"
    NONE = "NONE"


class DataType(enum.Enum):
    FP32 = "FP32"
    FP16 = "FP16"


@dataclass
class EmbeddingBagConfig:
    """One table: num_embeddings rows of embedding_dim, read by feature_names (none: the table's
    name), each feature's bags pooled as pooling says."""

    num_embeddings: int
    embedding_dim: int
    name: str = ""
    data_type: DataType = DataType.FP32
    feature_names: list[str] = field(default_factory=list)
    pooling: PoolingType = PoolingType.SUM


class KeyedJaggedTensor:
    """Bags of ids per feature: values holds every id, feature after feature (keys' order), and
    lengths the bag sizes, stride bags per feature (feature-major: lengths[f * stride + b]);
    weights, if any, one per id."""

    def __init__(self, keys: list[str], values: torch.Tensor, weights: torch.Tensor | None = None,
                 lengths: torch.Tensor | None = None, offsets: torch.Tensor | None = None,
                 stride: int | None = None) -> None:
        if lengths is None:
            if offsets is None:
                raise ValueError("KeyedJaggedTensor needs lengths or offsets")
            lengths = offsets[1:] - offsets[:-1]
        self._keys = list(keys)
        self._values = values
        self._weights = weights
        self._lengths = lengths.to(torch.int32)
        self._stride = stride if stride is not None else (lengths.numel() // len(keys) if keys else 0)

    @classmethod
    def from_lengths_sync(cls, keys: list[str], values: torch.Tensor, lengths: torch.Tensor,
                          weights: torch.Tensor | None = None, stride: int | None = None) -> KeyedJaggedTensor:
        return cls(keys, values, weights, lengths, stride=stride)

    def keys(self) -> list[str]:
        return self._keys

    def values(self) -> torch.Tensor:
        return self._values

    def lengths(self) -> torch.Tensor:
        return self._lengths

    def weights(self) -> torch.Tensor:
        if self._weights is None:
            raise ValueError("this KeyedJaggedTensor has no weights")
        return self._weights

    def weights_or_none(self) -> torch.Tensor | None:
        return self._weights

    def stride(self) -> int:
        return self._stride

    def variable_stride_per_key(self) -> bool:
        return False

    def length_per_key(self) -> list[int]:
        """Ids per feature."""
        return self._lengths.view(len(self._keys), self._stride).sum(dim=1).tolist() if self._keys else []

    def offset_per_key(self) -> list[int]:
        """Where each feature's ids start in values, and the end of the last."""
        offsets = [0]
        for n in self.length_per_key():
            offsets.append(offsets[-1] + n)
        return offsets


class KeyedTensor:
    """Dense tensors side by side along key_dim (the pooled vectors of each feature: [batch,
    sum of dims]), each reachable by its key."""

    def __init__(self, keys: list[str], length_per_key: list[int], values: torch.Tensor, key_dim: int = 1) -> None:
        self._keys = list(keys)
        self._length_per_key = list(length_per_key)
        self._values = values
        self._key_dim = key_dim

    def keys(self) -> list[str]:
        return self._keys

    def values(self) -> torch.Tensor:
        return self._values

    def key_dim(self) -> int:
        return self._key_dim

    def length_per_key(self) -> list[int]:
        return self._length_per_key

    def offset_per_key(self) -> list[int]:
        offsets = [0]
        for n in self._length_per_key:
            offsets.append(offsets[-1] + n)
        return offsets

    def __getitem__(self, key: str) -> torch.Tensor:
        i = self._keys.index(key)
        return self._values.narrow(self._key_dim, self.offset_per_key()[i], self._length_per_key[i])

    def to_dict(self) -> dict[str, torch.Tensor]:
        return dict(zip(self._keys, self._values.split(self._length_per_key, dim=self._key_dim)))


def embedding_names(tables: list) -> list[str]:
    """The output keys, table after table, feature after feature: a feature's name, or
    "feature@table" for a feature that several tables read (as TorchRec names them)."""
    seen: dict[str, int] = {}
    for table in tables:
        for feature in features_of(table):
            seen[feature] = seen.get(feature, 0) + 1
    return [feature if seen[feature] == 1 else f"{feature}@{table.name}"
            for table in tables for feature in features_of(table)]


def features_of(table) -> list[str]:
    """A table's features: its feature_names, or its own name when it lists none."""
    return list(table.feature_names) or [table.name]


class EmbeddingBagCollection(torch.nn.Module):
    """In-process tables, one torch.nn.EmbeddingBag each (embedding_bags.NAME.weight, as TorchRec);
    forward(KeyedJaggedTensor) -> KeyedTensor, ordered table after table, feature after feature."""

    def __init__(self, tables: list[EmbeddingBagConfig], is_weighted: bool = False,
                 device: torch.device | str | None = None) -> None:
        super().__init__()
        if len({t.name for t in tables}) != len(tables):
            raise ValueError(f"duplicate table names in {[t.name for t in tables]}")
        self._tables = list(tables)
        self._is_weighted = is_weighted
        self.embedding_bags = torch.nn.ModuleDict({
            t.name: torch.nn.EmbeddingBag(t.num_embeddings, t.embedding_dim, mode=t.pooling.value.lower(),
                                          include_last_offset=True, device=device,
                                          dtype=torch.float32 if t.data_type.name == "FP32" else torch.float16)
            for t in tables})
        self._names = embedding_names(tables)
        self._dims = [t.embedding_dim for t in tables for _ in features_of(t)]
        for bag in self.embedding_bags.values():
            bound = 1.0 / bag.num_embeddings ** 0.5
            torch.nn.init.uniform_(bag.weight, -bound, bound)

    def embedding_bag_configs(self) -> list[EmbeddingBagConfig]:
        return self._tables

    def is_weighted(self) -> bool:
        return self._is_weighted

    def forward(self, features: KeyedJaggedTensor) -> KeyedTensor:
        keys = features.keys()
        batch = features.stride()
        lengths = features.lengths().view(len(keys), batch)
        starts = features.offset_per_key()
        weights = features.weights() if self._is_weighted else None
        pooled = []
        for table in self._tables:
            bag = self.embedding_bags[table.name]
            for feature in features_of(table):
                k = keys.index(feature)
                ids = slice(starts[k], starts[k + 1])
                offsets = torch.zeros(batch + 1, dtype=torch.int64)
                torch.cumsum(lengths[k], 0, out=offsets[1:])
                pooled.append(bag(features.values()[ids], offsets,
                                  per_sample_weights=None if weights is None else weights[ids]).float())
        return KeyedTensor(self._names, self._dims, torch.cat(pooled, dim=1))
