"""Find the spinal cord on a coarse grid first, so the lesion model only looks near it.

A release may ship a cord localiser (:class:`~sct_sitehead.registry.index.LocaliserSpec`): a small backbone and head
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
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    from sct_sitehead.deploy.spatial import Bbox, ModelGrid
    from sct_sitehead.registry.index import LocaliserSpec

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
        return ndimage.affine_transform(
            self.near.view(np.uint8),
            matrix[:3, :3],
            offset=matrix[:3, 3],
            output_shape=tuple(shape),
            output=np.uint8,
            order=0,
            mode="nearest",
        ).view(bool)


#: Smallest window, as a fraction of the release's patch: the network is trained on patches of about this size
#: (the release: 48³ training patches, 64³ inference patches), so a crop is not padded up to a full patch.
MIN_WINDOW_FRACTION = 0.75


def one_window(
    shape: tuple[int, ...], patch_size: tuple[int, ...], divisor: int, *, max_patches: int = 3
) -> tuple[int, int, int]:
    """The window to run a network with: the whole volume in one piece where it fits.

    A coarse image or a crop around the cord is small, so one network pass over all of it replaces the
    overlapping patches (at overlap 0.5, each voxel computed about 8 times) a whole image needs. Each axis is the
    volume's size rounded up to ``divisor``, at least ``MIN_WINDOW_FRACTION`` of the release's patch (also rounded
    up to ``divisor``) and at most ``max_patches`` patches, so a long field of view (a whole spine) still goes in
    overlapping windows of bounded memory.
    """

    def up(value: float) -> int:
        return -(-int(value) // divisor) * divisor

    return tuple(
        min(max(up(n), up(MIN_WINDOW_FRACTION * int(p))), max_patches * int(p)) for n, p in zip(shape, patch_size)
    )  # type: ignore[return-value]


#: Longest crop window along an axis, in patches. A crop runs in windows of up to this length overlapping by half,
#: so a crop a little longer than one window is computed nearly twice: 256 voxels of cord ran as two 192-voxel
#: windows (384 voxels of network) with 3 patches, one 256-voxel window with 4.
CROP_WINDOW_PATCHES = 4


def crop_window(size: int, whole: int, patch: int, divisor: int) -> int:
    """The window along one model axis for a crop of ``size`` voxels of an image ``whole`` voxels long.

    Where the whole image is no longer than a patch, it is what a whole-image run puts in one patch, and so is
    the crop: the whole axis in one patch. Cropping there saves nothing, and a smaller window than the
    whole-image run's changes what the network sees (measured on the test split, whose images are a patch or less
    along most axes: lesions found before the cord rule 51% with crops, 66% with whole axes; whole images: 63%).
    Elsewhere, :func:`one_window`.
    """
    return one_window((patch if whole <= patch else size,) * 3, (patch,) * 3, divisor, max_patches=CROP_WINDOW_PATCHES)[
        0
    ]


def fill_window(
    bbox: Bbox,
    affine: np.ndarray,
    shape: tuple[int, ...],
    orientation: str,
    spacing: tuple[float, ...],
    patch_size: tuple[int, ...],
    divisor: int,
) -> tuple[Bbox, tuple[int, int, int]]:
    """``bbox`` grown with image voxels until its model grid fills its window, and that window.

    A crop's window is rounded up to the network's divisor (and to at least 3/4 of a patch), so a 49-voxel crop
    runs in a 64-voxel window; along an axis where the whole image fits in a patch, the window is a patch and the
    crop the whole axis (:func:`crop_window`). The voxels a window lacks are taken from the image around the
    crop, not from constant padding. Growth is split between both sides, and what one side lacks (the image's
    edge) goes to the other.

    Returns:
        The grown native box and the window (model axes) to run it in.
    """
    import nibabel.orientations as nio
    from nibabel.affines import voxel_sizes

    to_model = nio.ornt_transform(nio.io_orientation(affine), nio.axcodes2ornt(tuple(orientation.upper())))
    native_mm = voxel_sizes(affine)
    grown = [list(pair) for pair in bbox]
    window = [0, 0, 0]
    for axis, (model_axis, _) in enumerate(to_model.astype(int)):
        ratio = native_mm[axis] / float(spacing[model_axis])

        def model_size(extent: int, ratio: float = ratio) -> int:
            return max(1, int(round(extent * ratio)))

        start, stop = grown[axis]
        size, whole, patch = model_size(stop - start), model_size(int(shape[axis])), int(patch_size[model_axis])
        target = window[model_axis] = crop_window(size, whole, patch, divisor)
        if whole <= patch:
            grown[axis] = [0, int(shape[axis])]
            continue
        if target <= size:  # already fills its windows (a long field of view runs in several)
            continue
        extra = int((target - size) / ratio)
        while extra > 0 and model_size(stop - start + extra) > target:
            extra -= 1
        low = min(start, extra // 2 + max(0, stop + extra - extra // 2 - int(shape[axis])))
        high = min(int(shape[axis]) - stop, extra - low)
        grown[axis] = [start - low, stop + high]
    return tuple((a, b) for a, b in grown), tuple(window)  # type: ignore[return-value]


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
    from itertools import product

    from nibabel.affines import voxel_sizes

    from sct_sitehead.deploy.spatial import nonzero_bounds

    first, last = nonzero_bounds(mask)
    low, high = first - 0.5, last + 0.5
    corners = np.array([[*corner, 1.0] for corner in product(*zip(low, high))])
    native = (np.linalg.inv(native_affine) @ grid.affine @ corners.T)[:3].T
    margin = float(margin_mm) / voxel_sizes(native_affine)
    start = np.floor(native.min(axis=0) + 0.5 - margin).astype(int)
    stop = np.ceil(native.max(axis=0) + 0.5 + margin).astype(int)
    return tuple((max(0, int(a)), min(int(n), int(b))) for a, b, n in zip(start, stop, native_shape))  # type: ignore[return-value]


def localise(
    data: np.ndarray, affine: np.ndarray, spec: LocaliserSpec, model, *, batch_size: int = 2
) -> Localised | None:
    """Run the cord localiser on a native image.

    Args:
        data: (X, Y, Z) native image.
        affine: its voxel-to-world affine.
        spec: the release's localiser.
        model: callable batch -> ``{name: (N, K, x, y, z)}`` (a :class:`~sct_sitehead.deploy.inference.SiteHeadModel`
            with one head).
        batch_size: patches per model call.

    Returns:
        The cord, or None when the localiser finds none (the caller then runs on the whole image).
    """
    from scipy import ndimage

    from sct_sitehead.deploy.inference import normalize, sliding_window
    from sct_sitehead.deploy.spatial import to_model_grid

    inp = spec.input
    sample, grid = to_model_grid(data, affine, inp.orientation, inp.spacing)
    volume = normalize(sample, inp.normalization)
    patch = one_window(volume.shape, inp.patch_size, inp.divisor, max_patches=2)
    outputs = sliding_window(volume, model, patch, overlap=0.25, batch_size=batch_size, divisor=inp.divisor)
    (probabilities,) = outputs.values()
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
    return Localised(cord=cord, grid=grid, bbox=bbox, near=near, sample=sample)
