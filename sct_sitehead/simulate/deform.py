"""Random smooth spatial deformations: a small affine plus an elastic displacement field.

A deformation maps each point ``q`` of an output (working) grid to the point of the source anatomy it shows:
``source(q) = A q + u(q)``, with ``A`` an affine close to identity about the grid centre and ``u`` a cubic
B-spline displacement field (control points every ``elastic_spacing_mm``). Pulling the image and its cord mask
through the same map keeps them aligned.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from sct_sitehead.simulate.grids import rotation_about


@dataclass(frozen=True)
class RandomDeformation:
    """One drawn deformation.

    Attributes:
        matrix: (4, 4) world affine ``A`` (output world mm -> source world mm).
        control: (3, Cx, Cy, Cz) B-spline coefficients of the displacement (mm), on the output grid's axes.
        control_spacing_vox: (3,) control point spacing in output voxels.
        params: the drawn values, JSON-ready.
    """

    matrix: np.ndarray
    control: np.ndarray
    control_spacing_vox: np.ndarray
    params: dict[str, Any]


def draw_deformation(
    rng: np.random.Generator,
    shape: Sequence[int],
    affine: np.ndarray,
    *,
    rotation_deg: float,
    scale: float,
    translation_mm: float,
    elastic_mm: float,
    elastic_spacing_mm: float,
) -> RandomDeformation:
    """Draw a deformation for an output grid.

    Args:
        rng: random generator (consumed in a fixed order, so a seed gives one deformation).
        shape: (3,) output grid shape.
        affine: (4, 4) output grid affine.
        rotation_deg: the rotation angle about a random axis is uniform in [-rotation_deg, rotation_deg].
        scale: per-axis scale uniform in [1 - scale, 1 + scale].
        translation_mm: per-axis shift uniform in [-translation_mm, translation_mm].
        elastic_mm: standard deviation of each control point's displacement.
        elastic_spacing_mm: control point spacing.
    """
    axis = rng.normal(size=3)
    angle = float(rng.uniform(-rotation_deg, rotation_deg))
    scales = rng.uniform(1 - scale, 1 + scale, size=3)
    shift = rng.uniform(-translation_mm, translation_mm, size=3)
    linear = rotation_about(axis, angle) @ np.diag(scales)
    center = affine[:3, :3] @ ((np.asarray(shape, dtype=np.float64) - 1) / 2) + affine[:3, 3]
    matrix = np.eye(4)
    matrix[:3, :3] = linear
    matrix[:3, 3] = center - linear @ center + shift
    voxel = np.linalg.norm(affine[:3, :3], axis=0)
    spacing_vox = np.maximum(elastic_spacing_mm / voxel, 1.0)
    n_control = np.ceil((np.asarray(shape) - 1) / spacing_vox).astype(int) + 4  # cubic support on both sides
    control = rng.normal(0.0, elastic_mm, size=(3, *n_control)).astype(np.float32)
    params = {
        "rotation_axis": [round(float(v), 4) for v in axis / np.linalg.norm(axis)],
        "rotation_deg": round(angle, 3),
        "scale": [round(float(v), 4) for v in scales],
        "translation_mm": [round(float(v), 3) for v in shift],
        "elastic_mm": elastic_mm,
        "elastic_spacing_mm": elastic_spacing_mm,
    }
    return RandomDeformation(matrix, control, spacing_vox, params)


def _bspline_matrix(n: int, spacing: float, n_control: int) -> np.ndarray:
    """(n, n_control) cubic B-spline weights of each of n samples; control point 1 sits on sample 0."""
    t = np.arange(n) / spacing + 1.0
    j = np.arange(n_control)
    u = np.abs(t[:, None] - j[None, :])
    weights = np.where(u < 1, (4 - 6 * u**2 + 3 * u**3) / 6, np.where(u < 2, (2 - u) ** 3 / 6, 0.0))
    return weights.astype(np.float32)


def displacement_field(deformation: RandomDeformation, shape: Sequence[int]) -> np.ndarray:
    """Dense displacement of every output voxel.

    Returns:
        (3, X, Y, Z) float32 displacement in world mm.
    """
    field = deformation.control
    for axis in range(3):
        basis = _bspline_matrix(int(shape[axis]), float(deformation.control_spacing_vox[axis]), field.shape[axis + 1])
        field = np.moveaxis(np.tensordot(basis, field, axes=([1], [axis + 1])), 0, axis + 1)
    return np.ascontiguousarray(field, dtype=np.float32)


def source_coordinates(
    deformation: RandomDeformation, shape: Sequence[int], affine: np.ndarray, source_affine: np.ndarray
) -> np.ndarray:
    """Voxel coordinates, in the source image, of what each output voxel shows.

    Args:
        deformation: from :func:`draw_deformation` for this output grid.
        shape: (3,) output grid shape.
        affine: (4, 4) output grid affine.
        source_affine: (4, 4) source image affine.

    Returns:
        (3, X, Y, Z) float32 coordinates for ``scipy.ndimage.map_coordinates``.
    """
    to_source_voxels = np.linalg.solve(source_affine, deformation.matrix @ affine)
    grids = np.indices(tuple(shape), dtype=np.float32)
    coords = np.tensordot(to_source_voxels[:3, :3].astype(np.float32), grids, axes=1)
    coords += to_source_voxels[:3, 3].astype(np.float32)[:, None, None, None]
    # the displacement is in world mm; the source's inverse linear part turns it into source voxels
    world_to_source = np.linalg.inv(source_affine[:3, :3]).astype(np.float32)
    coords += np.tensordot(world_to_source, displacement_field(deformation, shape), axes=1)
    return coords


def warp(data: np.ndarray, coords: np.ndarray, *, order: int = 1) -> np.ndarray:
    """Sample ``data`` at ``coords`` (from :func:`source_coordinates`); edges extend outward, as anatomy does.

    Returns:
        float32 array of the coordinates' spatial shape.
    """
    from scipy import ndimage

    return ndimage.map_coordinates(
        np.asarray(data, dtype=np.float32), coords, order=order, mode="nearest", prefilter=False
    )
