"""spatial.py: native grid <-> model grid, exact reorientation, separable resampling, oblique affines."""

from __future__ import annotations

import tracemalloc

import nibabel as nib
import numpy as np
import pytest
from hypothesis import assume, given, settings
from hypothesis import strategies as st
from test_nifti import AXIS_CODES, DTYPES, oriented_affine

from sct_sitehead.deploy.nifti import image_data, load_image
from sct_sitehead.deploy.spatial import (
    from_model_grid,
    mask_from_model_grid,
    model_size,
    orientation_transform,
    three,
    to_model_grid,
)
from sct_sitehead.deploy.windows import fill_window
from sct_sitehead.errors import InferenceError, RegistryError, UsageError

codes = st.sampled_from(AXIS_CODES)
spacings = st.tuples(*[st.floats(0.3, 8.0)] * 3)
# Below 45 degrees per rotation so that the closest axes are never an exact tie.
rotations = st.tuples(*[st.floats(-40.0, 40.0)] * 3)
PROPERTY = settings(max_examples=40, deadline=None)


def reoriented_voxel_sizes(affine: np.ndarray, shape, target: str) -> np.ndarray:
    """Voxel sizes along the model axes when only reorienting (what spacing makes resampling a no-op)."""
    ornt = nib.orientations.io_orientation(affine)
    transform = nib.orientations.ornt_transform(ornt, nib.orientations.axcodes2ornt(tuple(target)))
    reoriented = affine @ nib.orientations.inv_ornt_aff(transform, shape)
    return np.sqrt((reoriented[:3, :3] ** 2).sum(axis=0))


def world(affine: np.ndarray, shape) -> np.ndarray:
    """(N, 3) world coordinates of every voxel centre, C order."""
    index = np.indices(shape).reshape(3, -1)
    return (affine[:3, :3] @ index).T + affine[:3, 3]


def dice(a: np.ndarray, b: np.ndarray) -> float:
    return 2.0 * np.logical_and(a, b).sum() / max(a.sum() + b.sum(), 1)


@PROPERTY
@given(
    native=codes,
    target=codes,
    spacing=spacings,
    rotation=rotations,
    dtype=st.sampled_from(DTYPES),
    shape=st.tuples(*[st.integers(2, 9)] * 3),
)
def test_reorient_then_undo_is_the_identity(native, target, spacing, rotation, dtype, shape):
    affine = oriented_affine(native, spacing, rotation)
    model_mm = reoriented_voxel_sizes(affine, shape, target)
    data = np.random.default_rng(0).integers(0, 120, shape).astype(dtype)
    volume, grid = to_model_grid(data, affine, target, model_mm)
    assert not grid.resampled
    assert volume.dtype == np.float32 and sorted(volume.shape) == sorted(shape)
    np.testing.assert_array_equal(from_model_grid(volume, grid), data.astype(np.float32))
    np.testing.assert_array_equal(from_model_grid(volume > 60, grid, order=0), data > 60)
    # Every model voxel sits where its native voxel was, in world coordinates: label voxels by their index.
    index = np.arange(np.prod(shape), dtype=np.float32).reshape(shape)
    moved, grid = to_model_grid(index, affine, target, model_mm)
    source = np.unravel_index(moved.astype(np.int64).ravel(), shape)
    np.testing.assert_allclose(
        world(grid.affine, moved.shape), world(affine, shape).reshape(*shape, 3)[source], atol=1e-6
    )


@PROPERTY
@given(native=codes, target=codes, spacing=spacings, rotation=rotations, model_mm=st.tuples(*[st.floats(0.5, 2.5)] * 3))
def test_model_affine_maps_model_voxels_to_world(native, target, spacing, rotation, model_mm):
    """A linear function of world position, resampled (order 1), stays that function on the model grid."""
    shape = tuple(int(np.clip(np.ceil(20.0 / s), 3, 40)) for s in spacing)
    affine = oriented_affine(native, spacing, rotation, origin=(-3.0, 40.0, 12.0))
    # Within 1e-4 of the native spacing an axis is copied, not resampled: its model spacing is the native one.
    assume(not np.isclose(model_mm, reoriented_voxel_sizes(affine, shape, target), rtol=1e-4, atol=0).any())
    gradient = np.array([0.3, -0.7, 0.5])
    data = (world(affine, shape) @ gradient).reshape(shape).astype(np.float32)
    volume, grid = to_model_grid(data, affine, target, model_mm)
    assert nib.aff2axcodes(grid.affine) == tuple(target)
    np.testing.assert_allclose(np.sqrt((grid.affine[:3, :3] ** 2).sum(axis=0)), model_mm, rtol=1e-9)
    # Only model voxels inside the native voxel centres' hull: outside, edges are extended (mode "nearest").
    index = np.indices(grid.shape).reshape(3, -1).T
    reoriented = index * np.asarray(grid.scale) + np.asarray(grid.offset)
    inside = np.all((reoriented >= -1e-9) & (reoriented <= np.asarray(grid.reoriented_shape) - 1 + 1e-9), axis=1)
    assume(inside.any())
    expected = world(grid.affine, grid.shape) @ gradient
    np.testing.assert_allclose(volume.ravel()[inside], expected[inside], atol=2e-3 * (1 + np.abs(expected).max()))


