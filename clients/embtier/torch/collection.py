"""RemoteEmbeddingBagCollection: a TorchRec EmbeddingBagCollection whose tables live in embtierd.

forward(KeyedJaggedTensor) -> KeyedTensor as TorchRec's: one LookupPooled per call carries every
feature (a table's features go as one run of bags: its first feature's bags, then its next
feature's), the daemon pools, and the pooled vectors are laid side by side, table after table,
feature after feature.  Tables are dense (ids are rows) and are named in the daemon as in the
configs, with an optional prefix.  The state_dict is TorchRec's (embedding_bags.NAME.weight), so
that loading a trained collection's (or a whole model's, with this module inside) state_dict writes
the tables into the daemon, and state_dict() reads them back."""

from __future__ import annotations

from dataclasses import dataclass

import grpc
import numpy as np
import torch

from ..client import Client, EmbtierClientError
from . import tables as transfer
from .compat import embedding_names, features_of
from .sparse import KeyedTensor

POOLINGS = {"SUM": "sum", "MEAN": "mean"}


@dataclass(frozen=True)
class RemoteTable:
    config: object      # an EmbeddingBagConfig (TorchRec's or embtier.torch's)
    remote: str         # the daemon's name for it
    features: tuple[str, ...]
    mode: str           # "sum" or "mean"

    @property
    def state_key(self) -> str:
        return f"embedding_bags.{self.config.name}.weight"


def _numpy(tensor: torch.Tensor) -> np.ndarray:
    return tensor.detach().cpu().numpy()


def _joined(parts: list[np.ndarray]) -> np.ndarray:
    return parts[0] if len(parts) == 1 else np.concatenate(parts)


