"""embtier client package: `from embtier import Client`."""

from .client import Client, EmbtierClientError, PortInfo, TableInfo, TablePolicy, TierInfo, TlsOptions, Trace

__all__ = ["Client", "EmbtierClientError", "PortInfo", "TableInfo", "TablePolicy", "TierInfo", "TlsOptions", "Trace"]
