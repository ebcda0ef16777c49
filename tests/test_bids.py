"""BIDS reader on the real shared data and on small synthetic trees with planted problems."""

from __future__ import annotations

from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from sct_sitehead.errors import InputImageError
from sct_sitehead.evaluation.bids import Sample, load_spatial_image, read_bids


def test_real_dataset(bids_dir: Path):
    samples, problems = read_bids(bids_dir)
    assert len(samples) == 44
    assert len({s.subject for s in samples}) == 25
    assert {"sub-errsm30", "sub-pam50", "sub-unf01", "sub-tut05", "sub-ms01", "sub-gmc9418"} <= {
        s.subject for s in samples
    }
    assert {s.site for s in samples} == {
        "errsm",
        "template",
        "unf",
        "unknown",
        "ucl",
        "philips",
        "juntendo",
        "milan",
        "ceitec",
    }
    with_cord = [s for s in samples if "cord" in s.labels]
    assert len(with_cord) == 22
    assert {"sub-errsm30", "sub-pam50", "sub-unf01", "sub-tut05", "sub-gmc9604"} <= {s.subject for s in with_cord}
    assert not any("lesion" in s.labels for s in samples)
    mts = next(s for s in samples if s.subject == "sub-errsm30" and s.contrast == "MTS")
    assert mts.acquisition == "MTon" and mts.labels["cord"].name == "sub-errsm30_acq-MTon_MTS_seg.nii.gz"
    t2star = next(s for s in samples if s.subject == "sub-errsm30" and s.contrast == "T2star")
    assert t2star.labels["cord"].name.endswith("_T2star_seg.nii.gz")  # the alternative suffix
    assert {s.contrast for s in samples} == {"T1w", "T2w", "T2star", "MTS"}
    # images without a cord mask at a site where others have one are reported, one line each, naming the site
    assert len(problems) == 13
    assert all("has no usable cord label" in p and "of site '" in p for p in problems)
    assert not any("sub-ms01" in p for p in problems)  # its site ('unknown') has no cord mask at all


def test_real_dataset_site_column_is_configurable(bids_dir: Path):
    samples, problems = read_bids(bids_dir, site_column="pathology", label_suffixes={"cord": "seg-manual"})
    assert {s.site for s in samples} == {"HC", "MS", "MildCompression"}
    assert sum("cord" in s.labels for s in samples) == 16  # only the seg-manual ones
    # the `_seg` files are not orphans: they belong to images, under a suffix not asked for
    assert not any("belongs to no image" in p for p in problems)


def _save(path: Path, data: np.ndarray, affine: np.ndarray | None = None) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(nib.Nifti1Image(data, np.eye(4) if affine is None else affine), path)
    return path


@pytest.fixture()
def tree(tmp_path: Path) -> Path:
    """Two sites; site A labels lesions and cords, one A image lost its lesion label, one label is misaligned."""
    root = tmp_path / "ds"
    root.mkdir()
    (root / "participants.tsv").write_text(
        "participant_id\tsite\tage\nsub-a1\tA\t30\nsub-a2\tA\t40\nsub-a3\tA\t50\nsub-b1\tB\t60\n"
    )
    image = np.zeros((6, 7, 8), dtype=np.int16)
    mask = np.zeros((6, 7, 8), dtype=np.uint8)
    labels = root / "derivatives" / "labels"
    for sub in ("a1", "a2", "a3"):
        _save(root / f"sub-{sub}" / "anat" / f"sub-{sub}_T2w.nii.gz", image)
        _save(labels / f"sub-{sub}" / "anat" / f"sub-{sub}_T2w_seg-manual.nii.gz", mask)
    _save(labels / "sub-a1" / "anat" / "sub-a1_T2w_lesion-manual.nii.gz", mask)
    _save(labels / "sub-a2" / "anat" / "sub-a2_T2w_lesion-manual.nii.gz", np.zeros((6, 7, 9), np.uint8))  # shape
    shifted = np.eye(4)
    shifted[0, 3] = 2.0  # 2 mm off
    _save(labels / "sub-a1" / "anat" / "sub-a1_T2w_seg-manual.nii.gz", mask, shifted)
    # sub-a3 has no lesion label at all: missing while others of site A have one
    _save(root / "sub-b1" / "ses-01" / "anat" / "sub-b1_ses-01_acq-sag_T1w.nii.gz", image)
    _save(labels / "sub-b1" / "ses-01" / "anat" / "sub-b1_ses-01_acq-sag_T1w_seg.nii.gz", mask)
    return root


def test_synthetic_tree_reports_every_problem(tree: Path):
    samples, problems = read_bids(tree)
    by_subject = {s.subject: s for s in samples}
    assert sorted(by_subject) == ["sub-a1", "sub-a2", "sub-a3", "sub-b1"]
    assert set(by_subject["sub-a1"].labels) == {"lesion"}  # its cord mask is misaligned and left out
    assert set(by_subject["sub-a2"].labels) == {"cord"}  # its lesion mask has the wrong shape
    assert set(by_subject["sub-a3"].labels) == {"cord"}
    b1 = by_subject["sub-b1"]
    assert (b1.session, b1.contrast, b1.acquisition, b1.site) == ("ses-01", "T1w", "sag", "B")
    assert set(b1.labels) == {"cord"}
    text = "\n".join(problems)
    assert "sub-a1_T2w_seg-manual.nii.gz: cord label affine differs" in text and "2 mm" in text
    assert "sub-a2_T2w_lesion-manual.nii.gz: lesion label has shape (6, 7, 9) but its image has (6, 7, 8)" in text
    missing = [p for p in problems if "has no usable" in p]
    # a1 lost its cord mask (misaligned); a2 and a3 have no lesion mask while a1 has one
    assert len(missing) == 3
    assert any(p.startswith("sub-a3/anat/sub-a3_T2w.nii.gz has no usable lesion label while 1 of 3") for p in missing)
    assert len(problems) == 5