class RemoteEmbeddingBagCollection(torch.nn.Module):
    """tables: EmbeddingBagConfig (TorchRec's, or embtier.torch's when TorchRec is not installed);
    client: an embtier Client or its target ("unix:///run/embtier/embtierd.sock").

    is_weighted: the inputs' weights scale their ids' rows (as TorchRec: otherwise they are ignored);
    wire_dtype: "float16" halves the pooled vectors on the wire; offload: where the daemon pools
    (embtier.Client.lookup_pooled; None: its default); table_prefix: the daemon's tables are named
    prefix + config name; storage_dtype: the dtype of the tables that loading creates (None: from
    each config's data_type); progress(table, rows done, rows) is called as tables load."""

    def __init__(self, tables: list, client: Client | str, device: torch.device | str = "cpu", *,
                 is_weighted: bool = False, wire_dtype: str = "float32", offload: str | None = None,
                 table_prefix: str = "", storage_dtype: str | None = None,
                 progress: transfer.Progress | None = None) -> None:
        super().__init__()
        if len({t.name for t in tables}) != len(tables):
            raise ValueError(f"duplicate table names in {[t.name for t in tables]}")
        unpooled = [t.name for t in tables if t.pooling.name not in POOLINGS]
        if unpooled:
            raise ValueError(f"tables {unpooled}: pooling must be SUM or MEAN")
        self.client = client if isinstance(client, Client) else Client(client)
        self.device = torch.device(device)
        self._is_weighted = is_weighted
        self.wire_dtype = wire_dtype
        self.offload = offload
        self.storage_dtype = storage_dtype
        self.progress = progress
        self._tables = [RemoteTable(t, table_prefix + t.name, tuple(features_of(t)), POOLINGS[t.pooling.name])
                        for t in tables]
        self._names = embedding_names(tables)
        self._dims = [t.config.embedding_dim for t in self._tables for _ in t.features]
        self._features = {f for t in self._tables for f in t.features}
        modes = {t.mode for t in self._tables}
        # one request has one pooling mode: with both, MEAN tables go as SUM with each id weighted 1/length
        self._mode = modes.pop() if len(modes) == 1 else "sum"

    @classmethod
    def from_module(cls, ebc: torch.nn.Module, client: Client | str, **options) -> RemoteEmbeddingBagCollection:
        """A collection of ebc's tables (a TorchRec EmbeddingBagCollection, or embtier.torch's), its
        weights written into the daemon (tables created as needed)."""
        remote = cls(ebc.embedding_bag_configs(), client, is_weighted=ebc.is_weighted(), **options)
        remote.load_state_dict(ebc.state_dict())
        return remote

    def embedding_bag_configs(self) -> list:
        return [t.config for t in self._tables]

    def is_weighted(self) -> bool:
        return self._is_weighted

    # ---- lookups ---------------------------------------------------------------------------------

    def forward(self, features):
        """features: a KeyedJaggedTensor (TorchRec's or embtier.torch's) holding every feature of the
        collection and no other; -> KeyedTensor [batch, sum of dims] float32 on self.device."""
        keys = list(features.keys())
        self._check_keys(keys)
        if getattr(features, "variable_stride_per_key", lambda: False)():
            raise ValueError("inputs with a batch size per feature (variable stride) are not supported")
        batch = features.stride()
        lengths = _numpy(features.lengths()).astype(np.int32, copy=False)
        if lengths.size != len(keys) * batch:
            raise ValueError(f"{lengths.size} lengths for {len(keys)} features of {batch} bags")
        values = _numpy(features.values())
        weights = features.weights_or_none() if self._is_weighted else None
        if self._is_weighted and weights is None:
            raise ValueError("this collection is weighted (is_weighted=True) and the input has no weights")
        weights = None if weights is None else _numpy(weights).astype(np.float32, copy=False)
        per_key = lengths.reshape(len(keys), batch).sum(axis=1, dtype=np.int64)
        ends = np.cumsum(per_key)
        starts = ends - per_key
        at = {key: i for i, key in enumerate(keys)}
        request = {}
        for table in self._tables:
            rows = [at[f] for f in table.features]
            bags = _joined([lengths[k * batch:(k + 1) * batch] for k in rows])
            w = None if weights is None else _joined([weights[starts[k]:ends[k]] for k in rows])
            if table.mode != self._mode:   # a MEAN table in a SUM request
                share = np.repeat(1.0 / np.maximum(bags, 1), bags).astype(np.float32)
                w = share if w is None else w * share
            request[table.remote] = (_joined([values[starts[k]:ends[k]] for k in rows]), bags, w)
        try:
            pooled = self.client.lookup_pooled(request, self._mode, self.wire_dtype, self.offload)
        except EmbtierClientError as e:
            raise self._explained(e) from None
        out = np.empty((batch, sum(self._dims)), dtype=np.float32)
        column = 0
        for table in self._tables:
            result = pooled[table.remote]
            dim = table.config.embedding_dim
            if result.shape[1] != dim:
                raise ValueError(f"embtier table {table.remote!r} has dim {result.shape[1]}; table "
                                 f"{table.config.name!r} of this collection has embedding_dim {dim}")
            for j in range(len(table.features)):
                out[:, column:column + dim] = result[j * batch:(j + 1) * batch]
                column += dim
        pooled_values = torch.from_numpy(out)
        if self.device.type != "cpu":
            pooled_values = pooled_values.to(self.device)
        return KeyedTensor(keys=self._names, length_per_key=self._dims, values=pooled_values)

    def _check_keys(self, keys: list[str]) -> None:
        unknown = [k for k in keys if k not in self._features]
        if unknown:
            raise ValueError(f"feature {unknown[0]!r} of the input is not in this collection (its features: "
                             f"{', '.join(sorted(self._features))})")
        present = set(keys)
        for table in self._tables:
            for feature in table.features:
                if feature not in present:
                    raise ValueError(f"feature {feature!r} of table {table.config.name!r} is not in the input "
                                     f"(its keys: {', '.join(keys)})")

    def _explained(self, error: EmbtierClientError) -> EmbtierClientError:
        """A NOT_FOUND that names the tables of this collection the daemon lacks, and how to load them."""
        if error.code != grpc.StatusCode.NOT_FOUND:
            return error
        present = {t.name for t in self.client.tables()}
        missing = [t for t in self._tables if t.remote not in present]
        if not missing:
            return error
        named = "; ".join(f"table {t.remote!r} (features {', '.join(t.features)})" for t in missing)
        return EmbtierClientError(error.code, f"{named} not in the embtier daemon: load the weights first "
                                  "(RemoteEmbeddingBagCollection.load_state_dict or from_module, or "
                                  "`embtier import-torch MODEL.pt`)", error.method)

    # ---- weights ---------------------------------------------------------------------------------

    def _save_to_state_dict(self, destination, prefix, keep_vars) -> None:
        for table in self._tables:
            destination[prefix + table.state_key] = transfer.read_table(self.client, table.remote)

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                              error_msgs) -> None:
        expected = {prefix + t.state_key for t in self._tables}
        if strict:
            unexpected_keys.extend(k for k in state_dict if k.startswith(prefix) and k not in expected)
        for table in self._tables:
            key = prefix + table.state_key
            if key not in state_dict:
                missing_keys.append(key)
                continue
            weight = state_dict[key]
            shape = (table.config.num_embeddings, table.config.embedding_dim)
            if tuple(weight.shape) != shape:
                error_msgs.append(f"size mismatch for {key}: copying a param with shape {tuple(weight.shape)}, "
                                  f"the table is {shape}")
                continue
            dtype = self.storage_dtype or transfer.storage_dtype(table.config.data_type)
            try:
                transfer.ensure_table(self.client, table.remote, *shape, dtype)
            except transfer.TableMismatch as e:
                error_msgs.append(str(e))
                continue
            transfer.write_table(self.client, table.remote, weight, self.progress)
