"""embtier.torch.compat, the TorchRec types for when TorchRec is not installed: the same layout and
answers as TorchRec's (compared with them when TorchRec imports), and the weighted MEAN that
embtier computes is fbgemm's (compared when fbgemm imports)."""

from __future__ import annotations

import importlib.util

import pytest
import torch
from embtier.torch import compat, tables
from embtier.torch.sparse import TORCHREC, TORCHREC_MISSING


def test_keyed_jagged_tensor_from_lengths_or_offsets():
    by_lengths = compat.KeyedJaggedTensor.from_lengths_sync(["a", "b"], torch.arange(5), torch.tensor([2, 0, 1, 2]))
    by_offsets = compat.KeyedJaggedTensor(["a", "b"], torch.arange(5), offsets=torch.tensor([0, 2, 2, 3, 5]))
    for kjt in (by_lengths, by_offsets):
        assert kjt.stride() == 2
        assert kjt.length_per_key() == [2, 3]
        assert kjt.offset_per_key() == [0, 2, 5]
        assert kjt.weights_or_none() is None
    with pytest.raises(ValueError, match="no weights"):
        by_lengths.weights()


def test_keyed_tensor_by_key():
    values = torch.arange(12.0).view(2, 6)
    kt = compat.KeyedTensor(["x", "y"], [2, 4], values)
    assert kt.offset_per_key() == [0, 2, 6]
    assert torch.equal(kt["y"], values[:, 2:])
    assert {k: v.shape[1] for k, v in kt.to_dict().items()} == {"x": 2, "y": 4}


def test_shared_features_are_named_by_table_as_torchrec_names_them():
    configs = [compat.EmbeddingBagConfig(10, 2, name="t1", feature_names=["f", "g"]),
               compat.EmbeddingBagConfig(10, 2, name="t2", feature_names=["f"]),
               compat.EmbeddingBagConfig(10, 2, name="t3")]
    assert compat.embedding_names(configs) == ["f@t1", "g", "f@t2", "t3"]


@pytest.mark.skipif(TORCHREC is None, reason=f"TorchRec does not import: {TORCHREC_MISSING}")
def test_compat_collection_equals_torchrecs():
    import torchrec

    made = {kind: kind.EmbeddingBagCollection([
        kind.EmbeddingBagConfig(50, 4, name="t1", feature_names=["a", "b"], pooling=kind.PoolingType.MEAN),
        kind.EmbeddingBagConfig(30, 3, name="t2", feature_names=["c"])]) for kind in (compat, torchrec)}
    made[compat].load_state_dict(made[torchrec].state_dict())
    keys, values, lengths = ["c", "a", "b"], torch.tensor([1, 2, 3, 4, 5, 6, 7]), torch.tensor([2, 0, 1, 1, 3, 0])
    out = {kind: ebc(kind.KeyedJaggedTensor.from_lengths_sync(keys, values, lengths)) for kind, ebc in made.items()}
    assert out[compat].keys() == out[torchrec].keys() == ["a", "b", "c"]
    assert out[compat].length_per_key() == out[torchrec].length_per_key()
    torch.testing.assert_close(out[compat].values(), out[torchrec].values())


@pytest.mark.skipif(importlib.util.find_spec("fbgemm_gpu") is None, reason="fbgemm_gpu is not installed")
def test_weighted_mean_is_fbgemms():
    """fbgemm's table-batched embedding bags (what sharded TorchRec runs) pool a weighted MEAN bag as
    the weighted sum / the bag's length, as embtier's LookupPooled does."""
    try:
        from fbgemm_gpu.split_table_batched_embeddings_ops_common import EmbeddingLocation, PoolingMode
        from fbgemm_gpu.split_table_batched_embeddings_ops_training import (
            ComputeDevice,
            SplitTableBatchedEmbeddingBagsCodegen,
        )
    except (ImportError, OSError) as e:  # built for another torch
        pytest.skip(f"fbgemm_gpu does not import: {e}")
    tbe = SplitTableBatchedEmbeddingBagsCodegen([(10, 4, EmbeddingLocation.HOST, ComputeDevice.CPU)],
                                                pooling_mode=PoolingMode.MEAN)
    weight = torch.randn(10, 4)
    tbe.split_embedding_weights()[0].copy_(weight)
    ids, offsets, w = torch.tensor([1, 2, 3]), torch.tensor([0, 2, 2, 3]), torch.tensor([2.0, 3.0, 0.5])
    with torch.no_grad():
        pooled = tbe(ids, offsets, per_sample_weights=w)
    torch.testing.assert_close(pooled, torch.stack([(2 * weight[1] + 3 * weight[2]) / 2, torch.zeros(4),
                                                    0.5 * weight[3]]))


def test_storage_dtypes_of_torchrec_data_types():
    assert [tables.storage_dtype(t) for t in compat.DataType] == ["float32", "float16"]
    with pytest.raises(ValueError, match="data_type INT4 has no embtier storage"):
        tables.storage_dtype("INT4")
