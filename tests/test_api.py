"""The Python API, the README's example of it, and the one path from probabilities to a mask: `evaluate`,
`tune-thresholds` and the API score exactly the mask `sct_deepseg_lesion` writes."""

from __future__ import annotations

import json
import re
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from conftest import REPO
from nibabel.affines import voxel_sizes
from scipy import ndimage

import sct_sitehead
from sct_sitehead.cli.deepseg_lesion import main
from sct_sitehead.deploy.masks import threshold_mask
from sct_sitehead.errors import InputImageError, UnknownModelError, UsageError
from sct_sitehead.evaluation.evaluate import Case, evaluate_release, lesion_index
from sct_sitehead.evaluation.metrics import lesion_detection

#: The release these tests run on sub-ms01: its montreal head marks a lesion there (2.0.0, the default, marks
#: none), so the masks compared are not empty.
MARKING = "lesion@1.1.3"


@pytest.fixture
def ms01(bids_dir: Path) -> Path:
    """The real MS patient: release 1.1.3's montreal head finds a lesion there, so the masks compared are not
    empty."""
    return bids_dir / "sub-ms01" / "anat" / "sub-ms01_T2w.nii.gz"


def command_mask(image: Path, site: str, out: Path, capsys: pytest.CaptureFixture[str]) -> np.ndarray:
    code = main(["-i", str(image), "-site", site, "-o", str(out), "-model", MARKING])
    _, err = capsys.readouterr()
    assert code == 0, err
    return np.asanyarray(nib.load(out).dataobj) > 0


def test_evaluate_scores_exactly_the_mask_the_command_writes(ms01: Path, tmp_path: Path, capsys) -> None:
    written = command_mask(ms01, "montreal", tmp_path / "mask.nii.gz", capsys)
    assert written.any()
    # The command's own mask as the reference: evaluate's mask must match it voxel for voxel.
    reference = tmp_path / "reference.nii.gz"
    source = nib.load(ms01)
    nib.save(nib.Nifti1Image(written.astype(np.uint8), source.affine, source.header), reference)
    segmenter = sct_sitehead.open_segmenter("montreal", model=MARKING)
    (row,), _ = evaluate_release(segmenter, [Case("sub-ms01", "montreal", ms01, reference)])
    assert row["dice"] == 1.0
    assert row["fp_any"] == 0 and row["fn_any"] == 0
    assert row["volume_pred_mm3"] == row["volume_ref_mm3"] > 0


def test_tuning_thresholds_the_same_probabilities_into_the_same_mask(ms01: Path, tmp_path: Path, capsys) -> None:
    """tune-thresholds sweeps threshold_mask over the native probabilities; at the head's own rule it gives the
    command's mask."""
    written = command_mask(ms01, "montreal", tmp_path / "mask.nii.gz", capsys)
    segmenter = sct_sitehead.open_segmenter("montreal", model=MARKING)
    image, probabilities = segmenter.predict(ms01)
    values = probabilities["montreal"][lesion_index(segmenter, "montreal")]
    tuned = threshold_mask(values, segmenter.rule("montreal"), voxel_sizes(image.affine))
    np.testing.assert_array_equal(tuned, written)


