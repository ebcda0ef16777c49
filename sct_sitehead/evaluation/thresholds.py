"""Each head's threshold and smallest lesion, tuned on the validation split (``sct_sitehead tune-thresholds``)."""

from __future__ import annotations

import logging
from collections import defaultdict
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from sct_sitehead.deploy.masks import MaskRule, threshold_mask
from sct_sitehead.evaluation.bids import load_spatial_image
from sct_sitehead.evaluation.evaluate import Case, lesion_index
from sct_sitehead.evaluation.metrics import (
    detection_scores,
    dice,
    lesion_detection,
)

logger = logging.getLogger(__name__)


#: Thresholds tried by :func:`tune_thresholds`.
THRESHOLDS = tuple(round(0.05 * k, 2) for k in range(2, 19))


#: Smallest lesions (mm³) tried by :func:`tune_thresholds`; the simulated lesions are 8 mm³ and larger.
MIN_LESIONS_MM3 = (0.0, 3.0, 6.0, 10.0, 15.0, 20.0)


#: How much mean Dice a smallest-lesion setting may cost for its lesion-wise F1 gain.
DICE_TOLERANCE = 0.005

#: With healthy controls, the largest share of them a tuned head may mark with a lesion (the model's target: at
#: most 1 run in 10).
MAX_FLAGGED = 0.1


