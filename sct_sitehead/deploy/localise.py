"""Find the spinal cord on a coarse grid first, so the lesion model only looks near it.

A release may ship a cord localiser (:class:`~sct_sitehead.registry.specs.LocaliserSpec`): a small backbone and head
trained on cord masks at a coarse spacing (3 mm). It sees the whole field of view in one or two patches, in a
fraction of a second. Its cord gives

- the native voxel box the lesion model is run on (the cord's bounding box grown by ``margin_mm``): most of an
  image is not cord, so this is where the time goes;
- the region where lesions may be (within ``cord_margin_mm`` of the cord): lesions are in the cord, so a
  lesion-like spot in bone marrow, fat or a disc is dropped.

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
from sct_sitehead.deploy.windows import LOCALISER_WINDOWS, Predict, WindowSettings
from sct_sitehead.errors import UsageError
from sct_sitehead.registry.specs import LocaliserSpec

logger = logging.getLogger(__name__)

#: Connected pieces of the found cord smaller than this fraction of the largest are taken as false alarms.
#: Measured on the 12 real images: the cord is the largest piece on every image with a cord in view; on sub-ms01
#: the next piece (21% of the cord, far lateral) grew the box 2.4x when pieces down to 20% were kept.
MIN_PIECE_FRACTION = 0.5


@dataclass
class Localised:
    """The cord found by the localiser, on its coarse grid.

    Attributes:
        cord: (X, Y, Z) bool mask on ``grid`` (small false-alarm pieces removed).
        grid: the localiser's model grid.
        bbox: native voxel ranges ``((x0, x1), (y0, y1), (z0, z1))`` to run the lesion model on.
        near: (X, Y, Z) bool mask on ``grid``: within the lesion margin of the cord.
        sample: (X, Y, Z) the whole image on ``grid``, not normalised: where a crop's normalisation takes its
            statistics (measured: mean and standard deviation within 1% of the lesion model's 1 mm grid).
    """

    cord: np.ndarray
    grid: ModelGrid
    bbox: Bbox
    near: np.ndarray
    sample: np.ndarray

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


def localise(
    data: np.ndarray,
    affine: np.ndarray,
    spec: LocaliserSpec,
    model: Predict,
    *,
    settings: WindowSettings = LOCALISER_WINDOWS,
    budget: GridCheck | None = None,
) -> Localised | None:
    """Run the cord localiser on a native image.

    Args:
        data: (X, Y, Z) native image.
        affine: its voxel-to-world affine.
        spec: the release's localiser.
        model: callable batch -> ``{name: (N, K, x, y, z)}`` (a :class:`~sct_sitehead.deploy.session.SiteHeadModel`
            with one head).
        settings: how its windows run (default: :data:`~sct_sitehead.deploy.windows.LOCALISER_WINDOWS`).
        budget: the memory check before its grid is made (see :func:`~sct_sitehead.deploy.prediction.
            predict_on_grid`).

    Returns:
        The cord, or None when the localiser finds none (the caller then runs on the whole image).
    """
    from scipy import ndimage

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
    distance = ndimage.distance_transform_edt(~cord, sampling=grid.spacing)
    # Half a coarse voxel's diagonal more: the coarse mask's edge is that uncertain.
    near = distance <= spec.cord_margin_mm + 0.5 * float(np.linalg.norm(grid.spacing))
    bbox = native_bbox(cord, grid, grid.native_affine, grid.native_shape, spec.margin_mm)
    logger.info(
        "cord found: %d voxels at %s mm; lesion model on native box %s of %s",
        int(cord.sum()),
        grid.spacing,
        bbox,
        grid.native_shape,
    )
    return Localised(cord=cord, grid=grid, bbox=bbox, near=near, sample=cast(np.ndarray, prediction.sample))
