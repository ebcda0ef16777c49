"""bin/benchmark runs end to end on tiny inputs and prints its tables (a check of the script, not a timing)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import REPO, write_registry

SCRIPT = REPO / "bin" / "benchmark"

# Each baseline run is a fresh process importing torch and MONAI: a few seconds apiece.
pytestmark = pytest.mark.slow


def table(text: str, first_header: str) -> list[list[str]]:
    """Rows (cells) of the Markdown table whose header starts with ``| first_header``, separator dropped."""
    lines = text.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith(f"| {first_header} |"))
    rows = []
    for line in lines[start:]:
        if not line.startswith("|"):
            break
        rows.append([cell.strip() for cell in line.strip("|").split("|")])
    assert set(rows[1][0]) <= {"-"}, "second line of a Markdown table is its separator"
    return [rows[0], *rows[2:]]


def test_quick_benchmark_prints_tables(tmp_path: Path):
    pytest.importorskip("torch")
    pytest.importorskip("monai")
    registry = write_registry(tmp_path / "registry")
    out = tmp_path / "report" / "bench.md"
    page = tmp_path / "PERFORMANCE.md"
    page.write_text(
        "# Title\n\n## Performance\n\n<!-- benchmark:start (written by bin/benchmark -readme; edits "
        "here are overwritten) -->\nold table\n<!-- benchmark:end -->\n\n## Next\n"
    )
    command = [
        sys.executable,
        str(SCRIPT),
        "-quick",
        "-inputs",
        "sagittal",
        "-registry",
        str(registry),
        "-site",
        "montreal",
        "-sites",
        "montreal,toronto",
        "-threads",
        "1",
        "-device",
        "cpu",
        "-work",
        str(tmp_path / "work"),
        "-out",
        str(out),
        "-help-runs",
        "1",
        "-readme",
        str(page),
    ]
    result = subprocess.run(command, capture_output=True, text=True, timeout=600, env=dict(os.environ))
    assert result.returncode == 0, result.stderr[-3000:]

    text = result.stdout
    assert out.read_text() == text
    assert "quick mode" in text and "onnxruntime" in text and "threads: 1" in text
    header, *rows = table(text, "input")
    assert header[:4] == ["input", "sites", "device", "wall s (ours / baseline)"]
    assert [(row[0], row[1], row[2]) for row in rows] == [
        ("sagittal", "montreal", "cpu"),
        ("sagittal", "montreal,toronto", "cpu"),
    ]
    for row in rows:
        ours, baseline = (float(value) for value in row[3].split(" / "))
        assert ours > 0 and baseline > 0
        # The ratio comes from the unrounded walls; the walls are printed to 0.01 s and the ratio to 0.001.
        low, high = (ours - 0.005) / (baseline + 0.005), (ours + 0.005) / (baseline - 0.005)
        assert low - 0.0005 <= float(row[4].rstrip("x")) <= high + 0.0005
        assert 0.0 <= float(row[8]) <= 1.0
    assert float(rows[0][8]) == 1.0  # montreal's head is voxel-wise: both sliding windows give the same mask

    _, *stages = table(text, "input | sites | device | run")
    assert {row[3] for row in stages} == {"ours", "baseline"}
    _, *startup = table(text, "start-up")
    assert startup[0][0].startswith("`sct_deepseg_lesion -h`") and float(startup[0][1]) > 0
    # Not the benchmark's own peak (over 100 MB once onnxruntime is loaded), which a child would otherwise inherit.
    assert float(startup[0][2]) < 60
    assert startup[1][0].startswith("cold start") and float(startup[1][1]) > 0
    _, *targets = table(text, "target")
    statuses = {row[0]: row[2] for row in targets}
    assert statuses["real image, 1 site: wall <= 3 s"].startswith("n/a")
    assert any(row[0].startswith("sagittal: 2 sites") and row[2].endswith("(quick mode)") for row in targets)

    written = page.read_text()
    assert "old table" not in written and written.startswith("# Title\n\n## Performance\n")
    assert "### sct_deepseg_lesion benchmark" in written and written.endswith("<!-- benchmark:end -->\n\n## Next\n")
    assert table(written, "input") == table(text, "input")
    # A published page names no path of the machine that ran it.
    assert str(tmp_path) not in written and "from a local registry outside the repository (`registry.json`)" in written

    raw = json.loads(out.with_suffix(".json").read_text())
    assert raw["quick"] is True and raw["model"] == "tiny@1.0.0" and len(raw["rows"]) == 2
    assert raw["rows"][0]["ours"]["stages"]["network"] > 0


def load_benchmark():
    import importlib.machinery
    import importlib.util

    loader = importlib.machinery.SourceFileLoader("benchmark_under_test", str(SCRIPT))
    spec = importlib.util.spec_from_loader(loader.name, loader)
    module = importlib.util.module_from_spec(spec)
    sys.modules[loader.name] = module
    loader.exec_module(module)
    return module


@pytest.mark.parametrize("largest, verdict", [(0.009, "met"), (0.011, "**NOT met**")])
def test_agreement_of_evaluation_metrics_is_a_target_row(largest, verdict):
    bench = load_benchmark()
    agreement = {"largest_difference": largest, "cases": 72, "split": "test", "mean_mask_dice": 0.97}
    rows = {label: (measured, status) for label, measured, status in bench.targets([], [], True, 1, agreement)}
    (label,) = [label for label in rows if label.startswith("or: test-split metrics within 0.01")]
    assert rows[label][1] == verdict and f"largest difference {largest:.3f} (72 test cases" in rows[label][0]
    rows = {label: status for label, _, status in bench.targets([], [], True, 1, None)}
    assert rows[label] == "n/a: no -sim dataset"


def test_registry_label_names_no_machine_path(tmp_path):
    from sct_sitehead.registry.local import embedded_registry_path

    bench = load_benchmark()
    embedded = embedded_registry_path()
    assert bench.registry_label(str(embedded)).startswith("the embedded registry")
    assert str(REPO) not in bench.registry_label(str(embedded))
    assert bench.registry_label(str(REPO / "work" / "r" / "registry.json")) == "`work/r/registry.json`"
    assert bench.registry_label(str(tmp_path / "registry.json")) == (
        "a local registry outside the repository (`registry.json`)"
    )
    assert bench.registry_label("https://example.org/registry.json") == "`https://example.org/registry.json`"