@PROPERTY
@given(
    native=codes,
    target=codes,
    spacing=spacings,
    rotation=rotations,
    model_mm=st.tuples(*[st.floats(0.5, 2.0)] * 3),
    shift=st.tuples(*[st.floats(-1.0, 1.0)] * 3),
)
def test_blob_comes_back_where_it_was(native, target, spacing, rotation, model_mm, shift):
    radius = 6.0
    shape = tuple(int(np.clip(np.ceil(4 * radius / s), 3, 80)) for s in spacing)
    affine = oriented_affine(native, spacing, rotation)
    points = world(affine, shape)
    centre = affine[:3, :3] @ ((np.asarray(shape) - 1) / 2.0) + affine[:3, 3] + np.asarray(shift)
    mask = (np.linalg.norm(points - centre, axis=1) <= radius).reshape(shape)
    assume(mask.sum() >= 4)
    volume, grid = to_model_grid(mask.astype(np.float32), affine, target, model_mm)
    tolerance = 0.5 * max(max(spacing), max(model_mm))
    weights = volume.ravel()
    model_centre = (world(grid.affine, grid.shape) * weights[:, None]).sum(axis=0) / weights.sum()
    true_centre = points[mask.ravel()].mean(axis=0)
    assert np.linalg.norm(model_centre - true_centre) < tolerance
    back = from_model_grid(volume, grid) >= 0.5
    assert back.shape == mask.shape
    assert dice(back, mask) > 0.85
    assert np.linalg.norm(points[back.ravel()].mean(axis=0) - true_centre) < tolerance


@PROPERTY
@given(
    native=codes,
    target=codes,
    spacing=spacings,
    rotation=rotations,
    model_mm=st.tuples(*[st.floats(0.4, 3.0)] * 3),
    seed=st.integers(0, 2**16),
    threshold=st.sampled_from([0.2, 0.5, 0.9]),
)
def test_mask_resampled_near_its_hot_voxels_only_is_the_whole_resampled_mask(
    native, target, spacing, rotation, model_mm, seed, threshold
):
    """mask_from_model_grid = from_model_grid(window_only) >= threshold, on any grid, crop and blob placement
    (blobs at the grid's edges included); voxels within float rounding of the threshold may differ."""
    rng = np.random.default_rng(seed)
    shape = tuple(int(n) for n in rng.integers(6, 14, 3))
    affine = oriented_affine(native, spacing, rotation)
    starts = rng.integers(0, 3, 3)
    bbox = tuple((int(a), int(a) + int(n) - 4) for a, n in zip(starts, shape))
    _, grid = to_model_grid(np.zeros(shape, np.float32), affine, target, model_mm, bbox=bbox)
    channel = np.zeros(grid.shape, np.float32)
    for _ in range(int(rng.integers(0, 3))):
        centre = [int(rng.integers(0, n)) for n in grid.shape]
        box = tuple(slice(max(c - 1, 0), c + 1) for c in centre)
        channel[box] = rng.uniform(0.1, 1.0)
    full = from_model_grid(channel, grid, 1, window_only=True)
    mask = mask_from_model_grid(channel, grid, threshold)
    assert mask.shape == full.shape and mask.dtype == bool
    differ = mask != (full >= threshold)
    assert not differ.any() or np.abs(full[differ] - threshold).max() < 1e-5


