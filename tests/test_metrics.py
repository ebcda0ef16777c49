"""Metrics on hand-made masks whose answers are worked out in the comments."""

from __future__ import annotations

import math

import numpy as np
import pytest

from sct_sitehead.errors import InputImageError, UsageError
from sct_sitehead.evaluation.metrics import (
    absolute_volume_difference,
    bootstrap_ci,
    dice,
    evaluate_case,
    label_lesions,
    lesion_detection,
    summarize,
)


def empty(shape=(20, 20, 20)) -> np.ndarray:
    return np.zeros(shape, dtype=np.uint8)


def test_dice_worked_example():
    pred, ref = empty(), empty()
    pred[0:4, 0, 0] = 1  # 4 voxels
    ref[2:8, 0, 0] = 1  # 6 voxels, 2 shared
    assert dice(pred, ref) == pytest.approx(2 * 2 / (4 + 6))


def test_dice_edge_cases():
    a = empty()
    assert dice(a, a) == 1.0
    b = empty()
    b[1, 1, 1] = 1
    assert dice(a, b) == 0.0
    assert dice(b, b) == 1.0
    assert dice(b * 7, b.astype(bool)) == 1.0  # any non-zero value is foreground


def test_shape_mismatch_is_an_input_error():
    with pytest.raises(InputImageError, match=r"\(2, 2, 2\).*\(3, 3, 3\).*resample"):
        dice(np.zeros((2, 2, 2)), np.zeros((3, 3, 3)))


def two_reference_lesions() -> np.ndarray:
    ref = empty()
    ref[1:3, 1:6, 1:3] = 1  # lesion A: 2*5*2 = 20 voxels
    ref[10:15, 10:15, 10:15] = 1  # lesion B: 125 voxels
    return ref


def test_detection_any_rule():
    ref = two_reference_lesions()
    pred = empty()
    pred[2, 5, 2] = 1  # touches A by one voxel -> A detected, this blob is a true prediction
    pred[18:20, 18:20, 18:20] = 1  # overlaps nothing -> false positive
    out = lesion_detection(pred, ref, rule="any")
    assert (out["n_ref"], out["n_pred"], out["tp"], out["fn"], out["fp"]) == (2, 2, 1, 1, 1)
    assert out["sensitivity"] == pytest.approx(0.5)
    assert out["precision"] == pytest.approx(0.5)
    assert out["f1"] == pytest.approx(0.5)


def test_detection_10pct_rule_both_sides():
    ref = two_reference_lesions()
    pred = empty()
    pred[1:3, 1:2, 1:3] = 1  # 4 voxels, all inside A: 4/20 = 20% of A -> detected; 100% of itself -> true
    pred[10:15, 10:15, 10] = 1  # 25 voxels of B: 25/125 = 20% -> detected
    out = lesion_detection(pred, ref, rule="10pct")
    assert (out["tp"], out["fn"], out["fp"]) == (2, 0, 0)

    small = empty()
    small[10, 10, 10:12] = 1  # 2 voxels of B = 1.6% of B -> B missed, but the blob is 100% inside -> not FP
    out = lesion_detection(small, ref, rule="10pct")
    assert (out["tp"], out["fn"], out["fp"]) == (0, 2, 0)
    assert out["sensitivity"] == 0.0 and out["precision"] == 1.0 and out["f1"] == 0.0

    big = empty()
    big[0:10, 0:10, 0:10] = 1  # 1000 voxels, 20 of them are A: A 100% covered -> detected; blob 2% in ref -> FP
    out = lesion_detection(big, ref, rule="10pct")
    assert (out["tp"], out["fn"], out["fp"], out["n_pred"]) == (1, 1, 1, 1)
    assert out["precision"] == 0.0 and out["f1"] == 0.0
    out_any = lesion_detection(big, ref, rule="any")
    assert (out_any["tp"], out_any["fp"]) == (1, 0)


def test_detection_empty_cases():
    ref, pred = empty(), empty()
    out = lesion_detection(pred, ref)
    assert out["f1"] == out["sensitivity"] == out["precision"] == 1.0
    pred[3, 3, 3] = 1
    out = lesion_detection(pred, ref)  # one false positive and nothing to find
    assert out["fp"] == 1 and out["precision"] == 0.0 and out["f1"] == 0.0 and math.isnan(out["sensitivity"])
    out = lesion_detection(ref, pred)  # one missed lesion, nothing predicted
    assert out["fn"] == 1 and out["sensitivity"] == 0.0 and out["f1"] == 0.0 and math.isnan(out["precision"])


