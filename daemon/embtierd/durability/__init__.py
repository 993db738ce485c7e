"""Durability: the write-ahead log (wal), what the store logs in it (journal),
checkpoints and their format, and start-up recovery."""
