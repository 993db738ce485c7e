"""Tools around embtier that an inference server does not import: the demo, the
load generator, the offline tiering simulator's command, and the shaped-link
fabric test bed (root only)."""
