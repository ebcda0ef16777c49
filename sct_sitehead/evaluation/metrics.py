"""Segmentation metrics for lesion masks: overlap, lesion-wise detection, volume, bootstrap intervals.

Lesion-wise detection follows the definitions used by the Spinal Cord Toolbox lesion models: lesions are the
connected components of each mask; a reference lesion is detected (true positive) when the prediction overlaps it
by any voxel (``rule="any"``) or by at least 10% of the reference lesion's volume (``rule="10pct"``); a predicted
lesion is a false positive when it overlaps no reference lesion (``"any"``) or when less than 10% of its own
volume lies in the reference (``"10pct"``).

When a quantity is undefined it is NaN, never a guess: sensitivity without reference lesions, precision without
predicted lesions, and every overlap score of a lesion-free case. A lesion-free case (empty reference) never
contributes a Dice, even when the prediction is empty too: scoring it 1 would let the share of lesion-free cases,
not the segmentation, move the mean. Such a case is counted instead by its false lesions and false volume.

Intervals: cases of one person (the same source anatomy, deformed again and again by the simulator, or scans of
one human) are not independent, so :func:`bootstrap_by_person` resamples persons, with each person's cases, rather
than cases; an interval needs at least two persons and is NaN with fewer.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Mapping, Sequence
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
        ``2 |P & R| / (|P| + |R|)``; NaN when both masks are empty (0/0: nothing to overlap, see the module
        docstring). :func:`evaluate_case` also gives NaN for any prediction on an empty reference.
    """
    p, r = _as_masks(pred, ref)
    total = int(p.sum()) + int(r.sum())
    if total == 0:
        return math.nan
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
        one side is empty and the other is not; NaN, like the other two, when both sides are empty).
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


def _detection_scores(n_ref: float, n_pred: float, tp: float, fp: float) -> dict[str, float]:
    """Sensitivity, precision and F1 from lesion counts (of one case, or summed over cases: pooled)."""
    if n_ref == 0 and n_pred == 0:
        return {"sensitivity": math.nan, "precision": math.nan, "f1": math.nan}
    sensitivity = tp / n_ref if n_ref else math.nan
    precision = (n_pred - fp) / n_pred if n_pred else math.nan
    if n_ref == 0 or n_pred == 0 or sensitivity + precision == 0:
        f1 = 0.0
    else:
        f1 = 2 * sensitivity * precision / (sensitivity + precision)
    return {"sensitivity": sensitivity, "precision": precision, "f1": f1}


def detection_scores(n_ref: np.ndarray, n_pred: np.ndarray, tp: np.ndarray, fp: np.ndarray) -> dict[str, np.ndarray]:
    """The rules of :func:`lesion_detection` on arrays of lesion counts (e.g. summed per threshold).

    Args:
        n_ref, n_pred, tp, fp: lesion counts, arrays of one shape.

    Returns:
        ``sensitivity``, ``precision`` and ``f1``, arrays of that shape (NaN where undefined).
    """
    n_ref, n_pred, tp, fp = (np.asarray(a, dtype=np.float64) for a in (n_ref, n_pred, tp, fp))
    with np.errstate(invalid="ignore", divide="ignore"):
        sensitivity = np.where(n_ref > 0, tp / n_ref, np.nan)
        precision = np.where(n_pred > 0, (n_pred - fp) / n_pred, np.nan)
        harmonic = 2 * sensitivity * precision / (sensitivity + precision)
    one_side_empty = (n_ref == 0) != (n_pred == 0)
    f1 = np.where(one_side_empty | (sensitivity + precision == 0), 0.0, harmonic)
    f1 = np.where((n_ref == 0) & (n_pred == 0), np.nan, f1)
    return {"sensitivity": sensitivity, "precision": precision, "f1": f1}


def pooled_detection(counts: Iterable[Mapping[str, float]], suffix: str = "") -> dict[str, float]:
    """Lesion-wise sensitivity, precision and F1 of lesion counts summed over cases (pooled, not a mean of
    per-case scores): a case with many lesions weighs as many lesions, a lesion-free case adds only its false ones.

    Args:
        counts: per case, ``n_ref``, ``n_pred``, ``tp`` and ``fp`` (as :func:`lesion_detection` returns them),
            each key followed by ``suffix`` (e.g. ``"_any"``, as ``evaluate`` names its columns).
        suffix: the key suffix.

    Returns:
        ``sensitivity``, ``precision``, ``f1``, by the rules of :func:`lesion_detection` applied to the sums
        (NaN when nothing was to be found and nothing was predicted), and the summed ``n_ref``, ``n_pred``,
        ``tp``, ``fp``.
    """
    sums = {key: 0.0 for key in ("n_ref", "n_pred", "tp", "fp")}
    for case in counts:
        for key in sums:
            sums[key] += float(case[f"{key}{suffix}"])
    return {**_detection_scores(sums["n_ref"], sums["n_pred"], sums["tp"], sums["fp"]), **sums}


