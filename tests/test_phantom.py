"""Procedural phantom: anatomy, contrasts, resolution independence, memory on a whole spine."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from scipy import ndimage

from sct_sitehead.errors import UsageError
from sct_sitehead.evaluation.metrics import dice
from sct_sitehead.simulate.grids import resample
from sct_sitehead.simulate.phantom import make_phantom, truth_paths, write_phantom


def arr(img: nib.Nifti1Image) -> np.ndarray:
    return np.asarray(img.dataobj)


@pytest.fixture(scope="module")
def t2() -> object:
    return make_phantom((48, 48, 60), (1.0, 1.0, 1.0), n_lesions=4, seed=7)


def test_cord_inside_csf_and_lesions_inside_cord(t2):
    cord, csf, lesion = arr(t2.cord) > 0, arr(t2.csf) > 0, arr(t2.lesion) > 0
    assert cord.sum() > 0 and csf.sum() > 0 and lesion.sum() > 0
    assert not (cord & csf).any()
    assert not (lesion & ~cord).any()
    # CSF surrounds the cord: one voxel out from the cord in any direction is still cord or CSF
    grown = ndimage.binary_dilation(cord)
    assert not (grown & ~(cord | csf)).any()
    # every slice along S that crosses the phantom holds one cord cross-section
    assert all(ndimage.label(cord[:, :, k])[1] == 1 for k in range(cord.shape[2]))


def test_cord_size_is_realistic(t2):
    cord = arr(t2.cord) > 0
    z0 = cord.shape[2] // 2  # world z = 0: the cervical enlargement
    xs, ys = np.nonzero(cord[:, :, z0])
    width_rl, width_ap = np.ptp(xs) + 1, np.ptp(ys) + 1
    assert 10 <= width_rl <= 14 and 7 <= width_ap <= 10
    thoracic = make_phantom((40, 40, 10), (1.0, 1.0, 1.0), n_lesions=0, center=(0, 0, -200), noise=0)
    xs, ys = np.nonzero(arr(thoracic.cord)[:, :, 5])
    assert np.ptp(xs) + 1 < width_rl and np.ptp(ys) + 1 <= width_ap  # thinner below the enlargement


@pytest.mark.parametrize(
    ("contrast", "csf_brighter", "lesion_brighter"),
    [("T2w", True, True), ("T2star", True, True), ("T1w", False, False), ("MTS", True, True)],
)
def test_contrasts(contrast, csf_brighter, lesion_brighter):
    ph = make_phantom((40, 40, 40), (1.0, 1.0, 1.0), contrast=contrast, n_lesions=3, seed=1)
    image = arr(ph.image).astype(float)
    # mean over the mask interiors only, so partial volume at the edges does not blur the comparison
    cord = ndimage.binary_erosion(arr(ph.cord) > 0) & ~ndimage.binary_dilation(arr(ph.lesion) > 0)
    csf = arr(ph.csf) > 0
    lesion = arr(ph.lesion) > 0
    assert (image[csf].mean() > image[cord].mean()) == csf_brighter
    assert (image[lesion].mean() > image[cord].mean()) == lesion_brighter
    assert abs(image[lesion].mean() - image[cord].mean()) > 100  # well above the noise (sigma ~20)


def test_lesions_are_elongated_along_the_cord(t2):
    for lesion in t2.lesions:
        along, *across = lesion["semi_axes_mm"]
        assert along > max(across)
        assert lesion["axis"][2] > 0.95  # the cord runs close to S


def _cord_on(reference, other) -> np.ndarray:
    moved = resample(
        arr(other.cord).astype(np.float32), other.cord.affine, reference.cord.shape, reference.cord.affine, order=1
    )
    return moved >= 0.5


@pytest.mark.parametrize(
    ("shape", "spacing", "orientation", "oblique"),
    [
        ((69, 40, 40), (0.7, 1.5, 1.2), "PSR", 0.0),
        ((40, 40, 30), (1.2, 1.2, 2.0), "LPI", 0.0),
        ((48, 48, 60), (1.0, 1.0, 1.0), "RAS", 15.0),
    ],
)
def test_same_world_at_other_resolutions_and_orientations(t2, shape, spacing, orientation, oblique):
    other = make_phantom(shape, spacing, orientation=orientation, n_lesions=4, seed=7, oblique_deg=oblique)
    assert nib.aff2axcodes(other.image.affine) == tuple(orientation) or oblique
    reference = arr(t2.cord) > 0
    moved = _cord_on(t2, other)
    # compare where both grids see the anatomy (the other grid's field of view is a little different)
    seen = resample(np.ones(other.cord.shape, np.float32), other.cord.affine, t2.cord.shape, t2.cord.affine) > 0.99
    assert dice(moved & seen, reference & seen) > 0.8
    if not oblique:  # same z field of view -> the same lesions in world space
        assert other.lesions == t2.lesions
        lesion = resample(arr(other.lesion), other.lesion.affine, t2.lesion.shape, t2.lesion.affine) >= 0.5
        assert dice(lesion & seen, (arr(t2.lesion) > 0) & seen) > 0.7


def test_seed_determinism_and_dtypes(t2):
    again = make_phantom((48, 48, 60), (1.0, 1.0, 1.0), n_lesions=4, seed=7)
    assert np.array_equal(arr(again.image), arr(t2.image))
    other = make_phantom((48, 48, 60), (1.0, 1.0, 1.0), n_lesions=4, seed=8)
    assert other.lesions != t2.lesions
    floats = make_phantom((16, 16, 16), (1.0, 1.0, 1.0), dtype=np.float32, noise=0, n_lesions=0)
    assert arr(floats.image).dtype == np.float32 and not arr(floats.lesion).any()
    assert arr(t2.image).dtype == np.int16 and arr(t2.cord).dtype == np.uint8


def test_write_phantom(tmp_path: Path, t2):
    out = tmp_path / "sub" / "example_T2w.nii.gz"
    paths = write_phantom(t2, out)
    assert paths["lesion"] == truth_paths(out)["lesion"] == tmp_path / "sub" / "example_T2w_lesion-truth.nii.gz"
    assert paths["cord"].name == "example_T2w_cord-truth.nii.gz"
    for key, path in paths.items():
        img = nib.load(path)
        assert np.allclose(img.affine, t2.image.affine) and img.shape == t2.image.shape
        assert img.header.get_sform(coded=True)[1] == 1
        assert np.array_equal(np.asarray(img.dataobj), arr(getattr(t2, key)))


def test_bad_arguments():
    with pytest.raises(UsageError, match="contrast 'FLAIR'"):
        make_phantom((8, 8, 8), (1, 1, 1), contrast="FLAIR")
    with pytest.raises(UsageError, match="orientation 'RAR'"):
        make_phantom((8, 8, 8), (1, 1, 1), orientation="RAR")
    with pytest.raises(UsageError, match="spacing"):
        make_phantom((8, 8, 8), (1, 0, 1))


@pytest.mark.slow
def test_whole_spine_is_built_in_bounded_memory():
    """300 x 300 x 800 at 0.8 mm in a fresh process: peak memory under 2 GB (slab by slab, not whole volumes).

    Its time is not asserted (speed is the benchmark's business, not a unit test's): it is printed.
    """
    code = (
        "import json, resource, time\n"
        "from sct_sitehead.simulate.phantom import make_phantom\n"
        "t = time.perf_counter()\n"
        "ph = make_phantom((300, 300, 800), (0.8, 0.8, 0.8), center=(0, 0, -150))\n"
        "seconds = time.perf_counter() - t\n"
        "rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024\n"
        "print(json.dumps({'seconds': seconds, 'rss': rss, 'cord': int((ph.cord.dataobj[:] > 0).sum())}))\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=300)
    report = json.loads(done.stdout.strip().splitlines()[-1])
    print(f"whole-spine phantom: {report['seconds']:.1f} s, peak {report['rss'] / 1e9:.2f} GB")
    assert report["rss"] < 2e9, report
    assert report["cord"] > 50_000