@PROPERTY
@given(native=codes, target=codes, spacing=spacings, rotation=rotations, model_mm=spacings)
def test_one_orientation_transform_and_one_rounding_for_the_grid_and_the_crop_window(
    native, target, spacing, rotation, model_mm
):
    """to_model_grid and fill_window reorient and round model sizes through the same two functions: the grid of a
    box has, along each model axis, the size model_size gives for the box's native axis that goes there."""
    shape = (11, 7, 9)
    affine = oriented_affine(native, spacing, rotation)
    transform = orientation_transform(affine, target)
    expected = nib.orientations.ornt_transform(
        nib.orientations.io_orientation(affine), nib.orientations.axcodes2ornt(tuple(target))
    )
    np.testing.assert_array_equal(transform, expected)
    _, grid = to_model_grid(np.zeros(shape, np.float32), affine, target, model_mm, bbox=((1, 9), (2, 7), (0, 4)))
    np.testing.assert_array_equal(grid.to_model, transform)
    inverse = nib.orientations.ornt_transform(
        nib.orientations.axcodes2ornt(tuple(target)), nib.orientations.io_orientation(affine)
    )
    np.testing.assert_array_equal(grid.to_native, inverse)
    native_mm = np.sqrt((affine[:3, :3] ** 2).sum(axis=0))
    for axis, (model_axis, _) in enumerate(transform.astype(int)):
        extent = (8, 5, 4)[axis]
        assert grid.shape[model_axis] == model_size(extent, native_mm[axis], model_mm[model_axis])


def test_model_size_rounds_the_field_of_view_to_whole_model_voxels():
    assert model_size(19, 7.5, 1.0) == 142  # 142.5 mm: rounded half to even, as round() does
    assert model_size(320, 0.6875, 1.0) == 220
    assert model_size(1, 0.2, 3.0) == 1  # never empty


def test_fill_window_predicts_the_model_grid_of_the_box_it_grows():
    """The window fill_window picks is what to_model_grid then makes of the grown box (or more, where the image
    ends), through an oblique, anisotropic, reoriented grid."""
    affine = oriented_affine("PIR", (0.8, 0.9, 2.5), (5.0, -3.0, 8.0))
    shape = (120, 90, 30)
    data = np.zeros(shape, np.float32)
    grown, window = fill_window(((40, 70), (20, 60), (5, 20)), affine, shape, "RAS", (1.0, 1.0, 1.0), (32,) * 3, 16)
    _, grid = to_model_grid(data, affine, "RAS", (1.0, 1.0, 1.0), bbox=grown)
    _, whole = to_model_grid(data, affine, "RAS", (1.0, 1.0, 1.0))
    for n, size, full in zip(grid.shape, window, whole.shape):
        assert n <= size and (n >= size - 3 or n == full)


def test_bbox_crop_matches_the_whole_image_inside_and_is_zero_outside():
    rng = np.random.default_rng(0)
    data = rng.random((20, 16, 12)).astype(np.float32)
    affine = oriented_affine("LPI", (0.8, 0.8, 3.0))
    bbox = ((4, 15), (2, 16), (3, 9))
    model_mm = reoriented_voxel_sizes(affine, data.shape, "RAS")
    whole, _ = to_model_grid(data, affine, "RAS", model_mm)
    volume, grid = to_model_grid(data, affine, "RAS", model_mm, bbox=bbox)
    assert volume.size < whole.size
    back = from_model_grid(volume, grid)
    inside = tuple(slice(a, b) for a, b in bbox)
    np.testing.assert_array_equal(back[inside], data[inside])
    outside = np.ones(data.shape, bool)
    outside[inside] = False
    assert not back[outside].any()
    # Resampled: the cropped grid's voxels sit at the right world positions too.
    volume, grid = to_model_grid(data, affine, "RAS", (1.0, 1.0, 1.0), bbox=bbox)
    crop_affine = affine.copy()
    crop_affine[:3, 3] = affine[:3, :3] @ [4, 2, 3] + affine[:3, 3]
    full, full_grid = to_model_grid(data[inside], crop_affine, "RAS", (1.0, 1.0, 1.0))
    np.testing.assert_allclose(grid.affine, full_grid.affine)
    np.testing.assert_array_equal(volume, full)
    assert from_model_grid(volume, grid).shape == data.shape


