"""The embtier.v1 wire contract: stubs generated from proto/embtier/v1 at build time."""
