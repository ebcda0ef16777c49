"""bin/insertion_panel (lesions from the literature in real scans, independent of the simulator) and
bin/results_block (the README's results from evaluate output), on small synthetic cords and tables."""

from __future__ import annotations

import ast
import importlib.machinery
import importlib.util
import math
import sys
from pathlib import Path

import numpy as np
import pytest
from conftest import REPO


def load_script(name: str):
    loader = importlib.machinery.SourceFileLoader(name.replace("-", "_"), str(REPO / "bin" / name))
    spec = importlib.util.spec_from_loader(loader.name, loader)
    module = importlib.util.module_from_spec(spec)
    sys.modules[loader.name] = module  # its dataclasses look their module up there
    loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def panel():
    return load_script("insertion_panel")


def cylinder_cord(panel, shape=(40, 40, 30), zooms=(0.8, 0.8, 2.0)):
    """A straight cord of radius 4 mm along S-I (RAS grid), intensity 100 in the cord and 300 around it."""
    affine = np.diag([*zooms, 1.0])
    x, y = np.meshgrid(*(np.arange(n) * z for n, z in zip(shape[:2], zooms[:2])), indexing="ij")
    inside = (x - 16) ** 2 + (y - 16) ** 2 < 16
    mask = np.repeat(inside[:, :, None], shape[2], axis=2)
    image = np.where(mask, 100.0, 300.0)
    cord = panel.Cord(mask, affine)
    return image, cord, np.full(len(cord.index), "lateral", dtype=object)


def test_the_panel_imports_nothing_from_the_training_simulator():
    tree = ast.parse((REPO / "bin" / "insertion_panel").read_text(encoding="utf-8"))
    imported = {node.module for node in ast.walk(tree) if isinstance(node, ast.ImportFrom)}
    imported |= {alias.name for node in ast.walk(tree) if isinstance(node, ast.Import) for alias in node.names}
    assert "sct_sitehead.evaluation.splits" in imported
    assert not [name for name in imported if name and name.startswith("sct_sitehead.simulate")]


def test_inserted_lesions_stay_in_the_cord_with_their_contrast_and_a_soft_edge(panel):
    image, cord, regions = cylinder_cord(panel)
    band = (1.0, 3.0)
    out, truth, lesions = panel.insert_case(image, cord, regions, band, np.random.default_rng(4))
    assert 1 <= len(lesions) <= 2 and truth.any()
    assert not (truth & ~cord.mask).any()  # truth inside the cord mask
    assert np.array_equal(out[~cord.mask], image[~cord.mask])  # nothing outside the cord changes
    ratio = out[truth] / image[truth]
    # the truth is where the partial-volume weight is at least 0.5: at least 1 + c/2, at most 1 + c (c <= 3)
    assert ratio.min() >= 1 + 0.5 * min(lesion.contrast for lesion in lesions) - 1e-9 and ratio.max() <= 4.0
    for lesion in lesions:
        assert band[0] <= lesion.contrast <= band[1] and 3.0 <= lesion.length_mm <= 30.0
        assert 0.04 <= lesion.area_fraction <= 0.45 and lesion.voxels >= 1
        weight = panel.lesion_weight(cord, lesion)
        assert ((weight > 0.05) & (weight < 0.95)).any()  # a ramp at the edge, not a uniform blob
    again = panel.insert_case(image, cord, regions, band, np.random.default_rng(4))
    assert np.array_equal(again[0], out) and np.array_equal(again[1], truth)  # seeded: reproducible


def test_a_negative_band_darkens_the_lesion(panel):
    image, cord, regions = cylinder_cord(panel)
    out, truth, lesions = panel.insert_case(image, cord, regions, (-0.6, -0.3), np.random.default_rng(1))
    assert (out[truth] < image[truth]).all() and all(-0.6 <= lesion.contrast <= -0.3 for lesion in lesions)


def test_lesions_at_the_field_of_view_edge_reach_its_first_or_last_slice(panel):
    image, cord, regions = cylinder_cord(panel)
    rng = np.random.default_rng(0)
    edge = [panel.draw_lesion(cord, regions, (0.0, 0.3), rng) for _ in range(60)]
    at_edge = [lesion for lesion in edge if lesion.at_fov_edge]
    assert 5 < len(at_edge) < 35  # about 30%
    assert {lesion.slice_index for lesion in at_edge} <= {int(cord.slices[0]), int(cord.slices[-1])}


def test_band_names(panel):
    assert panel.band_name((0.0, 0.3)) == "iso to +30%"
    assert panel.band_name((1.0, 3.0)) == "+100-300%"
    assert panel.band_name((-0.15, 0.0)) == "-15% to 0%"
    assert panel.band_name((-0.6, -0.3)) == "-60% to -30%"


def test_the_picture_is_a_png(panel, tmp_path):
    image, cord, regions = cylinder_cord(panel)
    out, truth, _ = panel.insert_case(image, cord, regions, (3.0, 6.0), np.random.default_rng(2))
    path = tmp_path / "case.png"
    panel.picture(image, out, truth, cord, cord.affine, path)
    assert path.read_bytes()[:4] == b"\x89PNG"