def test_unreadable_unknown_and_orphan_files_are_reported(tree: Path):
    truncated = tree / "sub-a2" / "anat" / "sub-a2_T2w.nii.gz"
    truncated.write_bytes(truncated.read_bytes()[:60])
    _save(tree / "sub-c1" / "anat" / "sub-c1_T2w.nii.gz", np.zeros((4, 4, 4), np.int16))
    _save(tree / "derivatives" / "labels" / "sub-c1" / "anat" / "sub-c9_T2w_seg-manual.nii.gz", np.zeros((4, 4, 4)))
    (tree / "sub-c1" / "anat" / "notes_T2w.nii.gz").write_bytes(b"")
    with (tree / "participants.tsv").open("a") as table:
        table.write("sub-c2\t\t70\n")
    _save(tree / "sub-c2" / "anat" / "sub-c2_T2w.nii.gz", np.zeros((4, 4, 4), np.int16))
    samples, problems = read_bids(tree)
    assert "sub-a2" not in {s.subject for s in samples}
    text = "\n".join(problems)
    assert "sub-a2/anat/sub-a2_T2w.nii.gz cannot be read" in text
    assert "sub-c1 has images but no row in participants.tsv; its site is 'n/a'" in text
    assert "sub-c2 has images but no value in participants.tsv column 'site'" in text
    assert "sub-c9_T2w_seg-manual.nii.gz belongs to no image" in text
    assert "notes_T2w.nii.gz: file name is not BIDS" in text
    assert next(s for s in samples if s.subject == "sub-c1").site == "n/a"


def test_alternative_suffixes_and_missing_participants_table(tree: Path):
    (tree / "participants.tsv").unlink()
    samples, problems = read_bids(tree, label_suffixes={"cord": ["seg-manual", "seg"]})
    assert all(s.site == "n/a" for s in samples)
    assert "participants.tsv is missing" in problems[0]
    assert next(s for s in samples if s.subject == "sub-b1").labels["cord"].name.endswith("_T1w_seg.nii.gz")


def test_labels_from_another_derivatives_tree(tree: Path):
    truth = tree / "derivatives" / "truth"
    for sub in ("a1", "a2", "a3"):
        _save(truth / f"sub-{sub}" / "anat" / f"sub-{sub}_T2w_cord-truth.nii.gz", np.ones((6, 7, 8), np.uint8))
    samples, problems = read_bids(tree, label_suffixes={"cord": "cord-truth"}, labels_dir="derivatives/truth")
    by_subject = {s.subject: s for s in samples}
    # Every A image takes its cord from the truth tree, sub-a1's misaligned seg-manual is not even looked at.
    assert {s: set(by_subject[s].labels) for s in ("sub-a1", "sub-a2", "sub-a3")} == {
        "sub-a1": {"cord"},
        "sub-a2": {"cord"},
        "sub-a3": {"cord"},
    }
    assert by_subject["sub-a1"].labels["cord"].parent.parts[-3:] == ("truth", "sub-a1", "anat")
    assert problems == []  # the labels tree's misaligned mask is not read; site B has no cord anywhere
    with pytest.raises(InputImageError, match="not inside the dataset"):
        read_bids(tree, labels_dir="../elsewhere")


def test_wrong_site_column_and_bad_root(tree: Path, tmp_path: Path):
    _, problems = read_bids(tree, site_column="centre")
    assert any("without 'participant_id' and 'centre'" in p for p in problems)
    with pytest.raises(InputImageError, match="no sub-"):
        read_bids(tmp_path / "ds" / "derivatives")
    with pytest.raises(InputImageError, match="does not exist"):
        read_bids(tmp_path / "nowhere")


def test_sample_is_frozen(tree: Path):
    sample = read_bids(tree)[0][0]
    assert isinstance(sample, Sample) and sample.stem == "sub-a1_T2w"
    with pytest.raises(AttributeError):
        sample.site = "X"  # type: ignore[misc]


def test_load_spatial_image_reads_voxel_images_and_refuses_others(tmp_path: Path):
    path = tmp_path / "image.nii.gz"
    nib.save(nib.Nifti1Image(np.arange(24, dtype=np.int16).reshape(2, 3, 4), np.eye(4)), path)
    image = load_spatial_image(path)
    assert image.shape == (2, 3, 4) and np.asarray(image.dataobj)[1, 2, 3] == 23
    surface = tmp_path / "surface.gii"
    nib.save(nib.gifti.GiftiImage(), surface)  # nibabel reads it, but it has no voxels
    with pytest.raises(InputImageError, match="GiftiImage, not an image with voxels"):
        load_spatial_image(surface)