def absolute_volume_difference(pred: np.ndarray, ref: np.ndarray, voxel_mm3: float) -> float:
    """``| volume(pred) - volume(ref) |`` in mm³.

    Args:
        pred: (X, Y, Z) predicted mask.
        ref: (X, Y, Z) reference mask.
        voxel_mm3: volume of one voxel, e.g. ``prod(zooms)``.
    """
    p, r = _as_masks(pred, ref)
    return abs(int(p.sum()) - int(r.sum())) * float(voxel_mm3)


#: An interval from fewer persons than this says nothing about another person: it is NaN.
MIN_PERSONS = 2


def _check_interval_arguments(n: int, alpha: float) -> None:
    if not 0 < alpha < 1:
        raise UsageError(f"alpha is {alpha!r}; use a value between 0 and 1, e.g. 0.05 for a 95% interval")
    if n < 1:
        raise UsageError(f"n is {n!r}; use at least 1 resample (1000 is usual)")


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
    _check_interval_arguments(n, alpha)
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
        ``dice`` (NaN on a lesion-free reference), ``volume_pred_mm3``, ``volume_ref_mm3``, ``avd_mm3``,
        ``false_lesions`` and ``false_volume_mm3`` (the predicted lesions and their volume on a lesion-free
        reference; NaN on a reference with lesions, whose false lesions count in ``fp``), and the keys of
        :func:`lesion_detection`.
    """
    zooms = tuple(float(z) for z in zooms)[:3]
    if len(zooms) != 3 or not all(math.isfinite(z) and z > 0 for z in zooms):
        raise InputImageError(f"voxel size {zooms} is not three positive numbers; check the image header (pixdim)")
    voxel = float(np.prod(zooms))
    p, r = _as_masks(pred, ref)
    lesion_free = not r.any()
    detection = lesion_detection(p, r, rule=rule, connectivity=connectivity)
    return {
        "dice": math.nan if lesion_free else dice(p, r),
        "volume_pred_mm3": int(p.sum()) * voxel,
        "volume_ref_mm3": int(r.sum()) * voxel,
        "avd_mm3": absolute_volume_difference(p, r, voxel),
        "false_lesions": float(detection["n_pred"]) if lesion_free else math.nan,
        "false_volume_mm3": int(p.sum()) * voxel if lesion_free else math.nan,
        **detection,
    }


#: Voxels around a reference lesion (26-connected dilations) whose median intensity its contrast is taken against.
SHELL_VOXELS = 2
#: How far (voxels) around a lesion the cord voxels lie that its contrast to the cord is measured against.
CORD_RING_VOXELS = 4
#: Fewest such cord voxels for a contrast to the cord (fewer: NaN).
MIN_CORD_VOXELS = 5


def reference_lesions(
    pred: np.ndarray,
    ref: np.ndarray,
    image: np.ndarray,
    zooms: Sequence[float],
    *,
    connectivity: int = 26,
    cord: np.ndarray | None = None,
) -> list[dict[str, float]]:
    """Each reference lesion: its size, how conspicuous it is in the image and how much of it the prediction
    covers (where a model's misses lie: small, faint, against the cord's rim).

    Args:
        pred: (X, Y, Z) predicted mask.
        ref: (X, Y, Z) reference mask on the same grid.
        image: (X, Y, Z) intensities on the same grid.
        zooms: voxel size in mm along X, Y, Z.
        connectivity: 6, 18 or 26, used to split the reference into lesions.
        cord: (X, Y, Z) cord mask on the same grid, or None.

    Returns:
        One dict per reference lesion, in label order: ``volume_mm3``; ``shell_contrast``, the lesion's mean intensity
        over the median of a shell :data:`SHELL_VOXELS` voxels thick around it (other lesions left out), minus 1
        (+0.5: half as bright again as its surroundings; NaN when the shell is empty or its median is not
        positive); ``cord_contrast``, the same against the median of the lesion-free cord within
        :data:`CORD_RING_VOXELS` voxels of it (what a reader compares a lesion with, CSF left out; NaN without a
        ``cord`` or with fewer than :data:`MIN_CORD_VOXELS` such voxels); ``overlap``, the fraction of its voxels
        inside the prediction; ``detected_any`` and ``detected_10pct`` (1 or 0, :func:`lesion_detection`'s rules).

    Raises:
        InputImageError: the arrays are not on one grid.
    """
    from scipy import ndimage

    p, r = _as_masks(pred, ref)
    data = np.asarray(image, dtype=np.float64)
    if data.shape != r.shape:
        raise InputImageError(f"image shape {data.shape} does not match the reference mask's {r.shape}")
    if cord is not None and np.shape(cord) != r.shape:
        raise InputImageError(f"cord mask shape {np.shape(cord)} does not match the reference mask's {r.shape}")
    voxel = float(np.prod([float(z) for z in tuple(zooms)[:3]]))
    labels, _ = label_lesions(r, connectivity)
    margin = max(SHELL_VOXELS, CORD_RING_VOXELS if cord is not None else 0)
    rows: list[dict[str, float]] = []
    structure = np.ones((3, 3, 3), dtype=bool)
    for number, box in enumerate(ndimage.find_objects(labels), 1):
        if box is None:
            continue
        grown = tuple(slice(max(b.start - margin, 0), min(b.stop + margin, n)) for b, n in zip(box, r.shape))
        lesion = labels[grown] == number
        shell = ndimage.binary_dilation(lesion, structure, iterations=SHELL_VOXELS) & ~r[grown]
        values = data[grown]
        background = float(np.median(values[shell])) if shell.any() else math.nan
        size = int(lesion.sum())
        overlap = int(np.logical_and(lesion, p[grown]).sum()) / size
        mean = float(values[lesion].mean())
        cord_level = math.nan
        if cord is not None:
            ring = ndimage.binary_dilation(lesion, structure, iterations=CORD_RING_VOXELS) & cord[grown] & ~r[grown]
            if int(ring.sum()) >= MIN_CORD_VOXELS:
                cord_level = float(np.median(values[ring]))
        rows.append(
            {
                "volume_mm3": size * voxel,
                "shell_contrast": mean / background - 1.0 if background > 0 else math.nan,
                "cord_contrast": mean / cord_level - 1.0 if cord_level > 0 else math.nan,
                "overlap": overlap,
                "detected_any": float(overlap > 0),
                "detected_10pct": float(overlap >= MIN_OVERLAP_FRACTION),
            }
        )
    return rows


def bootstrap_by_person(
    per_case: np.ndarray,
    persons: Sequence[str],
    statistic: Callable[[np.ndarray], np.ndarray],
    *,
    n: int = 1000,
    alpha: float = 0.05,
    seed: int = 0,
) -> tuple[float, float]:
    """Percentile bootstrap interval of a statistic of summed case values, resampling persons with their cases.

    Each resample draws as many persons as there are, with replacement, and takes every case of each person
    drawn (as often as it is drawn); the statistic sees the column sums of those cases.

    Args:
        per_case: (cases, K) values to sum, e.g. ``[value, 1]`` for a mean or lesion counts for a pooled F1.
        persons: (cases,) the person of each case.
        statistic: maps (R, K) resampled sums to (R,) values (NaN where undefined: left out).
        n: number of resamples.
        alpha: 0.05 gives a 95% interval.
        seed: random seed; the same inputs give the same interval.

    Returns:
        (low, high); (nan, nan) with fewer than :data:`MIN_PERSONS` persons or no defined resample.
    """
    _check_interval_arguments(n, alpha)
    if len(set(persons)) < MIN_PERSONS:
        return math.nan, math.nan
    data = np.asarray(per_case, dtype=np.float64).reshape(len(persons), -1)
    names, person_index = np.unique(np.asarray(persons, dtype=str), return_inverse=True)
    sums = np.zeros((len(names), data.shape[1]))
    np.add.at(sums, person_index, data)
    draws = np.random.default_rng(seed).integers(0, len(names), size=(n, len(names)))
    weights = np.zeros((n, len(names)))
    np.add.at(weights, (np.arange(n)[:, None], draws), 1.0)
    values = np.asarray(statistic(weights @ sums), dtype=np.float64)
    values = values[np.isfinite(values)]
    if values.size == 0:
        return math.nan, math.nan
    low, high = np.quantile(values, [alpha / 2, 1 - alpha / 2])
    return float(low), float(high)


def _ratio(sums: np.ndarray) -> np.ndarray:
    with np.errstate(invalid="ignore", divide="ignore"):
        return sums[:, 0] / sums[:, 1]


def mean_by_person(
    values: Sequence[float], persons: Sequence[str], *, n: int = 1000, alpha: float = 0.05, seed: int = 0
) -> dict[str, float]:
    """Mean over cases and its person-bootstrap interval (:func:`bootstrap_by_person`); NaN values left out.

    Args:
        values: (cases,) per-case values.
        persons: (cases,) the person of each case.

    Returns:
        ``mean``, ``low``, ``high``, ``n`` (cases with a finite value) and ``persons`` (their persons: what the
        interval rests on).
    """
    data = np.asarray(values, dtype=np.float64)
    keep = np.isfinite(data)
    kept_persons = [p for p, k in zip(persons, keep) if k]
    mean = float(data[keep].mean()) if keep.any() else math.nan
    per_case = np.stack([data[keep], np.ones(int(keep.sum()))], axis=1)
    low, high = bootstrap_by_person(per_case, kept_persons, _ratio, n=n, alpha=alpha, seed=seed)
    return {"mean": mean, "low": low, "high": high, "n": int(keep.sum()), "persons": len(set(kept_persons))}


def pooled_detection_by_person(
    cases: Sequence[Mapping[str, float]],
    persons: Sequence[str],
    suffix: str = "",
    *,
    n: int = 1000,
    alpha: float = 0.05,
    seed: int = 0,
) -> dict[str, dict[str, float]]:
    """Pooled lesion-wise sensitivity, precision and F1 (:func:`pooled_detection`) with person-bootstrap intervals.

    Args:
        cases: per case, the counts :func:`pooled_detection` reads (keys followed by ``suffix``).
        persons: (cases,) the person of each case.

    Returns:
        ``{"sensitivity" | "precision" | "f1": {"mean", "low", "high", "n" (cases), "persons"}}``.
    """
    pooled = pooled_detection(cases, suffix)
    keys = ("n_ref", "n_pred", "tp", "fp")
    counts = np.asarray([[float(c[f"{k}{suffix}"]) for k in keys] for c in cases], dtype=np.float64).reshape(-1, 4)

    def score(name: str) -> Callable[[np.ndarray], np.ndarray]:
        def statistic(sums: np.ndarray) -> np.ndarray:
            return detection_scores(*sums.T)[name]

        return statistic

    out = {}
    for name in ("sensitivity", "precision", "f1"):
        low, high = bootstrap_by_person(counts, persons, score(name), n=n, alpha=alpha, seed=seed)
        out[name] = {"mean": pooled[name], "low": low, "high": high, "n": len(cases), "persons": len(set(persons))}
    return out


def summarize(
    cases: Sequence[Mapping[str, float | int]], *, n: int = 1000, alpha: float = 0.05, seed: int = 0
) -> dict[str, dict[str, float]]:
    """Mean and case-bootstrap interval of every numeric metric over cases (rows from :func:`evaluate_case`).

    Resampling cases is right only for independent cases; cases that share a person want
    :func:`summarize_by_person`.

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


def summarize_by_person(
    cases: Sequence[Mapping[str, float | int]],
    persons: Sequence[str],
    *,
    n: int = 1000,
    alpha: float = 0.05,
    seed: int = 0,
) -> dict[str, dict[str, float]]:
    """Mean and person-bootstrap interval (:func:`mean_by_person`) of every numeric metric over cases.

    Args:
        cases: per-case rows.
        persons: (cases,) the person of each case.

    Returns:
        metric -> ``{"mean", "low", "high", "n", "persons"}``: ``n`` counts the cases with a finite value and
        ``persons`` their persons, what the interval rests on.
    """
    if len(persons) != len(cases):
        raise UsageError(f"{len(persons)} persons for {len(cases)} cases; give one person per case")
    keys = sorted({k for case in cases for k, v in case.items() if isinstance(v, (int, float, np.number))})
    return {
        key: mean_by_person([float(case.get(key, math.nan)) for case in cases], persons, n=n, alpha=alpha, seed=seed)
        for key in keys
    }