def test_results_block_replaces_only_the_marked_block():
    block = load_script("results_block")
    text = "intro\n<!-- results:start -->\nold\n<!-- results:end -->\nafter\n"
    assert block.replace_block(text, "new\n") == "intro\n<!-- results:start -->\nnew\n<!-- results:end -->\nafter\n"
    with pytest.raises(SystemExit, match="no <!-- results:start -->"):
        block.replace_block("no markers\n", "new\n")
    entry = {"dice": "0.2", "dice_low": "0.1", "dice_high": "0.3", "f1_any": "0.5", "f1_any_low": "nan"}
    assert block.value(entry, "dice") == "0.20 [0.10, 0.30]" and block.value(entry, "f1_any") == "0.50"
    assert block.value({"x": "nan"}, "x") == "n/a" and not math.isnan(float(entry["dice"]))


def test_results_block_reads_the_release_reports():
    """The committed reports give the README's block exactly (`bin/results_block -check`)."""
    block = load_script("results_block")
    reports = REPO / "reports" / "release"
    if not (reports / "panel" / "bands.tsv").is_file():
        pytest.skip("reports/release/panel/bands.tsv not written yet")
    assert block.main(["-check"]) == 0


def _write_tsv(path: Path, rows: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    columns = list(rows[0])
    path.write_text("\n".join(["\t".join(columns)] + ["\t".join(str(r[c]) for c in columns) for r in rows]) + "\n")


def test_targets_table_scores_each_target_from_the_reports(tmp_path: Path):
    """Hand-made reports: the verdicts follow the figures, controls count runs with any false lesion per person
    bootstrap, and the panel keeps only the bright bands' runs of heads that scan the contrast."""
    targets = load_script("targets_table")
    stats = ("dice", "sensitivity_any", "precision_any")
    summary = []
    for contrast, sensitivity in (("T2w", 0.9), ("T2star", 0.5), ("MTS", 0.85), ("T1w", 0.1), ("all", 0.7)):
        row = {"site": "pooled", "head": "own", "contrast": contrast, "persons_lesion": 2}
        for key in stats:
            value = {"dice": 0.65, "sensitivity_any": sensitivity, "precision_any": 0.7}[key]
            row.update({key: value, f"{key}_low": value - 0.1, f"{key}_high": value + 0.1})
        summary.append(row)
    _write_tsv(tmp_path / "summary.tsv", summary)
    controls = [
        {
            "image": f"img{k}",
            "head": "h",
            "lesions": int(k == 0),
            "volume_mm3": 40.0 * (k == 0),
            "person": f"p{k}",
            "split": "test" if k < 2 else "train",
        }
        for k in range(4)
    ]
    _write_tsv(tmp_path / "controls.tsv", controls)
    participants = [
        {"participant_id": "sub-p1", "person": "a", "contrast": "T2w", "band": "+30-100%", "at_fov_edge": 1},
        {"participant_id": "sub-p2", "person": "b", "contrast": "T2w", "band": "iso to +30%", "at_fov_edge": 0},
    ]
    _write_tsv(tmp_path / "panel" / "participants.tsv", participants)
    counts = {"n_ref_any": 1, "n_pred_any": 1, "tp_any": 1, "fp_any": 0, "fn_any": 0, "dice": 0.5, "avd_mm3": 1.0}
    counts.update(volume_ref_mm3=20.0, false_lesions="nan", false_volume_mm3="nan")
    counts.update({k.replace("_any", "_10pct"): v for k, v in counts.items() if k.endswith("_any")})
    cases = [
        {"site": "s", "subject": "sub-p1", "person": "a", "contrast": "T2w", "head": "montreal", **counts},
        {"site": "s", "subject": "sub-p1", "person": "a", "contrast": "T2w", "head": "zurich", **counts, "tp_any": 0},
        {"site": "s", "subject": "sub-p2", "person": "b", "contrast": "T2w", "head": "montreal", **counts, "tp_any": 0},
    ]
    _write_tsv(tmp_path / "panel" / "cases.tsv", cases)
    rows = {line.split(" | ")[0].lstrip("| "): line for line in targets.table(tmp_path).splitlines()[2:]}
    assert rows["lesion-wise sensitivity, T2w (test split)"].endswith("| met |")
    assert rows["lesion-wise sensitivity, T2star (test split)"].endswith("| not met |")
    assert "0.65 [0.55, 0.75]" in rows["Dice on lesion-bearing cases, pooled (test split)"]
    assert rows["precision, pooled (test split)"].endswith("| not met |")
    held_out = next(v for k, v in rows.items() if k.startswith("healthy scans, held-out persons (2 images"))
    assert "| 0.50 " in held_out and held_out.endswith("| not met |")
    every = next(v for k, v in rows.items() if k.startswith("healthy scans, every healthy scan (4 images"))
    assert "| 0.25 " in every
    # Only sub-p1's montreal run counts (zurich scans no T2w; sub-p2 is in a dim band): found, at the edge too.
    panel = [v for k, v in rows.items() if k.startswith("insertion panel")]
    assert all("(1 runs)" in v and "| 1.00" in v and v.endswith("| met |") for v in panel)


def test_source_images_come_from_the_asked_split_only(panel, bids_dir):
    """`-split val` takes the val persons' scans with a cord mask, and none of the frozen test split's."""
    from sct_sitehead.evaluation.splits import load_splits

    splits = load_splits()
    names = {}
    for split in ("val", "test"):
        persons = {person.name for person in splits.in_split(split)}
        sources = panel.source_images(bids_dir, split)
        assert sources and {person for person, *_ in sources} <= persons
        for _, _, image, mask in sources:
            assert image.is_file() and mask.is_file()
        names[split] = {image.name for _, _, image, _ in sources}
    assert not names["val"] & names["test"]
