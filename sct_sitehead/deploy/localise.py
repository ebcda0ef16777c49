"""Find the spinal cord on a coarse grid first, so the lesion model only looks near it.

A release may ship a cord localiser (:class:`~sct_sitehead.registry.specs.LocaliserSpec`): a small backbone and head
trained on cord masks at a coarse spacing (3 mm). It sees the whole field of view in one or two patches, in a
fraction of a second. Its cord gives

- the native voxel box the lesion model is run on: the whole field of view along the cord's axis, and across it
  the cord's extent grown by ``margin_mm``: most of an image is not cord, so this is where the time goes;
- the region where lesions may be (within ``cord_margin_mm`` of the cord): lesions are in the cord, so a
  lesion-like spot in bone marrow, fat or a disc is dropped.

A bright focal lesion can hide the cord from the localiser: measured on release 1.1.3 and sub-errsm18, a lesion at
3.5x the cord's median signal cut the found cord there, and the box (at the lower end: 17 of 53 lesion voxels out)
and the region (a fifth of the way up: 35 of 61 out) ended at the lesion. So neither ends where the found cord
ends: the box keeps the whole axis, and a slice along it with no found cord takes the footprint of its neighbours
with cord (:func:`fill_cord_gaps`) before the region is grown.

When no cord is found the caller falls back to the whole image, unrestricted.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from itertools import product
from typing import cast

import numpy as np

from sct_sitehead.deploy.budget import GridCheck
from sct_sitehead.deploy.prediction import NativeImage, predict_on_grid
from sct_sitehead.deploy.spatial import Bbox, ModelGrid, nonzero_bounds, three
from sct_sitehead.deploy.windows import Predict, WindowSettings
from sct_sitehead.errors import UsageError
from sct_sitehead.registry.specs import LocaliserSpec

logger = logging.getLogger(__name__)

#: Connected pieces of the found cord smaller than this fraction of the largest are taken as false alarms.
#: Measured on the 12 real images: the cord is the largest piece on every image with a cord in view; on sub-ms01
#: the next piece (21% of the cord, far lateral) grew the box 2.4x when pieces down to 20% were kept.
MIN_PIECE_FRACTION = 0.5

#: The found cord's principal direction gives its axis only when its largest piece is this much longer than wide
#: (largest over second standard deviation of its voxels' world positions); else the native axis closest to world
#: S-I is taken, which is never worse than the old whole-cord box along the true axis. Measured on the 44 real
#: images: 2.99 to 53 where the direction is the cord's; 1.87 on sub-gmc9709ses2 run-2 (an axial slab), whose
#: direction lay across the cord.
MIN_ELONGATION = 3.0


@dataclass
class Localised:
    """The cord found by the localiser, on its coarse grid.

    Attributes:
        cord: (X, Y, Z) bool mask on ``grid`` (small false-alarm pieces removed).
        grid: the localiser's model grid.
        bbox: native voxel ranges ``((x0, x1), (y0, y1), (z0, z1))`` to run the lesion model on: the whole image
            along the cord's axis.
        near: (X, Y, Z) bool mask on ``grid``: within the lesion margin of the cord, its gaps and ends along the
            cord's axis filled (:func:`fill_cord_gaps`).
        sample: (X, Y, Z) the whole image on ``grid``, not normalised: where a crop's normalisation takes its
            statistics (measured: mean and standard deviation within 1% of the lesion model's 1 mm grid).
        cord_bbox: native voxel ranges that hold the cord found (no margin): what QC pictures zoom on.
    """

    cord: np.ndarray
    grid: ModelGrid
    bbox: Bbox
    near: np.ndarray
    sample: np.ndarray
    cord_bbox: Bbox | None = None

    def near_on(self, grid: ModelGrid) -> np.ndarray:
        """``near`` resampled (nearest neighbour) onto another model grid, e.g. the lesion model's crop."""
        return self.near_at(grid.affine, grid.shape)

    def near_at(self, affine: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
        """``near`` resampled (nearest neighbour) onto any voxel grid (``affine``, ``shape``), e.g. the image's.

        The coarse grid spans the image, but its first and last voxel centres lie up to half a coarse voxel inside
        the image's edge: the edge values are extended (``mode="nearest"``) to reach it. With ``"constant"``, scipy
        takes any point past the first or last centre as outside: on a 16 mm field of view along the cord that left
        3 of 20 native slices at each end out of the lesion region.
        """
        from scipy import ndimage

        matrix = np.linalg.inv(self.grid.affine) @ affine
        near: np.ndarray = ndimage.affine_transform(
            self.near.view(np.uint8),
            matrix[:3, :3],
            offset=matrix[:3, 3],
            output_shape=tuple(shape),
            output=np.uint8,
            order=0,
            mode="nearest",
        ).view(bool)
        return near


def keep_main_pieces(mask: np.ndarray, min_fraction: float = MIN_PIECE_FRACTION) -> np.ndarray:
    """``mask`` without the connected pieces (26-connectivity) smaller than ``min_fraction`` of the largest."""
    from scipy import ndimage

    labels, n = ndimage.label(mask, structure=np.ones((3, 3, 3), dtype=bool))
    if n <= 1:
        return mask.astype(bool, copy=False)
    sizes = np.bincount(labels.ravel())[1:]
    keep = np.flatnonzero(sizes >= min_fraction * sizes.max()) + 1
    return np.isin(labels, keep)


def native_bbox(
    mask: np.ndarray, grid: ModelGrid, native_affine: np.ndarray, native_shape: tuple[int, ...], margin_mm: float
) -> Bbox:
    """The native voxel box that holds every voxel of ``mask`` (on ``grid``) plus ``margin_mm`` on each side.

    The mask's box corners (voxel edges, not centres) go to world space and then to native voxel indices, so
    oblique and reoriented grids are handled; the box is clipped to the image.
    """
    from nibabel.affines import voxel_sizes

    bounds = nonzero_bounds(mask)
    if bounds is None:
        raise UsageError("native_bbox needs a mask with at least one voxel set")
    first, last = bounds
    low, high = first - 0.5, last + 0.5
    corners = np.array([[*corner, 1.0] for corner in product(*zip(low, high))])
    native = (np.linalg.inv(native_affine) @ grid.affine @ corners.T)[:3].T
    margin = float(margin_mm) / voxel_sizes(native_affine)
    start = np.floor(native.min(axis=0) + 0.5 - margin).astype(int)
    stop = np.ceil(native.max(axis=0) + 0.5 + margin).astype(int)
    return three((max(0, int(a)), min(int(n), int(b))) for a, b, n in zip(start, stop, native_shape))


def superior_axis(affine: np.ndarray) -> int:
    """The voxel axis of ``affine`` (4, 4) closest to world superior-inferior."""
    directions = affine[:3, :3] / np.linalg.norm(affine[:3, :3], axis=0)
    return int(np.argmax(np.abs(directions[2])))


def cord_axis(cord: np.ndarray, grid: ModelGrid) -> int:
    """The native voxel axis along the found cord: the principal direction of its largest piece in world space, to
    the closest native axis.

    Only the largest piece counts: two kept pieces side by side (false alarms across an axial slab) would otherwise
    make a direction across the cord.

    Args:
        cord: (X, Y, Z) bool mask on ``grid``.
        grid: the localiser's model grid.

    Returns:
        0, 1 or 2; the native axis closest to world S-I where the piece is not clearly elongated
        (:data:`MIN_ELONGATION`).
    """
    piece = keep_main_pieces(cord, min_fraction=1.0)
    world = np.argwhere(piece).astype(np.float64) @ grid.affine[:3, :3].T
    if len(world) < 2:
        return superior_axis(grid.native_affine)
    variances, vectors = np.linalg.eigh(np.cov(world, rowvar=False))
    spread = np.sqrt(np.clip(variances, 0.0, None))
    if spread[2] < MIN_ELONGATION * spread[1]:
        return superior_axis(grid.native_affine)
    native = grid.native_affine[:3, :3] / np.linalg.norm(grid.native_affine[:3, :3], axis=0)
    return int(np.argmax(np.abs(vectors[:, 2] @ native)))


def shift_footprint(footprint: np.ndarray, shift: np.ndarray) -> np.ndarray:
    """``footprint`` (2D bool) moved by whole voxels ``shift`` (2,), what leaves the array dropped, no wrap."""
    moved = np.zeros_like(footprint)
    source, target = [], []
    for step, n in zip(np.rint(shift).astype(int), footprint.shape):
        step = int(np.clip(step, -n, n))
        source.append(slice(max(0, -step), n - max(0, step)))
        target.append(slice(max(0, step), n - max(0, -step)))
    moved[tuple(target)] = footprint[tuple(source)]
    return moved


def fill_cord_gaps(cord: np.ndarray, axis: int) -> np.ndarray:
    """``cord`` with every slice along ``axis`` that has none given a cord footprint from its neighbours.

    Between two slices with cord, both footprints are moved to the centroid interpolated between theirs and joined:
    a gap (a lesion the localiser did not take for cord) is bridged by a cord at least as wide as either end. Past
    the first or last slice with cord, that slice's footprint is repeated to the edge of the field of view.

    Args:
        cord: (X, Y, Z) bool mask with at least one voxel set.
        axis: the axis along the cord.

    Returns:
        (X, Y, Z) bool mask that holds ``cord`` and has a voxel set in every slice along ``axis``.
    """
    slices = np.moveaxis(cord, axis, 0)
    filled = slices.copy()
    present = np.flatnonzero(slices.any(axis=(1, 2)))
    centroids = {int(k): np.argwhere(slices[k]).mean(axis=0) for k in present}
    for k in range(slices.shape[0]):
        if k in centroids:
            continue
        after = int(np.searchsorted(present, k))
        if after == 0 or after == len(present):
            filled[k] = slices[present[min(after, len(present) - 1)]]
            continue
        low, high = int(present[after - 1]), int(present[after])
        move = (centroids[high] - centroids[low]) * (k - low) / (high - low)
        back = centroids[low] + move - centroids[high]
        filled[k] = shift_footprint(slices[low], move) | shift_footprint(slices[high], back)
    return np.moveaxis(filled, 0, axis)


def cord_box(cord: np.ndarray, grid: ModelGrid, axis: int, margin_mm: float) -> Bbox:
    """The native box to run the lesion model on: the whole image along native ``axis`` (the cord's), and across
    it the native box of ``cord`` (on ``grid``) grown by ``margin_mm`` (see :func:`native_bbox`)."""
    box = list(native_bbox(cord, grid, grid.native_affine, grid.native_shape, margin_mm))
    box[axis] = (0, int(grid.native_shape[axis]))
    return three(box)


def localise(
    data: np.ndarray,
    affine: np.ndarray,
    spec: LocaliserSpec,
    model: Predict,
    *,
    settings: WindowSettings | None = None,
    budget: GridCheck | None = None,
) -> Localised | None:
    """Run the cord localiser on a native image.

    Args:
        data: (X, Y, Z) native image.
        affine: its voxel-to-world affine.
        spec: the release's localiser.
        model: callable batch -> ``{name: (N, K, x, y, z)}`` (a :class:`~sct_sitehead.deploy.session.SiteHeadModel`
            with one head).
        settings: how its windows run (default: the release's, ``spec.windows``).
        budget: the memory check before its grid is made (see :func:`~sct_sitehead.deploy.prediction.
            predict_on_grid`).

    Returns:
        The cord, or None when the localiser finds none (the caller then runs on the whole image).
    """
    from scipy import ndimage

    settings = settings if settings is not None else WindowSettings.from_spec(spec.windows)
    prediction = predict_on_grid(
        NativeImage(data, affine), spec.input, model, settings, keep_sample=True, budget=budget
    )
    grid = prediction.grid
    (probabilities,) = prediction.probabilities.values()
    cord = probabilities[spec.channel] >= spec.threshold
    if not cord.any():
        logger.warning("the cord localiser found no cord: the lesion model runs on the whole image")
        return None
    cord = keep_main_pieces(cord)
    axis = cord_axis(cord, grid)
    # The localiser's grid is the native one reoriented: the native axis is one of its axes.
    filled = fill_cord_gaps(cord, int(grid.to_model[axis, 0]))
    distance = ndimage.distance_transform_edt(~filled, sampling=grid.spacing)
    # Half a coarse voxel's diagonal more: the coarse mask's edge is that uncertain.
    near = distance <= spec.cord_margin_mm + 0.5 * float(np.linalg.norm(grid.spacing))
    bbox = cord_box(filled, grid, axis, spec.margin_mm)
    logger.info(
        "cord found: %d voxels at %s mm along native axis %d; lesion model on native box %s of %s",
        int(cord.sum()),
        grid.spacing,
        axis,
        bbox,
        grid.native_shape,
    )
    return Localised(
        cord=cord,
        grid=grid,
        bbox=bbox,
        near=near,
        sample=cast(np.ndarray, prediction.sample),
        cord_bbox=native_bbox(cord, grid, grid.native_affine, grid.native_shape, 0.0),
    )
