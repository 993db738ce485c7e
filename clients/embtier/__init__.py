"""embtier client package: `from embtier import Client` (one daemon) or `ClusterClient` (several, through
etcd: embtier/cluster/).

What an inference server imports: the client (client.py), the wire vocabulary
and info types (wire.py), the generated stubs (v1/) and the command line (cli.py)."""

from .client import Client, EmbtierClientError, TlsOptions, Trace
from .wire import PortInfo, TableInfo, TablePolicy, TierInfo

__all__ = ["Client", "ClusterClient", "EmbtierClientError", "PortInfo", "TableInfo", "TablePolicy", "TierInfo",
           "TlsOptions", "Trace"]


def __getattr__(name: str):
    """ClusterClient on first use: its etcd client is not loaded by `import embtier`."""
    if name == "ClusterClient":
        from .cluster.client import ClusterClient
        return ClusterClient
    raise AttributeError(f"module 'embtier' has no attribute {name!r}")
