"""Examples of serving models with embtier: `python -m embtier_tools.examples.NAME`."""
