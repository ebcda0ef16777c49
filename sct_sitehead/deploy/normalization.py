"""Intensity normalisation on the model grid (DESIGN.md, "Model contract"): what the network was trained on.

Training's data preparation calls :func:`normalize` too, so both sides normalise the same way.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import numpy as np

from sct_sitehead.errors import InputImageError, RegistryError
from sct_sitehead.registry.specs import NormalizationSpec

#: Intensity magnitudes (largest absolute value after clipping) whose squares and deviations stay well inside
#: float32's range: an image outside them is divided by its magnitude first, which leaves its z-scores unchanged.
#: Intensities times 1e17 overflowed the float32 squares (a 4-voxel cord, no lesion); times 1e-30 underflowed them
#: to a standard deviation of 0. Every real image lies inside, and is normalised exactly as before.
SAFE_MAGNITUDE = (1e-6, 1e12)


def normalize(
    volume: np.ndarray, spec: NormalizationSpec | Mapping[str, Any], reference: np.ndarray | None = None
) -> np.ndarray:
    """Intensity normalisation of DESIGN.md, on the model grid, in float32.

    ``zscore``: clip to the image's ``clip_percentiles`` (default: no clipping), then ``(x - mean) / std`` of the
    clipped image. Means and variances are accumulated in float64 without a float64 copy of the volume; an image
    whose magnitude is outside :data:`SAFE_MAGNITUDE` is scaled into it first, so no square overflows or
    underflows.

    Args:
        volume: (X, Y, Z) array.
        spec: the release's normalisation, or its ``{"method": "zscore", "clip_percentiles": [low, high]}`` form
            (a training config's).
        reference: where the percentiles, mean and standard deviation are taken (default: ``volume``): for a
            crop, a sample of the whole image (the statistics the model was trained with), not the crop's own.

    Returns:
        (X, Y, Z) float32 array, a new one.

    Raises:
        RegistryError: unknown method or malformed percentiles.
        InputImageError: the clipped image is constant (nothing to normalise), or has no usable spread.
    """
    if not isinstance(spec, NormalizationSpec):
        spec = NormalizationSpec.from_mapping(spec)
    method = spec.method
    if method != "zscore":
        raise RegistryError(
            f"normalization method {method!r} is not supported by this version (supported: 'zscore'); "
            "upgrade sct_sitehead or choose a release that uses zscore"
        )
    low_q, high_q = (0.0, 100.0) if spec.clip_percentiles is None else spec.clip_percentiles
    volume = np.asarray(volume, dtype=np.float32)
    source = volume if reference is None else np.asarray(reference, dtype=np.float32)
    if volume.size == 0 or source.size == 0:
        raise InputImageError("cannot normalise an empty volume; check the input image")
    low, high = (float(v) for v in np.percentile(source, [low_q, high_q]))
    if not high > low:
        raise InputImageError(
            f"image intensities between percentiles {low_q:g} and {high_q:g} are all {low:g}: nothing to segment; "
            "check that the right image was given"
        )
    out: np.ndarray = np.clip(volume, low, high, dtype=np.float32)
    magnitude = max(abs(low), abs(high))
    scale = None if SAFE_MAGNITUDE[0] <= magnitude <= SAFE_MAGNITUDE[1] else np.float32(magnitude)
    if scale is not None:
        out /= scale
    if reference is None:
        _, std = _centre(out)
    else:
        clipped = np.clip(source, low, high, dtype=np.float32)
        if scale is not None:
            clipped /= scale
        mean, std = _centre(clipped)
        out -= np.float32(mean)
    if not 0.0 < std < math.inf or not math.isfinite(1.0 / std):
        raise InputImageError(
            f"image intensities between {low:g} and {high:g} have a standard deviation of {std:g}, which cannot "
            "be normalised; check the image's scaling (scl_slope) and that the right image was given"
        )
    out *= np.float32(1.0 / std)
    return out


def _centre(values: np.ndarray) -> tuple[float, float]:
    """Subtract its mean from float32 ``values`` in place; the mean and the standard deviation, in float64."""
    mean = values.sum(dtype=np.float64) / values.size
    values -= np.float32(mean)
    return mean, math.sqrt(float(np.square(values).sum(dtype=np.float64)) / values.size)
