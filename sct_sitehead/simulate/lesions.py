"""Insert synthetic lesions of known shape into the spinal cord of a real image.

Each lesion is an ellipsoid with a slightly irregular surface, elongated along the local cord axis (found by
principal components of the cord mask around the lesion), centred inside the cord (optionally where a weight map,
e.g. the tract probabilities of :mod:`~sct_sitehead.simulate.cord_atlas`, makes it likely; a lesion may reach the
cord's surface) and clipped to it. Its partial-volume fraction per voxel is measured by supersampling the voxel, so
the edges are smooth on thick slices too. The intensity change is relative to the cord's median intensity, with a
sign set by the sequence: hyperintense on T2w, T2star and MTS, hypointense on T1w; its size is drawn log-uniformly
from the sequence's range, so faint and very bright lesions are both common.

:func:`insert_lesions` is the user-facing entry point ("put known lesions into my healthy scans to test a
model"); :func:`insert_lesions_array` is the same on arrays, used by the simulator.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np

from sct_sitehead.errors import InputImageError, UsageError

if TYPE_CHECKING:
    import nibabel

logger = logging.getLogger(__name__)

#: Lesion intensity relative to the cord's median, (low, high) per sequence.
#: Real MS lesions on T2w and T2*w reach 3 to 4 times the cord's signal; on MTS and T1w they range from clearly
#: visible to nearly iso-intense.
LESION_CONTRAST: dict[str, tuple[float, float]] = {
    "T2w": (0.3, 3.0),
    "T2star": (0.3, 3.0),
    "MTS": (0.08, 0.8),
    "T1w": (-0.6, -0.06),
}
#: Lesion centres are at least this deep inside the cord (mm), where the cord allows it: a lesion may be subpial.
MIN_DEPTH_MM = 0.3
_PCA_RADIUS_MM = 15.0
_WOBBLE = 0.12


@dataclass(frozen=True)
class _Spec:
    center: np.ndarray
    axes: np.ndarray  # (3, 3) rows: along the cord, across, across
    semi_axes: np.ndarray  # (3,) mm
    wobble_dirs: np.ndarray  # (3, 3) unit vectors
    wobble_phases: np.ndarray  # (3,)
    contrast: float
    nominal_mm3: float


@dataclass
class InsertedLesions:
    """The result of :func:`insert_lesions`.

    Attributes:
        image: the image with lesions, same grid and header as the input (float32 data).
        lesion: uint8 mask of the inserted lesions (partial-volume fraction >= 0.5).
        fraction: (X, Y, Z) float32 partial-volume fraction of lesion in each voxel, 0..1.
        lesions: per lesion ``center_mm``, ``axis``, ``semi_axes_mm``, ``contrast``, ``volume_mm3``.
    """

    image: nibabel.Nifti1Image
    lesion: nibabel.Nifti1Image
    fraction: np.ndarray
    lesions: list[dict[str, Any]] = field(default_factory=list)


def insert_lesions(
    image: nibabel.Nifti1Image,
    cord_mask: nibabel.Nifti1Image,
    *,
    contrast: str,
    n_lesions: int = 3,
    seed: int | np.random.Generator = 0,
    volume_mm3: tuple[float, float] = (8.0, 250.0),
    elongation: tuple[float, float] = (1.5, 3.5),
    lesion_contrast: tuple[float, float] | None = None,
) -> InsertedLesions:
    """Insert lesions of known position, shape and contrast into the cord of an image.

    Example::

        import nibabel as nib
        from sct_sitehead.simulate import insert_lesions
        out = insert_lesions(nib.load("t2.nii.gz"), nib.load("t2_seg.nii.gz"), contrast="T2w", seed=1)
        nib.save(out.image, "t2_lesions.nii.gz"); nib.save(out.lesion, "t2_lesions_lesion-truth.nii.gz")

    Args:
        image: a 3D image with a spinal cord.
        cord_mask: its cord mask on the same grid (non-zero inside).
        contrast: the sequence, one of ``LESION_CONTRAST`` (sets the sign and size of the intensity change),
            unless ``lesion_contrast`` is given.
        n_lesions: how many lesions to try to place (fewer when the cord is too thin for them).
        seed: an int or a numpy Generator.
        volume_mm3: (low, high) nominal lesion volume, drawn log-uniformly, before clipping to the cord.
        elongation: (low, high) ratio of the length along the cord to the width across it.
        lesion_contrast: (low, high) lesion intensity relative to the cord median (e.g. (0.3, 0.8) for +30..80%).

    Returns:
        :class:`InsertedLesions`.

    Raises:
        InputImageError: the mask is not on the image's grid or is empty.
        UsageError: unknown contrast without ``lesion_contrast``.
    """
    import nibabel as nib

    data = np.asarray(image.dataobj, dtype=np.float32)
    cord = np.asarray(cord_mask.dataobj, dtype=np.float32)
    if data.ndim != 3 or cord.shape != data.shape:
        raise InputImageError(
            f"cord mask shape {cord.shape} differs from image shape {data.shape} (or the image is not 3D); "
            "give the mask on the image's own grid"
        )
    if not np.allclose(cord_mask.affine, image.affine, atol=1e-3):
        raise InputImageError("cord mask affine differs from the image's; resample the mask onto the image grid")
    rng = seed if isinstance(seed, np.random.Generator) else np.random.default_rng(seed)
    out, fraction, records = insert_lesions_array(
        data,
        np.clip(cord, 0.0, 1.0),
        image.affine,
        contrast=contrast,
        n_lesions=n_lesions,
        rng=rng,
        volume_mm3=volume_mm3,
        elongation=elongation,
        lesion_contrast=lesion_contrast,
    )
    header = image.header.copy()
    header.set_data_dtype(np.float32)
    new_image = nib.Nifti1Image(out, image.affine, header)
    mask_header = image.header.copy()
    mask_header.set_data_dtype(np.uint8)
    mask = nib.Nifti1Image((fraction >= 0.5).astype(np.uint8), image.affine, mask_header)
    return InsertedLesions(new_image, mask, fraction, records)


def insert_lesions_array(
    data: np.ndarray,
    cord_fraction: np.ndarray,
    affine: np.ndarray,
    *,
    contrast: str,
    n_lesions: int,
    rng: np.random.Generator,
    volume_mm3: Sequence[float] = (8.0, 250.0),
    elongation: Sequence[float] = (1.5, 3.5),
    lesion_contrast: Sequence[float] | None = None,
    allowed: np.ndarray | None = None,
    weights: np.ndarray | None = None,
) -> tuple[np.ndarray, np.ndarray, list[dict[str, Any]]]:
    """Array form of :func:`insert_lesions`.

    Args:
        data: (X, Y, Z) image.
        cord_fraction: (X, Y, Z) cord fraction 0..1 (a binary mask works); lesions stay where it is >= their own.
        affine: (4, 4) voxel-to-world affine.
        allowed: optional (X, Y, Z) bool mask of where lesion centres may go (e.g. a field of view).
        weights: optional (X, Y, Z) non-negative weights: a centre is drawn with probability proportional to its
            voxel's weight (uniform over the cord when None or zero everywhere allowed).
        Other arguments: as for :func:`insert_lesions`.

    Returns:
        (X, Y, Z) float32 image with lesions, (X, Y, Z) float32 lesion fraction (<= ``cord_fraction``
        everywhere), and one record per placed lesion.
    """
    if lesion_contrast is None:
        if contrast not in LESION_CONTRAST:
            raise UsageError(
                f"no lesion contrast known for {contrast!r}; use one of {sorted(LESION_CONTRAST)} "
                "or give lesion_contrast=(low, high) relative to the cord"
            )
        lesion_contrast = LESION_CONTRAST[contrast]
    if n_lesions < 0:
        raise UsageError(f"n_lesions is {n_lesions}; use 0 or more")
    if n_lesions == 0:
        return np.asarray(data, dtype=np.float32).copy(), np.zeros(data.shape, dtype=np.float32), []
    cord = cord_fraction >= 0.5
    if not cord.any():
        raise InputImageError("the cord mask is empty; lesions go inside the cord, so give a non-empty mask")
    centres = cord if allowed is None else cord & allowed
    if not centres.any():
        raise InputImageError("the cord mask has no voxel where lesions are allowed; widen the allowed region")
    specs = _draw(rng, centres, affine, n_lesions, volume_mm3, elongation, lesion_contrast, cord, weights)
    fraction = np.zeros(data.shape, dtype=np.float32)
    change = np.zeros(data.shape, dtype=np.float32)
    for spec in specs:
        box, own = _lesion_fraction(spec, data.shape, affine)
        own = np.minimum(own, cord_fraction[box])
        stronger = own > fraction[box]
        change[box] = np.where(stronger, np.float32(spec.contrast), change[box])
        fraction[box] = np.maximum(fraction[box], own)
    reference = float(np.median(data[cord]))
    out = np.asarray(data, dtype=np.float32) + fraction * change * np.float32(reference)
    voxel_mm3 = float(abs(np.linalg.det(affine[:3, :3])))
    records = [_record(spec, fraction, data.shape, affine, voxel_mm3) for spec in specs]
    return out, fraction, records


def _draw(
    rng: np.random.Generator,
    centres: np.ndarray,
    affine: np.ndarray,
    n: int,
    volume_mm3: Sequence[float],
    elongation: Sequence[float],
    contrast_range: Sequence[float],
    cord: np.ndarray,
    weights: np.ndarray | None = None,
) -> list[_Spec]:
    from scipy import ndimage

    voxel = np.linalg.norm(affine[:3, :3], axis=0)
    lows = np.argwhere(cord).min(axis=0)
    highs = np.argwhere(cord).max(axis=0) + 1
    crop = tuple(slice(max(lo - 1, 0), hi + 1) for lo, hi in zip(lows, highs))
    depth = ndimage.distance_transform_edt(np.pad(cord[crop], 1), sampling=voxel)[1:-1, 1:-1, 1:-1]
    depth = np.where(centres[crop], depth, 0.0)
    deep = np.argwhere(depth >= min(MIN_DEPTH_MM, 0.5 * float(depth.max())))
    deep += [s.start for s in crop]
    probability = None
    if weights is not None:
        chosen = np.maximum(np.asarray(weights, dtype=np.float64)[tuple(deep.T)], 0.0)
        probability = chosen / chosen.sum() if chosen.sum() > 0 else None
    cord_world = _world(np.argwhere(cord).astype(np.float64), affine)
    specs = []
    for _ in range(n):
        index = deep[rng.choice(len(deep), p=probability)].astype(np.float64)
        center = _world(index[None, :] + rng.uniform(-0.3, 0.3, size=(1, 3)), affine)[0]
        along = _cord_axis(cord_world, center)
        across = np.cross(along, [0.0, 1.0, 0.0] if abs(along[1]) < 0.9 else [1.0, 0.0, 0.0])
        across /= np.linalg.norm(across)
        volume = float(np.exp(rng.uniform(np.log(volume_mm3[0]), np.log(volume_mm3[1]))))
        ratio = float(rng.uniform(elongation[0], elongation[1]))
        width = (3 * volume / (4 * np.pi * ratio)) ** (1 / 3)
        squash = float(rng.uniform(0.8, 1.25))
        directions = rng.normal(size=(3, 3))
        specs.append(
            _Spec(
                center=center,
                axes=np.stack([along, across, np.cross(along, across)]),
                semi_axes=np.array([ratio * width, width * squash, width / squash]),
                wobble_dirs=directions / np.linalg.norm(directions, axis=1, keepdims=True),
                wobble_phases=rng.uniform(0, 2 * np.pi, size=3),
                contrast=_draw_contrast(rng, contrast_range),
                nominal_mm3=volume,
            )
        )
    return specs


def _draw_contrast(rng: np.random.Generator, bounds: Sequence[float]) -> float:
    """Log-uniform in magnitude between the bounds (same sign; uniform when a bound is 0 or they differ in sign)."""
    low, high = sorted(float(b) for b in bounds)
    if low * high <= 0:
        return float(rng.uniform(low, high))
    sign = 1.0 if high > 0 else -1.0
    small, large = sorted((abs(low), abs(high)))
    return sign * float(np.exp(rng.uniform(np.log(small), np.log(large))))


def _world(index: np.ndarray, affine: np.ndarray) -> np.ndarray:
    """(N, 3) voxel indices -> (N, 3) world mm."""
    return index @ affine[:3, :3].T + affine[:3, 3]


def _cord_axis(cord_world: np.ndarray, center: np.ndarray) -> np.ndarray:
    """Unit vector along the cord near ``center``: the main axis of the nearby cord, else world S."""
    near = cord_world[np.linalg.norm(cord_world - center, axis=1) <= _PCA_RADIUS_MM]
    if len(near) >= 10:
        values, vectors = np.linalg.eigh(np.cov(near.T))
        if values[-1] >= 1.5 * max(values[-2], 1e-9):
            axis = vectors[:, -1]
            return axis if axis[2] >= 0 else -axis
    # a single slice or a short stub has no clear long axis; cords run close to S in scanner space
    return np.array([0.0, 0.0, 1.0])


def _samples_per_axis(voxel: np.ndarray) -> np.ndarray:
    """Sub-samples per voxel axis, about one per 0.5 mm, at most 64 per voxel."""
    counts = np.clip(np.ceil(voxel / 0.5), 1, 8).astype(int)
    while np.prod(counts) > 64:
        counts[np.argmax(counts)] -= 1
    return counts


def _lesion_fraction(spec: _Spec, shape: Sequence[int], affine: np.ndarray) -> tuple[tuple[slice, ...], np.ndarray]:
    """The lesion's partial-volume fraction in the voxel box that holds it."""
    reach = float(spec.semi_axes.max()) * (1 + _WOBBLE) + 1.0
    corners = np.array(np.meshgrid(*[[-reach, reach]] * 3, indexing="ij")).reshape(3, -1).T + spec.center
    index = np.linalg.solve(affine, np.vstack([corners.T, np.ones(8)]))[:3]
    low = np.clip(np.floor(index.min(axis=1)).astype(int) - 1, 0, np.asarray(shape))
    high = np.clip(np.ceil(index.max(axis=1)).astype(int) + 2, 0, np.asarray(shape))
    box = tuple(slice(int(a), int(b)) for a, b in zip(low, high))
    grid = np.indices(tuple(int(b - a) for a, b in zip(low, high)), dtype=np.float32)
    grid += low.astype(np.float32)[:, None, None, None]
    counts = _samples_per_axis(np.linalg.norm(affine[:3, :3], axis=0))
    offsets = np.array(np.meshgrid(*[(np.arange(c) + 0.5) / c - 0.5 for c in counts], indexing="ij")).reshape(3, -1).T
    inside = np.zeros(grid.shape[1:], dtype=np.float32)
    linear = affine[:3, :3].astype(np.float32)
    for offset in offsets:
        points = np.tensordot(linear, grid + offset.astype(np.float32)[:, None, None, None], axes=1)
        points += (affine[:3, 3] - spec.center).astype(np.float32)[:, None, None, None]
        inside += _inside(spec, points)
    return box, inside / len(offsets)