def test_channels_and_orders_come_back_with_the_right_types():
    rng = np.random.default_rng(1)
    data = rng.random((10, 12, 7)).astype(np.float32)
    affine = oriented_affine("PSR", (0.7, 1.3, 2.0), (10.0, 0.0, 5.0))
    volume, grid = to_model_grid(data, affine, "RAS", (1.0, 1.0, 1.0), order=3)
    assert volume.dtype == np.float32
    stacked = from_model_grid(np.stack([volume, 2 * volume]), grid)
    assert stacked.shape == (2, *data.shape) and stacked.dtype == np.float32 and stacked.flags.c_contiguous
    np.testing.assert_allclose(stacked[1], 2 * stacked[0], rtol=1e-6)
    labels = from_model_grid((volume > 0.5).astype(np.uint8), grid, order=0)
    assert labels.dtype == np.uint8 and set(np.unique(labels)) <= {0, 1}
    assert from_model_grid(volume > 0.5, grid, order=0).dtype == bool


def test_cubic_resampling_makes_no_float64_copy_of_the_volume():
    data = np.random.default_rng(2).random((64, 64, 48)).astype(np.float32)
    affine = oriented_affine("RAS", (0.9, 0.9, 1.1))
    tracemalloc.start()
    try:
        volume, grid = to_model_grid(data, affine, "RAS", (1.0, 1.0, 1.0), order=3)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert volume.dtype == np.float32
    # The float32 prefiltered copy plus the float32 output; a float64 copy alone would be 2x data.nbytes.
    assert peak < data.nbytes + volume.nbytes + data.nbytes // 2, peak


def test_bad_arguments_are_reported():
    data = np.zeros((4, 4, 4), np.float32)
    with pytest.raises(RegistryError, match="axis codes"):
        to_model_grid(data, np.eye(4), "RAX", (1, 1, 1))
    with pytest.raises(RegistryError, match="3 distinct axes|axis codes"):
        to_model_grid(data, np.eye(4), "RRS", (1, 1, 1))
    with pytest.raises(RegistryError, match="spacing"):
        to_model_grid(data, np.eye(4), "RAS", (1, 0, 1))
    with pytest.raises(UsageError, match="3D"):
        to_model_grid(data[0], np.eye(4), "RAS", (1, 1, 1))
    with pytest.raises(UsageError, match="empty"):
        to_model_grid(data, np.eye(4), "RAS", (1, 1, 1), bbox=((2, 2), (0, 4), (0, 4)))
    volume, grid = to_model_grid(data, np.eye(4), "RAS", (0.5, 0.5, 0.5))
    with pytest.raises(InferenceError, match="expected"):
        from_model_grid(volume[:-1], grid)


def test_real_images_go_to_the_model_grid_and_back(bids_dir):
    images = sorted(bids_dir.glob("sub-*/anat/*.nii.gz"))
    assert len(images) >= 10
    for path in images:
        img = load_image(path)
        data = image_data(img)
        volume, grid = to_model_grid(data, img.affine, "RAS", (1.0, 1.0, 1.0))
        assert nib.aff2axcodes(grid.affine) == ("R", "A", "S")
        extent_native = np.asarray(img.header.get_zooms()[:3]) * img.shape
        assert np.allclose(sorted(np.asarray(grid.shape, float)), sorted(extent_native), atol=1.0), path.name
        np.testing.assert_array_equal(grid.native_affine, img.affine)
        back = from_model_grid(volume, grid)
        assert back.shape == img.shape, path.name
        if not grid.resampled:
            np.testing.assert_array_equal(back, data)


def test_real_cord_masks_survive_the_round_trip(bids_dir):
    # Cord masks only: a grey-matter mask is a few voxels thick in-plane, and 1 mm resampling of 0.5 mm voxels
    # moves its edge by a voxel (Dice 0.82 on sub-gmc9418), which says nothing about the round trip.
    masks = sorted(
        p for p in (bids_dir / "derivatives" / "labels").glob("sub-*/anat/*.nii.gz") if "label-GM" not in p.name
    )
    assert len(masks) >= 22
    for path in masks:
        img = load_image(path)
        mask = image_data(img) > 0.5
        volume, grid = to_model_grid(mask.astype(np.float32), img.affine, "RAS", (1.0, 1.0, 1.0))
        back = from_model_grid(volume, grid) >= 0.5
        assert dice(back, mask) > 0.9, path.name


def test_three_gives_one_item_per_axis_or_fails():
    assert three(int(n) for n in np.array([4, 5, 6])) == (4, 5, 6)
    with pytest.raises(ValueError):
        three([1, 2])
    with pytest.raises(ValueError):
        three([1, 2, 3, 4])
