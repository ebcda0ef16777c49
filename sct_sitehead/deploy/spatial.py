"""Reorient and resample between an image's native grid and the model grid, both ways.

The model grid is the native grid reoriented to the release's axis codes (an exact permutation and flip of the
voxel axes, no interpolation) and then resampled along each axis to the release's spacing. Oblique images are
not rotated: reorientation picks the closest axes and the residual obliquity stays in :attr:`ModelGrid.affine`,
so resampling stays separable along axes and the way back is its exact inverse. The field of view is kept
centred: model voxel ``i`` lies at reoriented voxel ``scale * i + offset``.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import TypeVar

import numpy as np

from sct_sitehead.errors import InferenceError, RegistryError, UsageError

logger = logging.getLogger(__name__)

#: Relative difference between native and model spacing below which an axis is copied, not interpolated.
_SAME_SPACING_RTOL = 1e-4

Bbox = tuple[tuple[int, int], tuple[int, int], tuple[int, int]]
T = TypeVar("T")


def three(values: Iterable[T]) -> tuple[T, T, T]:
    """``values`` as a tuple of three, one per axis (ValueError for any other count)."""
    x, y, z = values
    return x, y, z


@dataclass(frozen=True, eq=False)
class ModelGrid:
    """Everything needed to map model-grid arrays back onto the native grid.

    Attributes:
        native_shape: (3,) shape of the input image.
        native_affine: (4, 4) voxel-to-world affine of the input image.
        bbox: native voxel ranges ``((x0, x1), (y0, y1), (z0, z1))`` that were resampled (the whole image when
            no crop was asked for).
        to_model: (3, 2) nibabel orientation transform from the cropped native array to the model orientation.
        to_native: (3, 2) the inverse transform.
        reoriented_shape: (3,) shape after reorientation, before resampling.
        scale: (3,) model voxel size in reoriented voxels.
        offset: (3,) reoriented voxel coordinate of model voxel (0, 0, 0).
        shape: (3,) model grid shape.
        affine: (4, 4) model voxel-to-world affine (mm).
        orientation: model axis codes, e.g. ``"RAS"``.
        spacing: (3,) model voxel size in mm.
    """

    native_shape: tuple[int, int, int]
    native_affine: np.ndarray
    bbox: Bbox
    to_model: np.ndarray
    to_native: np.ndarray
    reoriented_shape: tuple[int, int, int]
    scale: tuple[float, float, float]
    offset: tuple[float, float, float]
    shape: tuple[int, int, int]
    affine: np.ndarray
    orientation: str
    spacing: tuple[float, float, float]

    @property
    def resampled(self) -> bool:
        """False when the model grid is a pure reorientation of the native grid (no interpolation)."""
        return self.scale != (1.0, 1.0, 1.0) or self.offset != (0.0, 0.0, 0.0) or self.shape != self.reoriented_shape


def to_model_grid(
    data: np.ndarray,
    affine: np.ndarray,
    orientation: str,
    spacing: Sequence[float],
    *,
    order: int = 1,
    bbox: Sequence[Sequence[int]] | None = None,
) -> tuple[np.ndarray, ModelGrid]:
    """Reorient then resample a native image onto the model grid.

    Args:
        data: (X, Y, Z) image on its native grid; converted to float32 if it is not.
        affine: (4, 4) native voxel-to-world affine.
        orientation: model axis codes (nibabel), e.g. ``"RAS"``.
        spacing: (3,) model voxel size in mm.
        order: spline order for the resampling (1 linear: fast, no overshoot; 3 cubic: sharper).
        bbox: optional native voxel ranges ``((x0, x1), (y0, y1), (z0, z1))`` to crop before resampling (e.g. the
            cord's neighbourhood); voxels outside it come back as 0 from :func:`from_model_grid`.

    Returns:
        The (X', Y', Z') float32 volume on the model grid (it may share memory with ``data`` when no reorientation
        or resampling was needed) and the :class:`ModelGrid` to come back with.

    Raises:
        RegistryError: ``orientation`` or ``spacing`` is invalid.
        UsageError: ``data``/``affine``/``bbox``/``order`` are malformed.
    """
    import nibabel.orientations as nio

    data = np.asarray(data)
    affine = np.asarray(affine, dtype=np.float64)
    if data.ndim != 3:
        raise UsageError(f"to_model_grid needs a 3D array, got shape {data.shape}; load images with nifti.load_image")
    if affine.shape != (4, 4) or not np.all(np.isfinite(affine)) or abs(np.linalg.det(affine[:3, :3])) < 1e-12:
        raise UsageError(f"affine must be a finite, invertible 4x4 matrix, got {affine.tolist()}")
    _check_order(order)
    _target_ornt(orientation)
    spacing_mm = _check_spacing(spacing)
    box = _check_bbox(bbox, data.shape)
    cropped = data[tuple(slice(a, b) for a, b in box)]
    shift = np.eye(4)
    shift[:3, 3] = [a for a, _ in box]
    crop_affine = affine @ shift

    transform = orientation_transform(crop_affine, orientation)
    reoriented = nio.apply_orientation(cropped, transform)
    reoriented_affine = crop_affine @ nio.inv_ornt_aff(transform, cropped.shape)
    voxel_mm = np.sqrt(np.sum(reoriented_affine[:3, :3] ** 2, axis=0))

    scale, offset, shape = [], [], []
    for n_native, native_mm, model_mm in zip(reoriented.shape, voxel_mm, spacing_mm):
        n_model = model_size(n_native, native_mm, model_mm)
        factor = model_mm / native_mm
        if abs(factor - 1.0) < _SAME_SPACING_RTOL and n_model == n_native:
            factor, start = 1.0, 0.0
        else:
            # Model voxel i spans [i * factor, (i + 1) * factor) native voxels from the native field of view's
            # edge (at native coordinate -0.5), so its centre is at (i + 0.5) * factor - 0.5; the last term
            # centres the model field of view on the native one when n_model * factor != n_native.
            start = 0.5 * factor - 0.5 + (n_native - n_model * factor) / 2.0
        scale.append(float(factor))
        offset.append(float(start))
        shape.append(n_model)
    to_reoriented = np.diag([*scale, 1.0])
    to_reoriented[:3, 3] = offset
    grid = ModelGrid(
        native_shape=three(int(n) for n in data.shape),
        native_affine=affine.copy(),
        bbox=box,
        to_model=transform,
        to_native=_inverse_ornt(transform),
        reoriented_shape=three(int(n) for n in reoriented.shape),
        scale=three(scale),
        offset=three(offset),
        shape=three(shape),
        affine=reoriented_affine @ to_reoriented,
        orientation=orientation.upper(),
        spacing=three(float(s) for s in spacing_mm),
    )
    if not grid.resampled:
        return np.ascontiguousarray(reoriented, dtype=np.float32), grid
    logger.debug("model grid %s at %s mm from %s at %s mm", grid.shape, grid.spacing, reoriented.shape, voxel_mm)
    volume = _resample(reoriented, np.asarray(scale), np.asarray(offset), grid.shape, order)
    return volume, grid


def orientation_transform(affine: np.ndarray, orientation: str) -> np.ndarray:
    """The reorientation from an image's voxel axes to a model grid's: a permutation and flips, no interpolation.

    Oblique axes go to the closest model axis (nibabel's ``io_orientation``).

    Args:
        affine: (4, 4) voxel-to-world affine of the image.
        orientation: model axis codes, e.g. ``"RAS"``.

    Returns:
        (3, 2) nibabel orientation transform: row ``i`` is (model axis of voxel axis ``i``, 1 or -1 for a flip).

    Raises:
        RegistryError: ``orientation`` is not 3 distinct axis codes.
    """
    import nibabel.orientations as nio

    transform: np.ndarray = nio.ornt_transform(nio.io_orientation(affine), _target_ornt(orientation))
    return transform


def model_size(n_native: int, native_mm: float, model_mm: float) -> int:
    """Model voxels along an axis for ``n_native`` voxels of ``native_mm`` resampled to ``model_mm``: the field of
    view's length rounded to whole model voxels, at least one."""
    return max(1, int(round(n_native * native_mm / model_mm)))


def from_model_grid(volume: np.ndarray, grid: ModelGrid, order: int = 1, *, window_only: bool = False) -> np.ndarray:
    """Bring a model-grid array back onto the native grid, voxel for voxel aligned with the input image.

    Args:
        volume: (X', Y', Z') or (C, X', Y', Z') array on ``grid``.
        grid: from :func:`to_model_grid`.
        order: spline order (0 nearest for label maps, 1 linear for probabilities).
        window_only: return only the native voxels inside ``grid.bbox`` (a crop's own window), not the whole
            native grid: what a long field of view needs to stay small in memory.

    Returns:
        (X, Y, Z) or (C, X, Y, Z) C-contiguous array on the native grid (or its ``grid.bbox`` window): float32
        for ``order >= 1``; the input's dtype for ``order == 0``. Voxels outside ``grid.bbox`` are 0.

    Raises:
        InferenceError: ``volume``'s spatial shape is not ``grid.shape``.
    """
    import nibabel.orientations as nio

    volume = np.asarray(volume)
    _check_order(order)
    if volume.ndim not in (3, 4) or tuple(volume.shape[-3:]) != grid.shape:
        raise InferenceError(
            f"model output has shape {volume.shape}, expected {grid.shape} or (C, *{grid.shape}); "
            "the model must return arrays the size of its input"
        )
    channels = volume if volume.ndim == 4 else volume[None]
    is_bool = channels.dtype == np.bool_
    dtype = (np.uint8 if is_bool else channels.dtype) if order == 0 else np.float32
    shape = tuple(b - a for a, b in grid.bbox) if window_only else grid.native_shape
    out = np.zeros((channels.shape[0], *shape), dtype=bool if is_bool and order == 0 else dtype)
    window = (slice(None), *((slice(None),) * 3 if window_only else (slice(a, b) for a, b in grid.bbox)))
    scale = np.asarray(grid.scale)
    offset = np.asarray(grid.offset)
    for index, channel in enumerate(channels):
        if grid.resampled:
            source = channel.view(np.uint8) if is_bool else channel
            # Inverse of i_reoriented = scale * i_model + offset.
            back = _resample(source, 1.0 / scale, -offset / scale, grid.reoriented_shape, order, dtype=dtype)
        else:
            back = channel
        out[window][index] = nio.apply_orientation(back, grid.to_native)
    return out if volume.ndim == 4 else out[0]


def nonzero_bounds(mask: np.ndarray) -> tuple[np.ndarray, np.ndarray] | None:
    """First and last index (inclusive, (3,) int arrays) of ``mask``'s non-zero voxels per axis; None if none.

    One pass over the mask (``flatnonzero``): on a whole spine's 7x10^7 voxels, about 6 ms.
    """
    found = np.flatnonzero(mask)
    if not found.size:
        return None
    index = np.stack(np.unravel_index(found, mask.shape))
    return index.min(axis=1), index.max(axis=1)


def mask_from_model_grid(channel: np.ndarray, grid: ModelGrid, threshold: float) -> np.ndarray:
    """``from_model_grid(channel, grid, 1, window_only=True) >= threshold``, resampled only where it can be true.

    Linear interpolation gives a convex combination of neighbouring values, so a native voxel can reach
    ``threshold`` only next to a model voxel that does: only the box around those (one voxel wider) is resampled.
    Measured on the whole-spine phantom's window (59x80x800): lesion 0.12 -> 0.008 s, cord 0.12 -> 0.04 s, same masks.

    Args:
        channel: (X', Y', Z') float probabilities on ``grid``.
        grid: from :func:`to_model_grid`.
        threshold: probability at and above which a voxel is in the mask.

    Returns:
        (X, Y, Z) bool mask of the native window ``grid.bbox``.
    """
    import nibabel.orientations as nio

    window = tuple(b - a for a, b in grid.bbox)
    out = np.zeros(window, dtype=bool)
    hot = channel >= threshold
    bounds = nonzero_bounds(hot)
    if bounds is None:
        return out
    if not grid.resampled:
        reoriented: np.ndarray = nio.apply_orientation(hot, grid.to_native)
        return reoriented.astype(bool, copy=False)
    scale, offset = np.asarray(grid.scale), np.asarray(grid.offset)
    low, high = bounds[0] - 1, bounds[1] + 1  # one voxel wider: the hot voxels' neighbours
    # Reoriented native voxels i whose model coordinate (i - offset) / scale lies in [low, high].
    start = np.clip(np.floor(scale * low + offset).astype(int), 0, grid.reoriented_shape)
    stop = np.clip(np.floor(scale * high + offset).astype(int) + 1, 0, grid.reoriented_shape)
    if (stop <= start).any():
        return out
    values = _resample(channel, 1.0 / scale, (start - offset) / scale, tuple(stop - start), 1, dtype=np.float32)
    native = nio.apply_orientation(values >= threshold, grid.to_native)
    box = [slice(0, 0)] * 3
    for axis, (target, flip) in enumerate(np.asarray(grid.to_native, dtype=int)):
        length = grid.reoriented_shape[axis]
        a, b = (length - stop[axis], length - start[axis]) if flip < 0 else (start[axis], stop[axis])
        box[target] = slice(int(a), int(b))
    out[tuple(box)] = native
    return out


def _resample(
    source: np.ndarray,
    scale: np.ndarray,
    offset: np.ndarray,
    shape: Sequence[int],
    order: int,
    dtype: type | np.dtype = np.float32,
) -> np.ndarray:
    """``out[i] = source[scale * i + offset]`` per axis, edges extended (``mode="nearest"``)."""
    from scipy import ndimage

    if order > 1:
        # scipy's default prefilter writes a float64 copy of the whole volume; a float32 one is enough.
        source = ndimage.spline_filter(source, order=order, output=np.float32, mode="nearest")
    elif order == 1 and source.dtype != np.float32:
        source = source.astype(np.float32)
    # A 1-D matrix is a diagonal one: scipy then takes its faster separable zoom-and-shift path.
    resampled: np.ndarray = ndimage.affine_transform(
        source,
        scale,
        offset=offset,
        output_shape=tuple(shape),
        output=dtype,
        order=order,
        mode="nearest",
        prefilter=False,
    )
    return resampled


def _target_ornt(orientation: str) -> np.ndarray:
    import nibabel.orientations as nio

    codes = tuple(str(orientation).upper())
    try:
        ornt: np.ndarray = nio.axcodes2ornt(codes)
    except ValueError as exc:
        raise RegistryError(
            f"model orientation {orientation!r} is not a valid set of 3 axis codes; use one of R/L, A/P, S/I per "
            "axis, e.g. 'RAS'"
        ) from exc
    if len(codes) != 3 or np.isnan(ornt).any() or len(set(ornt[:, 0])) != 3:
        raise RegistryError(f"model orientation {orientation!r} must name 3 distinct axes, e.g. 'RAS' or 'LPI'")
    return ornt


def _inverse_ornt(transform: np.ndarray) -> np.ndarray:
    """The orientation transform that undoes ``transform`` (nibabel's ``ornt_transform`` with its ends swapped)."""
    inverse = np.empty_like(transform)
    for axis, (target, flip) in enumerate(transform):
        inverse[int(target)] = (axis, flip)
    return inverse


def _check_spacing(spacing: Sequence[float]) -> np.ndarray:
    values = np.asarray(spacing, dtype=np.float64).ravel()
    if values.shape != (3,) or not np.all(np.isfinite(values)) or np.any(values <= 0):
        raise RegistryError(f"model spacing must be 3 positive numbers (mm), got {spacing!r}")
    return values


def _check_order(order: int) -> None:
    if order not in (0, 1, 2, 3, 4, 5):
        raise UsageError(f"interpolation order must be 0 to 5, got {order!r}")


def _check_bbox(bbox: Sequence[Sequence[int]] | None, shape: tuple[int, ...]) -> Bbox:
    if bbox is None:
        return three((0, int(n)) for n in shape)
    try:
        pairs = [(int(a), int(b)) for a, b in bbox]
    except (TypeError, ValueError) as exc:
        raise UsageError(f"bbox must be ((x0, x1), (y0, y1), (z0, z1)), got {bbox!r}") from exc
    if len(pairs) != 3:
        raise UsageError(f"bbox must have 3 (start, stop) pairs, got {len(pairs)}")
    clipped = three((max(0, a), min(int(n), b)) for (a, b), n in zip(pairs, shape))
    if any(b <= a for a, b in clipped):
        raise UsageError(f"bbox {pairs} is empty inside the image of shape {shape}")
    return clipped
