"""Scripts in bin/ that measure the release: bin/cut_fov (a split cut short along the cord), bin/dice_by_source,
bin/lesion_probe."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
from conftest import REPO, save_image


def small_sim(root: Path) -> Path:
    """A simulated-dataset layout: one val subject (PIR, 1 x 0.8 x 2 mm; S-I is the second axis, 40 mm) with a
    lesion at S-I voxels 30-33 and a cord mask, and one train subject that must not be copied."""
    root.mkdir()
    (root / "dataset_description.json").write_text(json.dumps({"Name": "sim", "BIDSVersion": "1.8.0"}))
    (root / "participants.tsv").write_text(
        "participant_id\tsite\tsource\tsplit\nsub-a001\ta\tsrc\tval\nsub-a002\ta\tsrc\ttrain\n"
    )
    affine = np.array([[0, 0, 2.0, 0], [-1.0, 0, 0, 0], [0, -0.8, 0, 0], [0, 0, 0, 1]])
    for subject in ("sub-a001", "sub-a002"):
        image = np.arange(20 * 50 * 8, dtype=np.float32).reshape(20, 50, 8)
        lesion = np.zeros((20, 50, 8), dtype=np.uint8)
        lesion[8:12, 30:34, 3:5] = 1
        cord = np.zeros_like(lesion)
        cord[6:14, :, 2:6] = 1
        (root / subject / "anat").mkdir(parents=True)
        labels = root / "derivatives" / "labels" / subject / "anat"
        labels.mkdir(parents=True)
        save_image(root / subject / "anat" / f"{subject}_T2w.nii.gz", image, affine)
        save_image(labels / f"{subject}_T2w_lesion-manual.nii.gz", lesion, affine)
        save_image(labels / f"{subject}_T2w_seg-manual.nii.gz", cord, affine)
    return root


def test_cut_fov_keeps_mm_along_the_cord_around_the_lesions(tmp_path):
    sim = small_sim(tmp_path / "sim")
    out = tmp_path / "cut"
    done = subprocess.run(
        [sys.executable, str(REPO / "bin" / "cut_fov"), str(sim), str(out), "val", "8"],
        capture_output=True,
        text=True,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    assert "sub-a002" not in (out / "participants.tsv").read_text() and not (out / "sub-a002").exists()
    image = nib.load(out / "sub-a001" / "anat" / "sub-a001_T2w.nii.gz")
    lesion = np.asarray(nib.load(out / "derivatives/labels/sub-a001/anat/sub-a001_T2w_lesion-manual.nii.gz").dataobj)
    cord = np.asarray(nib.load(out / "derivatives/labels/sub-a001/anat/sub-a001_T2w_seg-manual.nii.gz").dataobj)
    assert image.shape == lesion.shape == cord.shape == (20, 10, 8)  # 8 mm at 0.8 mm, only along S-I
    # Centred on the lesion (S-I voxels 30-33, mean 31.5 -> 31): voxels 26-35 kept, the whole lesion in them.
    assert lesion.sum() == 4 * 4 * 2 and np.array_equal(
        np.asarray(image.dataobj), np.arange(20 * 50 * 8, dtype=np.float32).reshape(20, 50, 8)[:, 26:36]
    )
    np.testing.assert_allclose(image.affine[:3, 3], [0, 0, -0.8 * 26])  # the cut keeps its place in the world
    again = subprocess.run(
        [sys.executable, str(REPO / "bin" / "cut_fov"), str(sim), str(out), "val", "8"],
        capture_output=True,
        text=True,
        check=False,
    )
    assert again.returncode != 0 and "not empty" in again.stderr


def test_dice_by_source_splits_real_anatomy_from_phantoms(tmp_path):
    sim = tmp_path / "sim"
    sim.mkdir()
    (sim / "participants.tsv").write_text(
        "participant_id\tsite\tsource\tsplit\n"
        "sub-a001\ta\tsub-errsm30_T2w\tval\nsub-a002\ta\tsub-phantom03_T2w\tval\nsub-a003\ta\tsub-pam50_T2w\tval\n"
    )
    cases = tmp_path / "cases.tsv"
    rows = [
        ("sub-a001", "a", 0.2),
        ("sub-a001", "universal", 0.1),
        ("sub-a002", "a", 0.9),
        ("sub-a002", "universal", 0.8),
        ("sub-a003", "a", 0.6),
        ("sub-a003", "universal", 0.3),
        ("sub-a003", "b", 0.0),
    ]
    cases.write_text("site\tsubject\thead\tdice\n" + "".join(f"a\t{s}\t{h}\t{d}\n" for s, h, d in rows))
    tool = [sys.executable, str(REPO / "bin" / "dice_by_source")]
    done = subprocess.run([*tool, str(sim), str(cases)], capture_output=True, text=True, check=False)
    assert done.returncode == 0, done.stderr
    assert done.stdout.splitlines() == [
        "phantom\town\t1\t0.900",
        "phantom\tuniversal\t1\t0.800",
        "real\town\t2\t0.400",
        "real\tuniversal\t2\t0.200",
    ]
    cases.write_text(cases.read_text() + "a\tsub-z009\ta\t1.0\n")
    bad = subprocess.run([*tool, str(sim), str(cases)], capture_output=True, text=True, check=False)
    assert bad.returncode == 2 and "sub-z009" in bad.stderr and "Traceback" not in bad.stderr


def test_lesion_probe_reads_the_probability_inside_each_reference(tmp_path, tiny_registry):
    """The tiny release marks bright voxels as lesion: a reference on the bright block scores high inside, one on
    the dim background scores low inside while the image still has a bright block elsewhere."""
    sim = tmp_path / "sim"
    sim.mkdir()
    (sim / "dataset_description.json").write_text(json.dumps({"Name": "sim", "BIDSVersion": "1.8.0"}))
    (sim / "participants.tsv").write_text(
        "participant_id\tsite\tsource\tsplit\n"
        "sub-montreal001\tmontreal\tsrc\ttest\nsub-montreal002\tmontreal\tsrc\ttest\n"
    )
    rng = np.random.default_rng(0)
    for subject, where in (("sub-montreal001", np.s_[16:24, 14:22, 8:16]), ("sub-montreal002", np.s_[2:6, 2:6, 2:6])):
        image = rng.normal(100, 5, (40, 36, 24)).astype(np.float32)
        image[16:24, 14:22, 8:16] = 400
        lesion = np.zeros(image.shape, dtype=np.uint8)
        lesion[where] = 1
        (sim / subject / "anat").mkdir(parents=True)
        labels = sim / "derivatives" / "labels" / subject / "anat"
        labels.mkdir(parents=True)
        save_image(sim / subject / "anat" / f"{subject}_T2w.nii.gz", image, np.eye(4))
        save_image(labels / f"{subject}_T2w_lesion-manual.nii.gz", lesion, np.eye(4))
    done = subprocess.run(
        [
            sys.executable,
            str(REPO / "bin" / "lesion_probe"),
            str(sim),
            "-registry",
            str(tiny_registry),
            "-threads",
            "1",
        ],
        capture_output=True,
        text=True,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    assert lines[0].split("\t") == [
        "site",
        "subject",
        "head",
        "lesion_voxels",
        "max_inside",
        "mean_inside",
        "max_anywhere",
    ]
    rows = {(r[1], r[2]): r[3:] for r in (line.split("\t") for line in lines[1:])}
    assert set(rows) == {(s, h) for s in ("sub-montreal001", "sub-montreal002") for h in ("montreal", "universal")}
    on_block, off_block = rows[("sub-montreal001", "montreal")], rows[("sub-montreal002", "montreal")]
    assert on_block[0] == str(8 * 8 * 8) and off_block[0] == str(4 * 4 * 4)
    assert float(on_block[2]) > 0.9 and float(off_block[1]) < 0.1 and float(off_block[3]) > 0.9
    bad = subprocess.run(
        [sys.executable, str(REPO / "bin" / "lesion_probe"), str(sim), "-registry", str(tmp_path / "none.json")],
        capture_output=True,
        text=True,
        check=False,
    )
    assert bad.returncode == 2 and "Traceback" not in bad.stderr
