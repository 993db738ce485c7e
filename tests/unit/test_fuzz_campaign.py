"""Bounded campaigns of the atheris harnesses of tests/fuzz/ (the gRPC service in process, and the C
kernels through native.py), each in a process of its own: they must end without a finding (a crash,
an uncaught exception, a wrong answer, a hang) after a useful number of executions, which each run
reports.  EMBTIER_FUZZ_CAMPAIGN_SECONDS sets the time per harness (`make fuzz` runs them longer);
EMBTIER_FUZZ_SEED the seed."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
SECONDS = int(os.environ.get("EMBTIER_FUZZ_CAMPAIGN_SECONDS", "25"))
MIN_EXECUTIONS = 300  # far fewer than either harness does in 25 s: fewer means it stopped doing its work


@pytest.mark.parametrize("harness", ["rpc_harness", "native_harness"])
def test_a_bounded_campaign_finds_nothing(harness, tmp_path, capsys):
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    command = [sys.executable, "-m", f"tests.fuzz.{harness}", f"-max_total_time={SECONDS}", "-timeout=60",
               "-rss_limit_mb=4096", f"-seed={os.environ.get('EMBTIER_FUZZ_SEED', '1')}",
               f"-artifact_prefix={tmp_path}/", str(corpus)]
    proc = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, check=False, timeout=SECONDS + 300)
    log = "\n".join(line for line in proc.stderr.splitlines() if not line.startswith("INFO: Instrumenting"))
    done = re.search(r"Done (\d+) runs in (\d+) second", proc.stderr)
    with capsys.disabled():
        print(f"\n{harness}: {done[1] if done else 'no'} executions in {done[2] if done else '?'} s, "
              f"exit {proc.returncode}, {len(list(corpus.iterdir()))} corpus inputs")
    crashes = [p.name for p in tmp_path.iterdir() if p.name.startswith(("crash-", "timeout-", "oom-", "leak-"))]
    assert proc.returncode == 0 and done and not crashes, f"{crashes}\n{log[-15000:]}\n{proc.stdout[-3000:]}"
    assert int(done[1]) >= MIN_EXECUTIONS, log[-5000:]
