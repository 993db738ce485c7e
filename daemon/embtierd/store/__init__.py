"""The store: the table catalog, each table's slots in the tiers, and the mover
(the one writer of a row's location)."""
