"""The CI soak run: tests/soak/soak.py's mixed load on a real daemon for 180 s (EMBTIER_SOAK_SECONDS
overrides), then every bound its docstring states, no failed request, rows that really moved between
tiers and at least one restore checked against the model of acknowledged writes."""

from __future__ import annotations

import os

from tests.soak import soak
from tests.support import kill_daemons_started_since

SOAK_SECONDS = float(os.environ.get("EMBTIER_SOAK_SECONDS", "180"))


def test_a_mixed_load_leaves_memory_fds_threads_disk_and_latency_bounded(tmp_path):
    with kill_daemons_started_since():
        result = soak.run(SOAK_SECONDS, tmp_path / "soak", tmp_path / "samples.csv")
    report = soak.check_bounds(result)
    assert result.restores >= 1
    moved = result.samples[-1]["migrated_rows"] - result.samples[0]["migrated_rows"]
    assert moved > 0, f"the tiering engine moved no row in {SOAK_SECONDS:.0f} s: the load missed the tiers"
    print("\n".join(report))
