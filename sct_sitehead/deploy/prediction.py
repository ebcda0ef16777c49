"""The one path from an image on its own grid to a network's probabilities on the model grid.

Native voxels and affine -> model grid (optionally only a native box around the cord, grown to fill its window)
-> normalised intensities (optionally with a whole image's statistics) -> windows -> probabilities. The cord
localiser and the lesion model both take it; they differ only in their :class:`~sct_sitehead.deploy.windows.
WindowSettings`.

The stages are called through their modules (``spatial.to_model_grid``, ``normalization.normalize``,
``windows.sliding_window``), so a timer wrapped around a module's attribute (``bin/benchmark``) reaches them.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field

import numpy as np

from sct_sitehead.deploy import normalization, spatial, windows
from sct_sitehead.deploy.budget import GridCheck
from sct_sitehead.deploy.spatial import Bbox, ModelGrid
from sct_sitehead.deploy.windows import Predict, WindowSettings
from sct_sitehead.errors import InferenceError, UsageError
from sct_sitehead.registry.specs import InputSpec


@dataclass(eq=False)
class NativeImage:
    """An image's voxels on its own grid, as :func:`predict_on_grid` reads them.

    Attributes:
        data: (X, Y, Z) float32 voxels.
        affine: (4, 4) voxel-to-world affine.
        hand_over: the caller needs ``data`` no more: :func:`predict_on_grid` sets it to None once the voxels are
            on the model grid, so they are not held while the network runs (a whole spine's: 72 M voxels, 290 MB).
    """

    data: np.ndarray | None
    affine: np.ndarray
    hand_over: bool = False


@dataclass(frozen=True, eq=False)
class GridPrediction:
    """A network's probabilities for one image, on the model grid.

    Attributes:
        grid: the model grid the network ran on; :func:`~sct_sitehead.deploy.spatial.from_model_grid` brings
            arrays on it back to the image's grid.
        probabilities: ``{output: (K, X, Y, Z) float32}`` on ``grid``: one entry per head of the network.
        crop: native voxel ranges ``((x0, x1), (y0, y1), (z0, z1))`` the network ran on (a box around the cord,
            grown to fill its window); None: the whole image.
        seconds: wall time per stage: ``to_grid`` (reorient and resample), ``normalize`` and ``network`` (the
            sliding window); the lesion model's also ``localise`` when the cord localiser chose the crop.
        sample: (X, Y, Z) the image on ``grid`` before normalisation, when asked for (the localiser's: a crop's
            normalisation takes its statistics there); else None.
        cord: native voxel ranges of the cord the localiser found, when it ran; else None.
    """

    grid: ModelGrid
    probabilities: dict[str, np.ndarray]
    crop: Bbox | None = None
    seconds: dict[str, float] = field(default_factory=dict)
    sample: np.ndarray | None = None
    cord: Bbox | None = None


def predict_on_grid(
    image: NativeImage,
    spec: InputSpec,
    network: Predict,
    settings: WindowSettings,
    *,
    crop: Bbox | None = None,
    reference: np.ndarray | None = None,
    keep_sample: bool = False,
    budget: GridCheck | None = None,
) -> GridPrediction:
    """Run ``network`` over an image on the model grid of ``spec``.

    Args:
        image: the native voxels and affine.
        spec: the model grid (orientation, spacing, patch, divisor) and normalisation the network was trained on.
        network: maps a batch (N, 1, x, y, z) float32 to ``{output: (N, K, x, y, z)}``.
        settings: overlap, windows per call, window limit and edge handling.
        crop: native voxel box to run on (the cord's neighbourhood); it is grown with image voxels until its
            model grid fills its window (:func:`~sct_sitehead.deploy.windows.fill_window`).
        reference: (x, y, z) where the normalisation takes its statistics (default: the volume itself): for a
            crop, the whole image on a coarser grid, as in training.
        keep_sample: also return the image on the model grid before normalisation (``GridPrediction.sample``).
        budget: called with the native box, affine, ``spec``, ``settings`` and a crop's window before the model
            grid is made (:meth:`~sct_sitehead.deploy.budget.Budget.for_network`); it raises to refuse the run.

    Returns:
        The probabilities on the model grid, the grid, the crop actually run on and the time of each stage.

    Raises:
        RegistryError: ``spec`` is invalid (orientation, spacing, normalisation).
        InputImageError: nothing to normalise (a constant image), or ``budget`` refused the model grid.
        InferenceError: the network failed, returned arrays of the wrong shape, or NaN or infinite values.
    """
    data, affine = image.data, image.affine
    if data is None:
        raise UsageError("NativeImage.data was handed over to an earlier run; read the image again")
    seconds: dict[str, float] = {}
    start = time.perf_counter()
    window = None
    if crop is not None:
        crop, window = windows.fill_window(
            crop,
            affine,
            data.shape,
            spec.orientation,
            spec.spacing,
            spec.patch_size,
            spec.divisor,
            max_patches=settings.max_patches,
        )
    if budget is not None:
        box = data.shape if crop is None else tuple(b - a for a, b in crop)
        budget(box, affine, spec, settings, window)
    sample, grid = spatial.to_model_grid(data, affine, spec.orientation, spec.spacing, bbox=crop)
    del data
    if image.hand_over:
        image.data = None
    seconds["to_grid"] = time.perf_counter() - start

    start = time.perf_counter()
    volume = normalization.normalize(sample, spec.normalization, reference=reference)
    kept = sample if keep_sample else None
    del sample
    seconds["normalize"] = time.perf_counter() - start

    start = time.perf_counter()
    window, batch_size = settings.plan(grid.shape, spec.patch_size, spec.divisor, crop_window=window)
    probabilities = windows.sliding_window(
        volume,
        network,
        window,
        overlap=settings.overlap,
        batch_size=batch_size,
        divisor=spec.divisor,
        edge_beyond=settings.edge_beyond(spec.orientation, spec.patch_size),
    )
    del volume
    seconds["network"] = time.perf_counter() - start
    for output, values in probabilities.items():
        refuse_non_finite(output, values)
    return GridPrediction(grid=grid, probabilities=probabilities, crop=crop, seconds=seconds, sample=kept)


def refuse_non_finite(output: str, values: np.ndarray) -> None:
    """A network's output with NaN or Inf is an error, never a mask: thresholding would make it silently empty.

    One float64 sum finds it (probabilities cannot overflow it; NaN and Inf carry through): about 1 ms per million.

    Raises:
        InferenceError: some values are NaN or infinite.
    """
    if math.isfinite(float(values.sum(dtype=np.float64))):
        return
    bad = int(values.size - np.count_nonzero(np.isfinite(values)))
    raise InferenceError(
        f"the network's output {output!r} holds {bad} NaN or infinite value(s) of {values.size}: the model file is "
        "damaged or does not suit this input; nothing was written. Run `sct_sitehead cache verify`, and report it "
        "with the -v 2 output if it persists"
    )
