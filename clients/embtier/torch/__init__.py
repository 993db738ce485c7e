"""embtier from PyTorch and TorchRec (the optional extra: pip install embtier[torch]).

RemoteEmbeddingBagCollection is a drop-in for TorchRec's EmbeddingBagCollection whose tables live
in embtierd: KeyedJaggedTensor in, KeyedTensor out, one LookupPooled per call.  The sparse types
are TorchRec's when it is installed, else embtier.torch.compat's (the same names and methods),
EmbeddingBagCollection among them (the in-process collection to train and compare with).  The
core embtier package never imports this one, nor torch."""

from .collection import RemoteEmbeddingBagCollection
from .sparse import (
    TORCHREC,
    TORCHREC_MISSING,
    DataType,
    EmbeddingBagCollection,
    EmbeddingBagConfig,
    KeyedJaggedTensor,
    KeyedTensor,
    PoolingType,
)
from .tables import read_table, tables_in_file, write_table

__all__ = ["TORCHREC", "TORCHREC_MISSING", "DataType", "EmbeddingBagCollection", "EmbeddingBagConfig",
           "KeyedJaggedTensor", "KeyedTensor", "PoolingType", "RemoteEmbeddingBagCollection", "read_table",
           "tables_in_file", "write_table"]
