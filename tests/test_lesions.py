"""lesions.py: thresholds, 26-connected lesions, volumes and centroids."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from scipy import ndimage

from sct_sitehead.deploy.lesions import binarize, drop_small_lesions, label_lesions, lesion_stats
from sct_sitehead.errors import UsageError


def test_binarize_includes_the_threshold():
    prob = np.array([0.0, 0.39, 0.4, 0.41, 1.0], np.float32)
    np.testing.assert_array_equal(binarize(prob, 0.4), [False, False, True, True, True])
    for bad in (0.0, 1.5, float("nan"), "0.5"):
        with pytest.raises(UsageError, match="threshold"):
            binarize(prob, bad)


def test_corner_touching_voxels_are_one_lesion():
    mask = np.zeros((6, 6, 6), bool)
    mask[1, 1, 1] = mask[2, 2, 2] = True  # corner contact: one lesion with 26-connectivity
    mask[4, 4, 4] = True  # apart
    stats = lesion_stats(mask, (1.0, 1.0, 1.0))
    assert stats["count"] == 2
    assert [lesion["voxels"] for lesion in stats["lesions"]] == [2, 1]


def test_small_lesions_are_dropped_by_their_volume_in_mm3():
    mask = np.zeros((8, 8, 8), bool)
    mask[1, 1, 1] = mask[2, 2, 2] = True  # one lesion (corner contact) of 2 voxels: 2 x 1 x 1 x 3 = 6 mm³
    mask[5:7, 5:7, 5] = True  # 4 voxels: 12 mm³
    zooms = (1.0, 1.0, 3.0)
    assert drop_small_lesions(mask.copy(), zooms, 0.0).sum() == 6
    kept = drop_small_lesions(mask.copy(), zooms, 6.0)
    np.testing.assert_array_equal(kept, mask)  # a lesion of exactly the smallest volume stays
    kept = mask.copy()
    assert drop_small_lesions(kept, zooms, 6.1) is kept  # in place
    assert kept.sum() == 4 and kept[5, 5, 5] and not kept[1, 1, 1]
    assert not drop_small_lesions(mask.copy(), zooms, 12.1).any()
    assert not drop_small_lesions(np.zeros((3, 3, 3), bool), zooms, 5.0).any()


def test_volumes_centroids_and_order_with_anisotropic_voxels():
    mask = np.zeros((10, 10, 10), bool)
    mask[1:3, 1:3, 1:2] = True  # 4 voxels
    mask[5:8, 5:8, 5:8] = True  # 27 voxels
    mask[0, 9, 9] = True  # 1 voxel
    affine = np.diag([0.5, 0.5, 3.0, 1.0])
    affine[:3, 3] = [10, 20, 30]
    stats = lesion_stats(mask, (0.5, 0.5, 3.0), affine=affine)
    assert stats["count"] == 3
    assert stats["voxel_volume_mm3"] == pytest.approx(0.75)
    assert stats["total_volume_mm3"] == pytest.approx(32 * 0.75)
    assert [lesion["id"] for lesion in stats["lesions"]] == [1, 2, 3]
    assert [lesion["voxels"] for lesion in stats["lesions"]] == [27, 4, 1]
    assert stats["lesions"][0]["volume_mm3"] == pytest.approx(27 * 0.75)
    assert stats["lesions"][0]["centroid_voxel"] == pytest.approx([6.0, 6.0, 6.0])
    assert stats["lesions"][1]["centroid_voxel"] == pytest.approx([1.5, 1.5, 1.0])
    assert stats["lesions"][0]["centroid_mm"] == pytest.approx([13.0, 23.0, 48.0])
    assert stats["lesions"][0]["voxel_range"] == [[5, 7], [5, 7], [5, 7]]
    assert stats["lesions"][2]["voxel_range"] == [[0, 0], [9, 9], [9, 9]]
    # The same mask as a window that starts at native voxel (2, 3, 4): native indices and world places move.
    shifted = lesion_stats(mask, (0.5, 0.5, 3.0), affine=affine, offset=(2, 3, 4))
    assert shifted["lesions"][0]["centroid_voxel"] == pytest.approx([8.0, 9.0, 10.0])
    assert shifted["lesions"][0]["voxel_range"] == [[7, 9], [8, 10], [9, 11]]
    assert shifted["lesions"][0]["centroid_mm"] == pytest.approx([14.0, 24.5, 60.0])


def test_empty_mask_and_bad_zooms():
    stats = lesion_stats(np.zeros((4, 4, 4), bool), (1.0, 1.0, 1.0))
    assert stats == {"count": 0, "total_volume_mm3": 0.0, "voxel_volume_mm3": 1.0, "lesions": []}
    for zooms in ((1.0, 0.0, 1.0), (1.0, 1.0), (1.0, float("inf"), 1.0)):
        with pytest.raises(UsageError, match="zooms"):
            lesion_stats(np.zeros((4, 4, 4), bool), zooms)
    with pytest.raises(UsageError, match="3D"):
        label_lesions(np.zeros((4, 4), bool))


@settings(max_examples=40, deadline=None)
@given(
    shape=st.tuples(*[st.integers(1, 12)] * 3),
    density=st.floats(0.0, 0.4),
    seed=st.integers(0, 2**16),
    zooms=st.tuples(*[st.floats(0.2, 5.0)] * 3),
)
def test_stats_agree_with_a_direct_count(shape, density, seed, zooms):
    mask = np.random.default_rng(seed).random(shape) < density
    stats = lesion_stats(mask, zooms)
    labels, count = ndimage.label(mask, structure=np.ones((3, 3, 3)))
    assert stats["count"] == count
    voxel = zooms[0] * zooms[1] * zooms[2]
    assert stats["total_volume_mm3"] == pytest.approx(mask.sum() * voxel)
    sizes = [lesion["voxels"] for lesion in stats["lesions"]]
    assert sizes == sorted(sizes, reverse=True)
    expected = sorted(
        (tuple(np.round(np.argwhere(labels == i).mean(axis=0), 6)), int((labels == i).sum()))
        for i in range(1, count + 1)
    )
    got = sorted((tuple(np.round(lesion["centroid_voxel"], 6)), lesion["voxels"]) for lesion in stats["lesions"])
    assert got == expected
    boxes = ndimage.find_objects(labels)
    ranges = sorted([[b.start, b.stop - 1] for b in boxes[i - 1]] for i in range(1, count + 1))
    assert sorted(lesion["voxel_range"] for lesion in stats["lesions"]) == ranges
