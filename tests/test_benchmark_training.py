"""bin/benchmark_training runs on a toy dataset and prints one row per architecture (a check of the script, not a
timing)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import REPO, make_dataset

SCRIPT = REPO / "bin" / "benchmark_training"


def test_prints_a_row_per_architecture_with_its_parameters(tmp_path: Path) -> None:
    pytest.importorskip("torch")
    data = make_dataset(tmp_path / "data")
    config = tmp_path / "config.json"
    config.write_text(json.dumps({"extends": "tiny", "train": {"patch_size": [16, 16, 16], "steps": 100}}))
    done = subprocess.run(
        [
            sys.executable,
            str(SCRIPT),
            str(data),
            "-config",
            str(config),
            "-steps",
            "2",
            "-threads",
            "1",
            "-features",
            "4,8",
            "-features",
            "8,16",
        ],
        capture_output=True,
        text=True,
        check=False,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr
    rows = [line.split("|")[1:-1] for line in done.stdout.splitlines() if line.startswith("| ") and "---" not in line]
    assert [row[0].strip() for row in rows[1:]] == ["4,8", "8,16"]
    small, large = (int(row[1].replace(",", "")) for row in rows[1:])
    assert small < large  # the parameter count follows the features
    assert rows[1][5].strip() == "100"  # the first architecture is the reference: its own step count
    for row in rows[1:]:
        assert all(float(cell) >= 0 for cell in row[2:5])


def test_refuses_a_folder_that_is_not_a_dataset(tmp_path: Path) -> None:
    done = subprocess.run(
        [sys.executable, str(SCRIPT), str(tmp_path)], capture_output=True, text=True, check=False, timeout=120
    )
    assert done.returncode == 2
    assert "not a simulated dataset" in done.stderr and "Traceback" not in done.stderr