def tune_thresholds(
    segmenter,
    cases: list[Case],
    thresholds=THRESHOLDS,
    min_lesions_mm3=MIN_LESIONS_MM3,
    *,
    leave_one_out: bool = False,
    controls: Sequence[Path] = (),
    max_flagged: float = MAX_FLAGGED,
) -> dict[str, dict[str, Any]]:
    """Each head's probability threshold with the best mean lesion Dice on its own site's lesion-bearing cases
    (a lesion-free case has no Dice), then the smallest lesion volume kept with the best pooled lesion-wise F1
    (any-voxel rule, over every case: a lesion-free case adds its false lesions) at that threshold, among the
    settings whose mean Dice is within ``DICE_TOLERANCE`` of the best.

    Meant for the validation split (never the test split): a site's head is tuned on that site's cases, the
    ``universal`` head on every case. Ties go to the threshold closest to 0.5 and to the smallest volume.

    A site has few validation cases (7 per site in the release), and a threshold picked on so few may fit them
    and nothing else. So the pick is checked leave-one-out: each case is scored at the threshold that is best on
    the head's other cases; the pick holds when that mean Dice beats 0.5's on the same cases. With
    ``leave_one_out``, a head whose pick does not hold (or that has a single case) gets the threshold closest to
    0.5; without it (the default, what the shipped release was tuned with) the check is only reported.

    With ``controls`` (images of healthy persons of the same split; the right answer on each is no lesion), only
    the settings (threshold, smallest lesion) that mark at most ``max_flagged`` of them are open to the choice;
    when none is, the setting that marks the fewest (then the best Dice) is taken and ``controls_met`` says so.

    Returns:
        ``{head: {"threshold", "dice" (mean at that threshold, every lesion kept; NaN without a lesion-bearing
        case), "dice_at_0.5", "cases" (lesion-bearing: those Dice is over), "lesion_free_cases", "loo_dice"
        (leave-one-out mean at the tuned thresholds; None with one case), "holds" (whether the pick beats 0.5
        leave-one-out; None with one case), "min_lesion_mm3", "f1" (pooled, with it), "f1_all_lesions" (pooled,
        every lesion kept), "controls" (healthy images scored), "controls_flagged" (those marked at the tuned
        setting), "controls_met" (None without controls)}}`` for every head with at least one case. A head without
        a lesion-bearing case keeps the threshold closest to 0.5.
    """
    from nibabel.affines import voxel_sizes

    thresholds = tuple(float(t) for t in thresholds)
    volumes = tuple(float(v) for v in min_lesions_mm3)
    shape = (len(thresholds), len(volumes))
    # per lesion-bearing case, Dice per (threshold, smallest lesion)
    dices: dict[str, list[np.ndarray]] = defaultdict(list)
    free: dict[str, int] = defaultdict(int)  # lesion-free cases per head
    # n_ref, n_pred, tp, fp summed over cases, per (threshold, smallest lesion)
    detections: dict[str, np.ndarray] = defaultdict(lambda: np.zeros((*shape, 4)))
    for number, case in enumerate(cases, 1):
        image, probabilities = segmenter.predict(case.image)
        zooms = tuple(voxel_sizes(image.affine))
        reference = np.asanyarray(load_spatial_image(case.reference).dataobj) > 0
        for head in segmenter.sites:
            if head not in ("universal", case.site):
                continue
            values = probabilities[head][lesion_index(segmenter, head)]
            case_dice = np.zeros(shape)
            for i, t in enumerate(thresholds):
                for j, volume in enumerate(volumes):
                    mask = threshold_mask(values, MaskRule(t, volume), zooms)
                    case_dice[i, j] = dice(mask, reference)
                    found = lesion_detection(mask, reference, rule="any")
                    detections[head][i, j] += (found["n_ref"], found["n_pred"], found["tp"], found["fp"])
            if reference.any():
                dices[head].append(case_dice)
            else:
                free[head] += 1
        logger.info("%d/%d %s (%s)", number, len(cases), case.subject, case.site)
    # per head, healthy images marked with a lesion per (threshold, smallest lesion)
    flagged: dict[str, np.ndarray] = defaultdict(lambda: np.zeros(shape))
    for number, path in enumerate(controls, 1):
        image, probabilities = segmenter.predict(path)
        zooms = tuple(voxel_sizes(image.affine))
        for head in segmenter.sites:
            values = probabilities[head][lesion_index(segmenter, head)]
            for i, t in enumerate(thresholds):
                for j, volume in enumerate(volumes):
                    flagged[head][i, j] += bool(threshold_mask(values, MaskRule(t, volume), zooms).any())
        logger.info("control %d/%d %s", number, len(controls), Path(path).name)
    half = min(range(len(thresholds)), key=lambda k: abs(thresholds[k] - 0.5))

    def best_threshold(mean_dice: np.ndarray) -> int:
        return max(range(len(thresholds)), key=lambda k: (round(float(mean_dice[k]), 6), -abs(thresholds[k] - 0.5)))

    tuned = {}
    for head in detections:
        per_case = dices.get(head, [])
        stacked = np.stack(per_case) if per_case else np.full((0, *shape), np.nan)  # (cases, thresholds, lesions)
        mean = stacked.mean(axis=0) if per_case else np.full(shape, np.nan)
        per_case_dice = stacked[:, :, 0]  # every lesion kept
        f1 = detection_scores(*np.moveaxis(detections[head], -1, 0))["f1"]
        n = len(per_case)
        held_out = (
            [per_case_dice[k, best_threshold(np.delete(per_case_dice, k, axis=0).mean(axis=0))] for k in range(n)]
            if n > 1
            else []
        )
        loo_dice = float(np.mean(held_out)) if held_out else None
        holds = None if loo_dice is None else round(loo_dice, 6) > round(float(per_case_dice[:, half].mean()), 6)
        marked = flagged[head] if controls else np.zeros(shape)
        open_ = marked <= max_flagged * len(controls) + 1e-9 if controls else np.ones(shape, dtype=bool)
        met = bool(open_.any()) if controls else None
        if not open_.any():  # nothing meets the controls: the settings that mark the fewest stay open
            open_ = marked == marked.min()
        # per threshold, the open setting that keeps the most lesions: its Dice is the threshold's
        first_open = [int(np.argmax(open_[i])) if open_[i].any() else None for i in range(len(thresholds))]
        candidates = [i for i in range(len(thresholds)) if first_open[i] is not None]
        score = np.array(
            [float(mean[i, first_open[i]]) if first_open[i] is not None else -np.inf for i in range(len(thresholds))]
        )
        if (leave_one_out and not holds) or not per_case:
            best = min(candidates, key=lambda k: abs(thresholds[k] - 0.5))
        else:
            best = max(candidates, key=lambda k: (round(float(score[k]), 6), -abs(thresholds[k] - 0.5)))
        floor = first_open[best]
        assert floor is not None  # best is a candidate
        allowed = [
            j
            for j in range(len(volumes))
            if open_[best, j] and (not per_case or mean[best, j] >= mean[best, floor] - DICE_TOLERANCE)
        ]
        # An undefined F1 (nothing to find, nothing found) ranks below any defined one.
        smallest = max(allowed, key=lambda j: (round(float(np.nan_to_num(f1[best, j], nan=-1.0)), 6), -volumes[j]))
        tuned[head] = {
            "threshold": thresholds[best],
            "dice": float(mean[best, 0]),
            "dice_at_0.5": float(mean[half, 0]),
            "cases": n,
            "lesion_free_cases": free[head],
            "loo_dice": loo_dice,
            "holds": holds,
            "min_lesion_mm3": volumes[smallest],
            "f1": float(f1[best, smallest]),
            "f1_all_lesions": float(f1[best, 0]),
            "controls": len(controls),
            "controls_flagged": int(marked[best, smallest]),
            "controls_met": met,
        }
    return tuned
