"""Voxel grids placed in world space (RAS mm): affines from orientation codes, and resampling between grids.

The simulator keeps the anatomy in world millimetres and lets each grid sample it, so the same anatomy can be
seen at any resolution, field of view and slice orientation.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from sct_sitehead.errors import UsageError

_AXIS_OF = {"R": (0, 1.0), "L": (0, -1.0), "A": (1, 1.0), "P": (1, -1.0), "S": (2, 1.0), "I": (2, -1.0)}


def check_orientation(orientation: str) -> str:
    """Upper-cased three-letter code using each of R/L, A/P, S/I once, e.g. ``"LAS"``; UsageError otherwise."""
    code = str(orientation).upper()
    axes = [_AXIS_OF[c][0] for c in code if c in _AXIS_OF]
    if len(code) != 3 or len(axes) != 3 or sorted(axes) != [0, 1, 2]:
        raise UsageError(
            f"orientation {orientation!r} is not a 3-letter code with one of R/L, one of A/P and one of S/I; "
            "use e.g. 'RAS', 'LAS' or 'PSR'"
        )
    return code


def rotation_about(axis: Sequence[float] | np.ndarray, degrees: float) -> np.ndarray:
    """(3, 3) rotation matrix turning by ``degrees`` about ``axis`` (right-hand rule)."""
    u = np.asarray(axis, dtype=np.float64)
    u = u / np.linalg.norm(u)
    t = np.deg2rad(degrees)
    cross = np.array([[0, -u[2], u[1]], [u[2], 0, -u[0]], [-u[1], u[0], 0]])
    return np.cos(t) * np.eye(3) + np.sin(t) * cross + (1 - np.cos(t)) * np.outer(u, u)


def grid_affine(
    shape: Sequence[int],
    spacing: Sequence[float] | np.ndarray,
    orientation: str = "RAS",
    center: Sequence[float] = (0.0, 0.0, 0.0),
    rotation: np.ndarray | None = None,
) -> np.ndarray:
    """Affine of a grid whose voxel axes run along ``orientation``, centred on a world point.

    Args:
        shape: (3,) voxels per axis.
        spacing: (3,) voxel size in mm along each voxel axis.
        orientation: where each voxel axis points, e.g. ``"PSR"``: axis 0 to Posterior, 1 Superior, 2 Right.
        center: (3,) world position (RAS mm) of the grid's centre.
        rotation: optional (3, 3) world rotation applied to the axes about the centre (oblique grids).

    Returns:
        (4, 4) voxel-to-world affine.
    """
    code = check_orientation(orientation)
    sizes = np.asarray(spacing, dtype=np.float64)
    if sizes.shape != (3,) or not np.all(sizes > 0):
        raise UsageError(f"voxel spacing {tuple(sizes.tolist())} is not three positive sizes in mm; e.g. (1, 1, 1)")
    directions = np.zeros((3, 3))
    for column, letter in enumerate(code):
        axis, sign = _AXIS_OF[letter]
        directions[axis, column] = sign
    if rotation is not None:
        directions = np.asarray(rotation, dtype=np.float64) @ directions
    affine = np.eye(4)
    affine[:3, :3] = directions * sizes
    middle = (np.asarray(shape, dtype=np.float64) - 1) / 2
    affine[:3, 3] = np.asarray(center, dtype=np.float64) - affine[:3, :3] @ middle
    return affine


def voxel_coordinates(dst_shape: Sequence[int], dst_affine: np.ndarray, src_affine: np.ndarray) -> np.ndarray:
    """Source-grid voxel coordinates of every destination voxel centre.

    Returns:
        (3, X, Y, Z) float32 array for ``scipy.ndimage.map_coordinates``.
    """
    to_src = np.linalg.solve(src_affine, dst_affine)
    grids = np.indices(tuple(dst_shape), dtype=np.float32)
    out = np.tensordot(to_src[:3, :3].astype(np.float32), grids, axes=1)
    out += to_src[:3, 3].astype(np.float32)[:, None, None, None]
    return out


def resample(
    data: np.ndarray,
    src_affine: np.ndarray,
    dst_shape: Sequence[int],
    dst_affine: np.ndarray,
    *,
    order: int = 1,
    cval: float = 0.0,
) -> np.ndarray:
    """Sample an array on another grid of the same world.

    Args:
        data: (X, Y, Z) array on the source grid.
        src_affine: (4, 4) source affine.
        dst_shape: (3,) destination shape.
        dst_affine: (4, 4) destination affine.
        order: spline order (0 nearest, 1 linear).
        cval: value outside the source grid.

    Returns:
        (X', Y', Z') float32 array.
    """
    from scipy import ndimage

    coords = voxel_coordinates(dst_shape, dst_affine, src_affine)
    return ndimage.map_coordinates(
        np.asarray(data, dtype=np.float32), coords, order=order, mode="constant", cval=cval, prefilter=False
    )


def world_extent(shape: Sequence[int], affine: np.ndarray, *, edges: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """(3,) lowest and (3,) highest world coordinates of the grid (axis-aligned box).

    With ``edges`` the box holds the voxels' outer faces, so two grids covering the same field of view at
    different resolutions have the same box; otherwise it holds the voxel centres.
    """
    half = 0.5 if edges else 0.0
    corners = np.array(np.meshgrid(*[[-half, n - 1 + half] for n in shape], indexing="ij")).reshape(3, -1)
    world = affine[:3, :3] @ corners + affine[:3, 3:4]
    return world.min(axis=1), world.max(axis=1)
