"""Which tenant a request is: the one place that reads it.

A request names its tenant by the gRPC metadata key "embtier-tenant"; a request without it is the
default tenant.  A name the configuration does not declare is INVALID_ARGUMENT (naming it and the
tenants there are), so that a typo never runs as somebody else's traffic.
"""

from __future__ import annotations

from embtier.wire import TENANT_METADATA_KEY as METADATA_KEY

from embtierd.config import DEFAULT_TENANT, TenantConfig
from embtierd.errors import InvalidArgumentError


class Tenants:
    """The configured tenants by name (the default one always among them)."""

    def __init__(self, tenants: dict[str, TenantConfig]):
        self.by_name = dict(tenants)
        self.default = self.by_name[DEFAULT_TENANT]

    def of(self, context) -> TenantConfig:
        """The tenant a call names in its metadata, or the default one."""
        for key, value in context.invocation_metadata() or ():
            if key == METADATA_KEY:
                tenant = self.by_name.get(value)
                if tenant is None:
                    raise InvalidArgumentError(f"metadata {METADATA_KEY} = {value!r} names no tenant; the tenants "
                                               f"are {', '.join(sorted(self.by_name))} ([tenants.NAME] in the "
                                               f"configuration)")
                return tenant
        return self.default
