"""Configuration of the tiering engine (its own module so that config and tiering import it without a cycle)."""

from dataclasses import dataclass


@dataclass(frozen=True)
class TieringConfig:
    enabled: bool
    interval_seconds: float
    bandwidth_bytes_per_second: int  # migration budget: rows moved per interval x row bytes stays under it
    hysteresis: float                # a hot row replaces a cold one only when hotter by this factor
