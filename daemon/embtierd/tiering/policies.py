"""The registry of tiering policies by name."""

from __future__ import annotations

from embtier.wire import POLICIES

from embtierd.tiering.policy_base import Policy
from embtierd.tiering.policy_lfu import LfuPolicy
from embtierd.tiering.policy_lru import LruPolicy


def make_policy(name: str, num_rows: int, hysteresis: float, aging_intervals: int) -> Policy:
    """A fresh policy instance for a table of num_rows rows."""
    if name == "lfu":
        return LfuPolicy(hysteresis, aging_intervals)
    if name == "lru":
        return LruPolicy(num_rows)
    raise ValueError(f"policy must be one of {', '.join(POLICIES)}; got {name!r}")
