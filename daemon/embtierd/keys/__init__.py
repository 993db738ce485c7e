"""Keys: how a table's ids become rows (its key space), and what the store keeps
of a keyed table's map beside the kernels' (which hold the map itself)."""
