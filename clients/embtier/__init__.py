"""embtier client package: `from embtier import Client`.

What an inference server imports: the client (client.py), the wire vocabulary
and info types (wire.py), the generated stubs (v1/) and the command line (cli.py)."""

from .client import Client, EmbtierClientError, TlsOptions, Trace
from .wire import PortInfo, TableInfo, TablePolicy, TierInfo

__all__ = ["Client", "EmbtierClientError", "PortInfo", "TableInfo", "TablePolicy", "TierInfo", "TlsOptions", "Trace"]
