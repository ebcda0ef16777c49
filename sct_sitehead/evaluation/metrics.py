"""Segmentation metrics for lesion masks: overlap, lesion-wise detection, volume, bootstrap intervals.

Lesion-wise detection follows the definitions used by the Spinal Cord Toolbox lesion models: lesions are the
connected components of each mask; a reference lesion is detected (true positive) when the prediction overlaps it
by any voxel (``rule="any"``) or by at least 10% of the reference lesion's volume (``rule="10pct"``); a predicted
lesion is a false positive when it overlaps no reference lesion (``"any"``) or when less than 10% of its own
volume lies in the reference (``"10pct"``).

When a quantity is undefined it is NaN, never a guess: sensitivity without reference lesions, precision without
predicted lesions. The one exception is an empty reference with an empty prediction, a perfect answer that scores
1 everywhere (Dice, sensitivity, precision, F1).
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from typing import Literal

import numpy as np

from sct_sitehead.deploy.lesions import label_lesions
from sct_sitehead.errors import InputImageError, UsageError

Rule = Literal["any", "10pct"]
#: The fraction of a lesion's volume that must overlap under ``rule="10pct"``.
MIN_OVERLAP_FRACTION = 0.10


def _as_masks(pred: np.ndarray, ref: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    pred = np.asarray(pred)
    ref = np.asarray(ref)
    if pred.shape != ref.shape:
        raise InputImageError(
            f"prediction shape {pred.shape} differs from reference shape {ref.shape}; "
            "resample the prediction onto the reference grid first"
        )
    return pred > 0, ref > 0


def dice(pred: np.ndarray, ref: np.ndarray) -> float:
    """Dice overlap of two masks (any non-zero voxel is foreground).

    Args:
        pred: (X, Y, Z) mask, any dtype.
        ref: (X, Y, Z) mask of the same shape.

    Returns:
        ``2 |P & R| / (|P| + |R|)``, and 1.0 when both masks are empty.
    """
    p, r = _as_masks(pred, ref)
    total = int(p.sum()) + int(r.sum())
    if total == 0:
        return 1.0
    return 2.0 * int(np.logical_and(p, r).sum()) / total


def _overlap_table(ref_labels: np.ndarray, n_ref: int, pred_labels: np.ndarray, n_pred: int) -> np.ndarray:
    """(n_ref + 1, n_pred + 1) voxel counts of every (reference lesion, predicted lesion) pair; row/column 0 is
    background, so row sums are reference lesion volumes and column sums predicted lesion volumes."""
    pair = ref_labels.astype(np.int64).ravel() * (n_pred + 1) + pred_labels.ravel()
    counts = np.bincount(pair, minlength=(n_ref + 1) * (n_pred + 1))
    return counts.reshape(n_ref + 1, n_pred + 1)


def lesion_detection(
    pred: np.ndarray, ref: np.ndarray, *, rule: Rule = "any", connectivity: int = 26
) -> dict[str, float | int]:
    """Lesion-wise detection counts and scores.

    Args:
        pred: (X, Y, Z) predicted mask.
        ref: (X, Y, Z) reference mask.
        rule: ``"any"``: one overlapping voxel detects a lesion; ``"10pct"``: at least 10% of the lesion's
            volume must overlap (see the module docstring for both sides).
        connectivity: 6, 18 or 26, used to split both masks into lesions.

    Returns:
        ``n_ref``, ``n_pred``, ``tp`` (detected reference lesions), ``fn`` (missed reference lesions),
        ``fp`` (false positive predicted lesions), ``sensitivity = tp / n_ref``,
        ``precision = (n_pred - fp) / n_pred``, ``f1`` (harmonic mean of the two; 0 when either is 0 or when
        one side is empty and the other is not).
    """
    if rule not in ("any", "10pct"):
        raise UsageError(f"rule is {rule!r}; use 'any' or '10pct'")
    p, r = _as_masks(pred, ref)
    ref_labels, n_ref = label_lesions(r, connectivity)
    pred_labels, n_pred = label_lesions(p, connectivity)
    table = _overlap_table(ref_labels, n_ref, pred_labels, n_pred)
    overlap_with_pred = table[1:, 1:].sum(axis=1)  # per reference lesion: voxels inside any predicted lesion
    overlap_with_ref = table[1:, 1:].sum(axis=0)  # per predicted lesion: voxels inside any reference lesion
    if rule == "any":
        detected = overlap_with_pred > 0
        true_pred = overlap_with_ref > 0
    else:
        detected = overlap_with_pred >= MIN_OVERLAP_FRACTION * table[1:, :].sum(axis=1)
        true_pred = overlap_with_ref >= MIN_OVERLAP_FRACTION * table[:, 1:].sum(axis=0)
    tp = int(detected.sum())
    fp = int(n_pred - true_pred.sum())
    scores = _detection_scores(n_ref, n_pred, tp, fp)
    return {"n_ref": n_ref, "n_pred": n_pred, "tp": tp, "fp": fp, "fn": n_ref - tp, **scores}


def _detection_scores(n_ref: int, n_pred: int, tp: int, fp: int) -> dict[str, float]:
    if n_ref == 0 and n_pred == 0:
        return {"sensitivity": 1.0, "precision": 1.0, "f1": 1.0}
    sensitivity = tp / n_ref if n_ref else math.nan
    precision = (n_pred - fp) / n_pred if n_pred else math.nan
    if n_ref == 0 or n_pred == 0 or sensitivity + precision == 0:
        f1 = 0.0
    else:
        f1 = 2 * sensitivity * precision / (sensitivity + precision)
    return {"sensitivity": sensitivity, "precision": precision, "f1": f1}


def absolute_volume_difference(pred: np.ndarray, ref: np.ndarray, voxel_mm3: float) -> float:
    """``| volume(pred) - volume(ref) |`` in mm³.

    Args:
        pred: (X, Y, Z) predicted mask.
        ref: (X, Y, Z) reference mask.
        voxel_mm3: volume of one voxel, e.g. ``prod(zooms)``.
    """
    p, r = _as_masks(pred, ref)
    return abs(int(p.sum()) - int(r.sum())) * float(voxel_mm3)


def bootstrap_ci(values: Iterable[float], n: int = 1000, alpha: float = 0.05, seed: int = 0) -> tuple[float, float]:
    """Percentile bootstrap confidence interval of the mean.

    NaN values (undefined scores, see the module docstring) are left out before resampling.

    Args:
        values: per-case values.
        n: number of bootstrap resamples.
        alpha: 0.05 gives a 95% interval.
        seed: random seed; the same values and seed give the same interval.

    Returns:
        (low, high); (nan, nan) when no finite value is left.
    """
    if not 0 < alpha < 1:
        raise UsageError(f"alpha is {alpha!r}; use a value between 0 and 1, e.g. 0.05 for a 95% interval")
    if n < 1:
        raise UsageError(f"n is {n!r}; use at least 1 resample (1000 is usual)")
    data = np.asarray(list(values), dtype=np.float64)
    data = data[np.isfinite(data)]
    if data.size == 0:
        return math.nan, math.nan
    rng = np.random.default_rng(seed)
    means = data[rng.integers(0, data.size, size=(n, data.size))].mean(axis=1)
    low, high = np.quantile(means, [alpha / 2, 1 - alpha / 2])
    return float(low), float(high)


def evaluate_case(
    pred: np.ndarray,
    ref: np.ndarray,
    zooms: Sequence[float],
    *,
    rule: Rule = "any",
    connectivity: int = 26,
) -> dict[str, float | int]:
    """Every metric of one predicted lesion mask against its reference.

    Args:
        pred: (X, Y, Z) predicted mask.
        ref: (X, Y, Z) reference mask on the same grid.
        zooms: voxel size in mm along X, Y, Z.
        rule: detection rule, see :func:`lesion_detection`.
        connectivity: 6, 18 or 26.

    Returns:
        ``dice``, ``volume_pred_mm3``, ``volume_ref_mm3``, ``avd_mm3`` and the keys of :func:`lesion_detection`.
    """
    zooms = tuple(float(z) for z in zooms)[:3]
    if len(zooms) != 3 or not all(math.isfinite(z) and z > 0 for z in zooms):
        raise InputImageError(f"voxel size {zooms} is not three positive numbers; check the image header (pixdim)")
    voxel = float(np.prod(zooms))
    p, r = _as_masks(pred, ref)
    return {
        "dice": dice(p, r),
        "volume_pred_mm3": int(p.sum()) * voxel,
        "volume_ref_mm3": int(r.sum()) * voxel,
        "avd_mm3": absolute_volume_difference(p, r, voxel),
        **lesion_detection(p, r, rule=rule, connectivity=connectivity),
    }


def summarize(
    cases: Sequence[Mapping[str, float | int]], *, n: int = 1000, alpha: float = 0.05, seed: int = 0
) -> dict[str, dict[str, float]]:
    """Mean and bootstrap interval of every numeric metric over cases (rows from :func:`evaluate_case`).

    Returns:
        metric -> ``{"mean", "low", "high", "n"}`` where ``n`` counts the cases with a finite value.
    """
    keys = sorted({k for case in cases for k, v in case.items() if isinstance(v, (int, float, np.number))})
    out: dict[str, dict[str, float]] = {}
    for key in keys:
        values = np.asarray([float(case.get(key, math.nan)) for case in cases], dtype=np.float64)
        finite = values[np.isfinite(values)]
        low, high = bootstrap_ci(finite, n=n, alpha=alpha, seed=seed)
        mean = float(finite.mean()) if finite.size else math.nan
        out[key] = {"mean": mean, "low": low, "high": high, "n": int(finite.size)}
    return out