def test_connectivity_splits_diagonal_voxels():
    mask = empty()
    mask[1, 1, 1] = mask[2, 2, 2] = 1  # corner neighbours
    mask[5, 5, 5] = mask[6, 6, 5] = 1  # edge neighbours
    assert label_lesions(mask, 26)[1] == 2
    assert label_lesions(mask, 18)[1] == 3
    assert label_lesions(mask, 6)[1] == 4
    with pytest.raises(UsageError, match="6, 18 or 26"):
        label_lesions(mask, 8)
    with pytest.raises(UsageError, match="'any' or '10pct'"):
        lesion_detection(mask, mask, rule="half")  # type: ignore[arg-type]


def test_absolute_volume_difference_and_evaluate_case():
    ref = two_reference_lesions()  # 145 voxels
    pred = empty()
    pred[10:15, 10:15, 10:15] = 1  # 125 voxels, exactly B
    zooms = (0.5, 0.5, 2.0)  # 0.5 mm³ per voxel
    assert absolute_volume_difference(pred, ref, 0.5) == pytest.approx(20 * 0.5)
    row = evaluate_case(pred, ref, zooms)
    assert row["dice"] == pytest.approx(2 * 125 / (125 + 145))
    assert row["volume_ref_mm3"] == pytest.approx(72.5)
    assert row["volume_pred_mm3"] == pytest.approx(62.5)
    assert row["avd_mm3"] == pytest.approx(10.0)
    assert (row["tp"], row["fn"], row["fp"]) == (1, 1, 0)
    with pytest.raises(InputImageError, match="voxel size"):
        evaluate_case(pred, ref, (1.0, 0.0, 1.0))


def test_bootstrap_ci():
    assert bootstrap_ci([0.7] * 10) == (pytest.approx(0.7), pytest.approx(0.7))
    values = np.random.default_rng(1).normal(0.6, 0.1, 200)
    low, high = bootstrap_ci(values, n=2000, seed=3)
    assert low < values.mean() < high
    # the standard error of the mean is 0.1/sqrt(200) = 0.007, so a 95% interval is about +-0.014 wide
    assert 0.015 < high - low < 0.04
    assert bootstrap_ci(values, seed=3) == bootstrap_ci(values, seed=3)
    assert bootstrap_ci([1.0, math.nan, 1.0]) == (1.0, 1.0)
    assert all(math.isnan(v) for v in bootstrap_ci([math.nan]))
    with pytest.raises(UsageError, match="alpha"):
        bootstrap_ci([1.0], alpha=1.5)


def test_summarize_skips_undefined_values():
    rows = [{"dice": 1.0, "precision": math.nan}, {"dice": 0.5, "precision": 0.5}]
    out = summarize(rows, n=200)
    assert out["dice"]["mean"] == pytest.approx(0.75) and out["dice"]["n"] == 2
    assert out["precision"] == {"mean": 0.5, "low": 0.5, "high": 0.5, "n": 1}


def _tune_on(tmp_path, probability_maps, leave_one_out=True):
    """tune_thresholds over one `montreal` case per map: each case's reference is the 27-voxel lesion at
    [4:7, 4:7, 4:7], its map every head's lesion probability."""
    import nibabel as nib

    from sct_sitehead.evaluation.evaluate import Case, tune_thresholds
    from sct_sitehead.registry.index import LabelSpec

    reference = np.zeros((12, 12, 12), np.uint8)
    reference[4:7, 4:7, 4:7] = 1
    image = nib.Nifti1Image(reference, np.eye(4))
    cases, maps = [], {}
    for number, probabilities in enumerate(probability_maps):
        path = tmp_path / f"ref{number}.nii.gz"
        nib.save(image, path)
        cases.append(Case(f"sub-{number}", "montreal", path, path))
        maps[path] = probabilities[None].astype(np.float32)

    class Head:
        labels = (LabelSpec("lesion", 1, 0),)

    class Segmenter:
        sites = ["universal", "montreal"]
        heads = {"universal": Head(), "montreal": Head()}

        def predict(self, path):
            return image, {site: maps[path] for site in self.sites}

    return tune_thresholds(Segmenter(), cases, leave_one_out=leave_one_out)