def _inside(spec: _Spec, relative: np.ndarray) -> np.ndarray:
    """Whether each point (3, ...) relative to the centre is in the irregular ellipsoid."""
    local = np.tensordot((spec.axes / spec.semi_axes[:, None]).astype(np.float32), relative, axes=1)
    radius = np.sqrt((local**2).sum(axis=0))
    # the surface wobbles by a few percent of the width with a spatial period of about two widths
    scale = np.float32(np.pi / spec.semi_axes[1:].mean())
    waves = np.tensordot(spec.wobble_dirs.astype(np.float32), relative, axes=1) * scale
    wobble = np.cos(waves + spec.wobble_phases.astype(np.float32)[:, None, None, None]).mean(axis=0)
    return radius <= 1.0 + _WOBBLE * wobble


def _record(spec: _Spec, fraction: np.ndarray, shape: Sequence[int], affine: np.ndarray, voxel_mm3: float) -> dict:
    box, own = _lesion_fraction(spec, shape, affine)
    return {
        "center_mm": [round(float(v), 3) for v in spec.center],
        "axis": [round(float(v), 4) for v in spec.axes[0]],
        "semi_axes_mm": [round(float(v), 3) for v in spec.semi_axes],
        "contrast": round(spec.contrast, 4),
        "nominal_volume_mm3": round(spec.nominal_mm3, 2),
        "volume_mm3": round(float(np.minimum(own, fraction[box]).sum()) * voxel_mm3, 2),
    }
