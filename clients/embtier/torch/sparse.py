"""The sparse types embtier.torch speaks: TorchRec's when TorchRec imports, else embtier.torch.compat's
(the same names and methods).  TORCHREC is TorchRec's version, or None, and then TORCHREC_MISSING
says why it did not import."""

from __future__ import annotations

try:
    import torchrec
    from torchrec import (
        DataType,
        EmbeddingBagCollection,
        EmbeddingBagConfig,
        KeyedJaggedTensor,
        KeyedTensor,
        PoolingType,
    )
except (ImportError, OSError) as e:  # not installed, or its fbgemm built for another torch (OSError)
    from .compat import (
        DataType,
        EmbeddingBagCollection,
        EmbeddingBagConfig,
        KeyedJaggedTensor,
        KeyedTensor,
        PoolingType,
    )

    TORCHREC: str | None = None
    TORCHREC_MISSING = f"{type(e).__name__}: {e}"
else:
    TORCHREC = getattr(torchrec, "__version__", "unknown")
    TORCHREC_MISSING = ""

__all__ = ["TORCHREC", "TORCHREC_MISSING", "DataType", "EmbeddingBagCollection", "EmbeddingBagConfig",
           "KeyedJaggedTensor", "KeyedTensor", "PoolingType"]