def test_tuning_keeps_the_threshold_with_the_best_dice_and_drops_lone_false_alarm_voxels(tmp_path):
    """On every case the head finds the 27-voxel lesion (p 0.9, a rim at p 0.4) plus one stray voxel (p 0.9):
    the best Dice is at a threshold above 0.4 (the rim is not lesion), and dropping lesions under 3 mm³ removes
    the stray voxel (pooled F1 2/3 -> 1) without touching the lesion."""
    reference = np.zeros((12, 12, 12), np.uint8)
    reference[4:7, 4:7, 4:7] = 1
    probabilities = np.where(reference > 0, 0.9, 0.0).astype(np.float32)
    rim = (np.pad(np.ones((5, 5, 5)), ((3, 4), (3, 4), (3, 4))) > 0) & (reference == 0)
    probabilities[rim] = 0.4
    probabilities[10, 1, 1] = 0.9
    tuned = _tune_on(tmp_path, [probabilities] * 3, leave_one_out=False)
    assert set(tuned) == {"universal", "montreal"}
    for row in tuned.values():
        assert 0.4 < row["threshold"] and row["cases"] == 3
        assert row["dice"] == pytest.approx(2 * 27 / (27 + 28))  # the stray voxel is still in at 0 mm³
        assert row["min_lesion_mm3"] == 3.0  # the smallest volume that drops it
        assert row["f1_all_lesions"] == pytest.approx(2 / 3) and row["f1"] == 1.0


def test_a_threshold_that_holds_leave_one_out_is_kept(tmp_path):
    """Every case's lesion has probability 0.3: whichever case is left out, the others pick 0.3 and it scores 1."""
    lesion = np.zeros((12, 12, 12), bool)
    lesion[4:7, 4:7, 4:7] = True
    tuned = _tune_on(tmp_path, [np.where(lesion, 0.3, 0.0)] * 3)
    row = tuned["montreal"]
    assert row["holds"] and row["threshold"] == 0.3
    assert row["loo_dice"] == pytest.approx(1.0) and row["dice"] == pytest.approx(1.0) and row["dice_at_0.5"] == 0.0


def test_a_threshold_that_fits_one_case_goes_back_to_one_half(tmp_path):
    """Case 0's lesion has probability 0.3; case 1's 0.9, with a false blob of the same size at 0.3. On both, 0.3
    has the best mean Dice (1 and 2/3 against 0 and 1), but each case's best threshold is wrong for the other:
    leave-one-out gives 0 and 2/3, below the 0 and 1 of 0.5, so the head stays at 0.5."""
    lesion = np.zeros((12, 12, 12), bool)
    lesion[4:7, 4:7, 4:7] = True
    faint = np.where(lesion, 0.3, 0.0)
    bright = np.where(lesion, 0.9, 0.0)
    bright[8:11, 8:11, 8:11] = 0.3
    tuned = _tune_on(tmp_path, [faint, bright])
    row = tuned["montreal"]
    assert row["holds"] is False and row["threshold"] == 0.5
    assert row["loo_dice"] == pytest.approx(1 / 3) and row["dice"] == pytest.approx(0.5)
    assert row["dice_at_0.5"] == pytest.approx(0.5)
    # Without the check (the default), the same cases keep the pick and only report that it does not hold.
    row = _tune_on(tmp_path, [faint, bright], leave_one_out=False)["montreal"]
    assert row["holds"] is False and row["threshold"] == 0.3 and row["dice"] == pytest.approx(5 / 6)


def test_one_case_is_not_enough_to_move_a_threshold(tmp_path):
    lesion = np.zeros((12, 12, 12), bool)
    lesion[4:7, 4:7, 4:7] = True
    tuned = _tune_on(tmp_path, [np.where(lesion, 0.3, 0.0)])
    assert tuned["montreal"]["loo_dice"] is None and tuned["montreal"]["holds"] is None
    assert tuned["montreal"]["threshold"] == 0.5
