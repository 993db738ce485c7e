"""embtier client package: `from embtier import Client`."""

from .client import Client, EmbtierClientError, TableInfo, TierInfo, TlsOptions

__all__ = ["Client", "EmbtierClientError", "TableInfo", "TierInfo", "TlsOptions"]
