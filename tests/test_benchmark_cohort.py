"""bin/benchmark_cohort runs end to end on a small cohort and prints its table (a check of the script, not a
timing)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from conftest import REPO

SCRIPT = REPO / "bin" / "benchmark_cohort"


def test_a_small_mixed_cohort_is_run_and_measured(bids_dir: Path, tmp_path: Path):
    """Real images and phantoms in one cohort: every scan done, a first mask, each process's peak memory."""
    out = tmp_path / "cohort.md"
    command = [sys.executable, str(SCRIPT), "-data", str(bids_dir), "-cohort", "mixed", "-n", "9", "-modes", "loop"]
    done = subprocess.run([*command, "-out", str(out)], capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout + done.stderr
    run = json.loads(done.stdout.splitlines()[0])
    assert (run["cohort"], run["mode"], run["done"], run["failed"]) == ("mixed", "loop", 9, 0)
    assert 0 < run["first_mask_s"] < run["wall_s"] and run["main_peak_mb"] > 50
    rows = [line for line in out.read_text().splitlines() if line.startswith("| mixed | loop |")]
    assert len(rows) == 1 and "| 9 / 0 |" in rows[0]


def test_unknown_modes_are_refused(bids_dir: Path):
    done = subprocess.run(
        [sys.executable, str(SCRIPT), "-data", str(bids_dir), "-modes", "loop,jobs9"], capture_output=True, text=True
    )
    assert done.returncode == 2 and "jobs9" in done.stderr
