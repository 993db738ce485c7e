"""embtier client package."""