def test_api_gives_the_command_s_masks_as_images(ms01: Path, tmp_path: Path, capsys) -> None:
    written = command_mask(ms01, "montreal", tmp_path / "sub_lesionseg.nii.gz", capsys)
    cord = np.asanyarray(nib.load(tmp_path / "sub_cordseg.nii.gz").dataobj)
    result = sct_sitehead.segment(ms01, "montreal", options=sct_sitehead.Options(soft=True), model=MARKING)
    site = result["montreal"]
    lesion = site.mask()
    source = nib.load(ms01)
    assert lesion.shape == source.shape and np.allclose(lesion.affine, source.affine)
    assert lesion.get_data_dtype() == np.uint8
    np.testing.assert_array_equal(np.asanyarray(lesion.dataobj) > 0, written)
    np.testing.assert_array_equal(np.asanyarray(site.mask("cord").dataobj), cord)
    soft = np.asanyarray(site.soft().dataobj)
    assert soft.dtype == np.float32 and (soft[written] >= site.facts["Threshold"]).all()
    found = lesion_detection(written, written)
    assert site.lesions["count"] == found["n_pred"] >= 1
    sidecar = json.loads((tmp_path / "sub_lesionseg.json").read_text())
    for key in ("Model", "Site", "Threshold", "MinLesionMm3", "CordCrop", "LesionCount", "Lesions", "HeadSha256"):
        assert site.facts[key] == sidecar[key], key
    assert site.facts["CordCrop"] == (None if result.crop is None else {"Bbox": [list(p) for p in result.crop]})
    # Each lesion's place, in native voxels of the written mask and in scanner mm (largest lesion first).
    ids, count = ndimage.label(written, structure=np.ones((3, 3, 3)))
    expected = sorted((np.argwhere(ids == i) for i in range(1, count + 1)), key=len, reverse=True)
    assert len(sidecar["Lesions"]) == count
    for entry, voxels in zip(sidecar["Lesions"], expected):
        assert entry["voxel_range"] == [[int(a), int(b)] for a, b in zip(voxels.min(axis=0), voxels.max(axis=0))]
        assert entry["centroid_voxel"] == pytest.approx(voxels.mean(axis=0), abs=0.051)
        world = source.affine @ np.append(voxels.mean(axis=0), 1.0)
        assert entry["centroid_mm"] == pytest.approx(world[:3], abs=0.051)


def test_api_takes_a_nibabel_image_and_gives_what_the_path_gives(ms01: Path) -> None:
    segmenter = sct_sitehead.open_segmenter(["montreal", "universal"])
    from_path = segmenter.segment(ms01)
    loaded = nib.load(ms01)
    in_memory = nib.Nifti1Image(np.asanyarray(loaded.dataobj), loaded.affine, loaded.header)
    from_image = segmenter.segment(in_memory)
    assert list(from_image) == ["montreal", "universal"]
    for site in from_image:
        np.testing.assert_array_equal(from_image[site].mask().dataobj, from_path[site].mask().dataobj)
    assert from_image["montreal"].facts["Source"] == "<in-memory image>"


def test_api_raises_the_package_s_typed_errors(tmp_path: Path) -> None:
    with pytest.raises(UsageError, match="no site given"):
        sct_sitehead.open_segmenter()
    with pytest.raises(UnknownModelError, match="montreal"):
        sct_sitehead.open_segmenter("montrael")
    segmenter = sct_sitehead.open_segmenter("montreal")
    flat = nib.Nifti1Image(np.zeros((20, 20, 1, 1), dtype=np.float32).squeeze(-1)[..., 0], np.eye(4))
    with pytest.raises(InputImageError, match="2D"):
        segmenter.segment(flat)
    with pytest.raises(InputImageError, match="not a nibabel Nifti1Image"):
        segmenter.segment(np.zeros((20, 20, 20)))  # type: ignore[arg-type]
    with pytest.raises(InputImageError, match="no such file"):
        segmenter.segment(tmp_path / "missing.nii.gz")


def readme_example() -> str:
    """The Python block of the README's "Python API" section."""
    text = (REPO / "README.md").read_text(encoding="utf-8")
    section = text.split("## Python API", 1)[1].split("\n## ", 1)[0]
    blocks = re.findall(r"```python\n(.*?)```", section, flags=re.S)
    assert blocks, "the README's Python API section has no python block"
    return blocks[0]


def test_readme_python_example_runs(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from sct_sitehead.simulate import make_phantom, write_phantom

    monkeypatch.chdir(tmp_path)
    write_phantom(make_phantom((64, 64, 48), (0.8, 0.8, 1.0), seed=1), tmp_path / "t2.nii.gz")
    namespace: dict[str, object] = {}
    exec(compile(readme_example(), "README.md", "exec"), namespace)
    mask = nib.load(tmp_path / "t2_lesionseg.nii.gz")
    assert mask.shape == nib.load(tmp_path / "t2.nii.gz").shape
    assert (tmp_path / "t2_cordseg.nii.gz").is_file()
