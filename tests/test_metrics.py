"""Metrics on hand-made masks whose answers are worked out in the comments."""

from __future__ import annotations

import math

import numpy as np
import pytest

from sct_sitehead.errors import InputImageError, UsageError
from sct_sitehead.evaluation.metrics import (
    absolute_volume_difference,
    bootstrap_by_person,
    bootstrap_ci,
    detection_scores,
    dice,
    evaluate_case,
    label_lesions,
    lesion_detection,
    mean_by_person,
    pooled_detection,
    reference_lesions,
    summarize,
    summarize_by_person,
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
    assert math.isnan(dice(a, a))  # nothing to overlap: undefined, not a perfect 1
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
    assert all(math.isnan(out[k]) for k in ("f1", "sensitivity", "precision"))  # nothing to find, none found
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


def test_a_case_row_names_the_false_lesions_of_a_lesion_free_case_once():
    """The experiment averages ``false_lesions`` over seeds by that name; it does not depend on the rule."""
    from sct_sitehead.evaluation.evaluate import score_case

    reference = np.zeros((8, 8, 8), dtype=bool)
    prediction = reference.copy()
    prediction[1:3, 1:3, 1:3] = True
    prediction[6, 6, 6] = True
    row = score_case(prediction, reference, (1.0, 1.0, 2.0))
    assert row["false_lesions"] == 2.0 and row["false_volume_mm3"] == 18.0
    assert row["n_pred_any"] == row["n_pred_10pct"] == 2.0 and math.isnan(row["dice"])
    reference[1, 1, 1] = True
    assert math.isnan(score_case(prediction, reference, (1.0, 1.0, 2.0))["false_lesions"])


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
    reference = np.zeros((12, 12, 12), np.uint8)
    reference[4:7, 4:7, 4:7] = 1
    return _tune_on_references(tmp_path, [(reference, p) for p in probability_maps], leave_one_out=leave_one_out)


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


def test_an_empty_reference_with_an_empty_prediction_contributes_no_dice():
    """Lesion-free cases: no Dice (NaN, left out of the mean), counted by their false lesions and volume instead."""
    from sct_sitehead.evaluation.evaluate import summarize_cases

    zooms = (1.0, 1.0, 2.0)  # 2 mm³ per voxel
    clean = evaluate_case(empty(), empty(), zooms)
    assert math.isnan(clean["dice"]) and clean["false_lesions"] == 0 and clean["false_volume_mm3"] == 0
    flagged_pred = empty()
    flagged_pred[3:5, 3, 3] = 1  # one false lesion of 2 voxels
    flagged = evaluate_case(flagged_pred, empty(), zooms)
    assert math.isnan(flagged["dice"]) and flagged["false_lesions"] == 1 and flagged["false_volume_mm3"] == 4.0
    ref = two_reference_lesions()
    half = ref.copy()
    half[10:15] = 0  # lesion A found exactly, B missed: Dice 2*20/(20+145)
    lesion = evaluate_case(half, ref, zooms)
    assert lesion["dice"] == pytest.approx(40 / 165) and math.isnan(lesion["false_lesions"])

    rows = []
    for person, row in (("p1", clean), ("p1", flagged), ("p2", lesion)):
        for rule in ("any", "10pct"):
            row = {**row, **{f"{k}_{rule}": row[k] for k in ("n_ref", "n_pred", "tp", "fp")}}
        rows.append({**row, "person": person, "subject": f"sub-{len(rows)}"})
    entry = summarize_cases(rows)
    assert entry["dice"] == pytest.approx(40 / 165)  # not (1 + 0 + 0.24) / 3: the lesion-free cases have no Dice
    assert (entry["lesion_cases"], entry["free_cases"], entry["free_cases_flagged"]) == (1, 2, 1)
    assert entry["false_lesions"] == pytest.approx(0.5) and entry["false_volume_mm3"] == pytest.approx(2.0)
    # pooled over every case: 1 of 2 reference lesions found; 2 predicted lesions (A and the false one), 1 true
    assert entry["sensitivity_any"] == pytest.approx(0.5) and entry["precision_any"] == pytest.approx(0.5)
    assert (entry["persons_lesion"], entry["persons"], entry["persons_free"]) == (1, 2, 1)
    assert math.isnan(entry["dice_low"])  # one person: no interval


def test_a_reference_lesion_touching_two_predictions_counts_once():
    ref = empty()
    ref[2:12, 5, 5] = 1  # one lesion of 10 voxels
    pred = empty()
    pred[2:4, 5, 5] = 1  # two predicted lesions, each inside it
    pred[9:11, 5, 5] = 1
    out = lesion_detection(pred, ref, rule="any")
    assert (out["n_ref"], out["n_pred"], out["tp"], out["fn"], out["fp"]) == (1, 2, 1, 0, 0)
    assert out["sensitivity"] == 1.0 and out["precision"] == 1.0 and out["f1"] == 1.0
    # pooled over two such cases: still one true positive per reference lesion
    pooled = pooled_detection([out, out])
    assert (pooled["tp"], pooled["n_ref"], pooled["n_pred"]) == (2, 2, 4) and pooled["f1"] == 1.0


def test_pooled_detection_sums_counts_and_is_undefined_on_nothing():
    cases = [
        {"n_ref": 3, "n_pred": 1, "tp": 1, "fp": 0},  # per case F1 0.5
        {"n_ref": 0, "n_pred": 2, "tp": 0, "fp": 2},  # a lesion-free case with two false lesions
    ]
    out = pooled_detection(cases)
    assert out["sensitivity"] == pytest.approx(1 / 3) and out["precision"] == pytest.approx(1 / 3)
    assert out["f1"] == pytest.approx(1 / 3)
    assert math.isnan(pooled_detection([{"n_ref": 0, "n_pred": 0, "tp": 0, "fp": 0}])["f1"])
    arrays = detection_scores(np.array([3, 0, 2]), np.array([1, 0, 0]), np.array([1, 0, 0]), np.array([0, 0, 0]))
    assert arrays["f1"][0] == pytest.approx(0.5) and math.isnan(arrays["f1"][1]) and arrays["f1"][2] == 0.0


def test_a_person_bootstrap_on_correlated_cases_is_wider_than_a_case_bootstrap():
    """Six persons, 12 cases each, every case near its person's own level (the simulator deforms one anatomy
    again and again): the cases are not 72 independent draws, and only a person bootstrap says so."""
    rng = np.random.default_rng(0)
    levels = rng.uniform(0.1, 0.9, 6)
    values = np.concatenate([level + rng.normal(0, 0.02, 12) for level in levels])
    persons = [f"p{k}" for k in range(6) for _ in range(12)]
    case_low, case_high = bootstrap_ci(values, seed=1)
    by_person = mean_by_person(values, persons, seed=1)
    assert by_person["mean"] == pytest.approx(values.mean()) and by_person["persons"] == 6
    assert by_person["low"] < case_low and by_person["high"] > case_high
    assert (by_person["high"] - by_person["low"]) > 2 * (case_high - case_low)
    # one person per case is a case bootstrap: about the same width
    alone = mean_by_person(values, [str(k) for k in range(72)], seed=1)
    assert alone["high"] - alone["low"] == pytest.approx(case_high - case_low, rel=0.2)


def test_a_person_bootstrap_needs_two_persons_and_resamples_whole_persons():
    one = mean_by_person([0.2, 0.4, 0.9], ["p", "p", "p"])
    assert one["mean"] == pytest.approx(0.5) and one["persons"] == 1 and math.isnan(one["low"])
    # Persons a (1 case, value 1) and b (3 cases, value 0): a resample is {b, b} (mean 0), {a, b} (1/4) or {a, a}
    # (1), the two extremes a quarter of the time each, so the 95% interval runs from 0 to 1. A case bootstrap
    # of the same 4 values would rarely draw the single 1 four times.
    per_case = np.array([[1.0, 1.0], [0.0, 1.0], [0.0, 1.0], [0.0, 1.0]])
    two = bootstrap_by_person(per_case, ["a", "b", "b", "b"], lambda sums: sums[:, 0] / sums[:, 1], n=400, seed=2)
    assert two == (pytest.approx(0.0), pytest.approx(1.0))
    assert bootstrap_ci(per_case[:, 0], n=400, seed=2)[1] < 1.0
    summary = summarize_by_person([{"dice": 0.5}, {"dice": math.nan}], ["a", "b"])
    assert summary["dice"]["n"] == 1 and summary["dice"]["persons"] == 1
    with pytest.raises(UsageError, match="one person per case"):
        summarize_by_person([{"dice": 0.5}], ["a", "b"])


def test_tuning_scores_dice_on_lesion_cases_only(tmp_path):
    """A lesion-free case (its map empty) gives no Dice: the threshold is picked on the lesion case alone, and
    'cases' counts the lesion-bearing ones."""
    lesion = np.zeros((12, 12, 12), bool)
    lesion[4:7, 4:7, 4:7] = True
    tuned = _tune_on_references(
        tmp_path, [(lesion, np.where(lesion, 0.3, 0.0)), (np.zeros_like(lesion), np.zeros(lesion.shape))]
    )
    row = tuned["montreal"]
    assert row["cases"] == 1 and row["lesion_free_cases"] == 1
    assert row["dice"] == pytest.approx(1.0) and row["threshold"] == 0.3 and row["f1_all_lesions"] == 1.0


def _core_and_rim_cases():
    """Three cases whose 27-voxel lesion has a core of 8 voxels at p 0.9 and the rest at p 0.3: Dice 1 at
    threshold 0.3, 16/35 above it."""
    reference = np.zeros((12, 12, 12), np.uint8)
    reference[4:7, 4:7, 4:7] = 1
    probabilities = np.where(reference > 0, 0.3, 0.0).astype(np.float32)
    probabilities[4:6, 4:6, 4:6] = 0.9
    return [(reference, probabilities)] * 3


def _healthy(value: float, voxels: int) -> np.ndarray:
    """A healthy scan's lesion probabilities: a false blob of ``voxels`` voxels (1 mm³ each) at ``value``."""
    probabilities = np.zeros((12, 12, 12), np.float32)
    probabilities.reshape(-1)[:voxels] = value  # along the first rows: one connected piece
    return probabilities


def test_controls_close_the_settings_that_mark_healthy_scans(tmp_path):
    """Healthy scans with a 27 mm³ false blob at p 0.3: without them the tuning picks 0.3 (Dice 1); with them
    every setting at 0.3 marks all three, above the 10% allowed, so the pick moves up (16/35, closest to 0.5)."""
    free = _tune_on_references(tmp_path, _core_and_rim_cases())["montreal"]
    assert free["threshold"] == 0.3 and free["dice"] == pytest.approx(1.0) and free["controls_met"] is None
    tuned = _tune_on_references(tmp_path, _core_and_rim_cases(), controls=[_healthy(0.3, 27)] * 3)["montreal"]
    assert tuned["threshold"] == 0.5 and tuned["dice"] == pytest.approx(16 / 35)
    assert tuned["controls"] == 3 and tuned["controls_flagged"] == 0 and tuned["controls_met"] is True


def test_controls_can_be_met_by_dropping_small_lesions(tmp_path):
    """A 2 mm³ false blob at p 0.3: dropping lesions under 3 mm³ clears the healthy scans at threshold 0.3, which
    keeps its Dice of 1."""
    tuned = _tune_on_references(tmp_path, _core_and_rim_cases(), controls=[_healthy(0.3, 2)] * 3)["montreal"]
    assert tuned["threshold"] == 0.3 and tuned["min_lesion_mm3"] == 3.0
    assert tuned["controls_flagged"] == 0 and tuned["controls_met"] is True


def test_when_no_setting_meets_the_controls_the_fewest_marked_win_and_it_is_said(tmp_path):
    """A 27 mm³ false blob at p 0.95, above every threshold tried and every smallest lesion: all settings mark
    all three scans, so the choice is the Dice one and controls_met is False."""
    tuned = _tune_on_references(tmp_path, _core_and_rim_cases(), controls=[_healthy(0.95, 27)] * 3)["montreal"]
    assert tuned["threshold"] == 0.3 and tuned["controls_flagged"] == 3 and tuned["controls_met"] is False
    loose = _tune_on_references(tmp_path, _core_and_rim_cases(), controls=[_healthy(0.95, 27)] * 3, max_flagged=1.0)[
        "montreal"
    ]
    assert loose["controls_met"] is True and loose["threshold"] == 0.3


def _tune_on_references(tmp_path, pairs, leave_one_out=False, controls=(), max_flagged=0.1):
    """tune_thresholds on `montreal` cases, each given as (reference mask, lesion probability map), and on healthy
    controls given as probability maps."""
    import nibabel as nib

    from sct_sitehead.evaluation.evaluate import Case
    from sct_sitehead.evaluation.thresholds import tune_thresholds
    from sct_sitehead.registry.specs import LabelSpec

    cases, maps, image = [], {}, None
    for number, (reference, probabilities) in enumerate(pairs):
        image = nib.Nifti1Image(reference.astype(np.uint8), np.eye(4))
        path = tmp_path / f"ref{number}.nii.gz"
        nib.save(image, path)
        cases.append(Case(f"sub-{number}", "montreal", path, path))
        maps[path] = probabilities[None].astype(np.float32)
    healthy = []
    for number, probabilities in enumerate(controls):
        path = tmp_path / f"control{number}.nii.gz"
        nib.save(nib.Nifti1Image(np.zeros(probabilities.shape, np.uint8), np.eye(4)), path)
        healthy.append(path)
        maps[path] = probabilities[None].astype(np.float32)

    class Head:
        labels = (LabelSpec("lesion", 1, 0),)

    class Segmenter:
        sites = ["universal", "montreal"]
        heads = {"universal": Head(), "montreal": Head()}

        def predict(self, path):
            return nib.load(path), {site: maps[path] for site in self.sites}

    return tune_thresholds(Segmenter(), cases, leave_one_out=leave_one_out, controls=healthy, max_flagged=max_flagged)


def _participants(root, rows: str):
    root.mkdir(parents=True, exist_ok=True)
    (root / "participants.tsv").write_text(rows)
    return root


def test_case_persons_come_from_the_person_column_or_the_simulated_source(tmp_path):
    from sct_sitehead.evaluation.evaluate import case_persons

    sim = _participants(
        tmp_path / "sim",
        "participant_id\tsite\tsource\tsplit\nsub-a001\ta\tsub-tut01_acq-MToff_MTS\ttest\n"
        "sub-a002\ta\tsub-unf01_T2w as T1w\ttest\nsub-a003\ta\tsub-phantom02_T2w\ttrain\n",
    )
    assert case_persons(sim) == {"sub-a001": "sg-unf01", "sub-a002": "sg-unf01", "sub-a003": "sub-phantom02"}
    panel = _participants(tmp_path / "panel", "participant_id\tsite\tperson\nsub-p001\tunf\tsg-unf05\n")
    assert case_persons(panel) == {"sub-p001": "sg-unf05"}
    plain = _participants(tmp_path / "plain", "participant_id\tsite\nsub-x\tunf\n")
    assert case_persons(plain) == {"sub-x": "sub-x"}


def test_controls_are_counted_per_head_for_the_held_out_persons_and_for_all(tmp_path):
    from sct_sitehead.evaluation.controls import (
        controls_markdown,
        describe_controls,
        healthy_controls,
        summarize_controls,
    )

    bids = _participants(
        tmp_path / "bids",
        "participant_id\tsite\tpathology\tperson\nsub-tut05\tunf\tHC\tsg-unf05\nsub-errsm30\terrsm\tHC\terrsm30\n"
        "sub-unf01\tunf\tMildCompression\tsg-unf01\nsub-ms01\tunknown\tMS\tms01\n",
    )
    for stem in ("sub-tut05/anat/sub-tut05_acq-MTon_MTS", "sub-errsm30/anat/sub-errsm30_T2w",
                 "sub-unf01/anat/sub-unf01_T2w", "sub-ms01/anat/sub-ms01_T2w"):  # fmt: skip
        (bids / stem).parent.mkdir(parents=True, exist_ok=True)
        (bids / f"{stem}.nii.gz").write_bytes(b"")
    images = healthy_controls(bids)
    assert [p.name for p in images] == [
        "sub-errsm30_T2w.nii.gz",
        "sub-tut05_acq-MTon_MTS.nii.gz",
        "sub-unf01_T2w.nii.gz",
    ]
    found = {"sub-errsm30_T2w.nii.gz": (2, 30.0), "sub-tut05_acq-MTon_MTS.nii.gz": (1, 5.0)}
    rows = [
        {"image": p.name, "head": head, "lesions": found.get(p.name, (0, 0.0))[0] if head == "montreal" else 0,
         "volume_mm3": found.get(p.name, (0, 0.0))[1] if head == "montreal" else 0.0}
        for p in images for head in ("montreal", "universal")
    ]  # fmt: skip
    described = describe_controls(rows, bids)
    assert {(r["subject"], r["person"], r["split"], r["pathology"]) for r in described} == {
        ("sub-errsm30", "errsm30", "train", "HC"),
        ("sub-tut05", "sg-unf05", "test", "HC"),
        ("sub-unf01", "sg-unf01", "test", "MildCompression"),
    }
    summary = {(e["scope"], e["head"]): e for e in summarize_controls(described)}
    test = summary[("test", "montreal")]
    assert (test["images"], test["persons"], test["runs_flagged"]) == (2, 2, 1)
    assert test["false_lesions_per_scan"] == pytest.approx(0.5) and test["false_volume_mm3_per_scan"] == 2.5
    everything = summary[("all", "montreal")]
    assert (everything["images"], everything["runs_flagged"], everything["false_lesions_per_scan"]) == (3, 2, 1.0)
    assert summary[("all", "universal")]["runs_flagged"] == 0
    text = controls_markdown(list(summary.values()))
    assert "held-out (test) persons: 2 images of 2 persons" in text and "| montreal | 1 of 2 | 0.50 | 2.5 |" in text


def test_reference_lesions_measure_size_contrast_and_coverage() -> None:
    """Two cubes in a background of 100: A (3x3x3 at 150, +50%) half covered by the prediction, B (2x2x2 at 300,
    +200%) missed; voxels of 1 x 1 x 2 mm."""
    image = np.full((30, 30, 30), 100.0)
    ref = empty((30, 30, 30))
    image[5:8, 5:8, 5:8] = 150.0
    ref[5:8, 5:8, 5:8] = 1
    image[20:22, 20:22, 20:22] = 300.0
    ref[20:22, 20:22, 20:22] = 1
    pred = empty((30, 30, 30))
    pred[5:8, 5:8, 5:7] = 1  # 18 of A's 27 voxels
    pred[0:2, 0:2, 0:2] = 1  # a false lesion: no row of its own
    a, b = reference_lesions(pred, ref, image, (1.0, 1.0, 2.0))
    assert a["volume_mm3"] == 54.0 and b["volume_mm3"] == 16.0
    assert a["shell_contrast"] == pytest.approx(0.5) and b["shell_contrast"] == pytest.approx(2.0)
    assert a["overlap"] == pytest.approx(18 / 27) and a["detected_any"] == a["detected_10pct"] == 1.0
    assert b["overlap"] == 0.0 and b["detected_any"] == b["detected_10pct"] == 0.0


def test_reference_lesions_leave_neighbouring_lesions_out_of_the_shell() -> None:
    """A dim lesion (+20%) one voxel from a very bright one: its shell is the background only, so +20%, not more;
    a lesion touched by one predicted voxel is found by any voxel and not by 10%."""
    image = np.full((20, 20, 20), 100.0)
    ref = empty((20, 20, 20))
    image[5:10, 5:10, 5:10] = 120.0
    ref[5:10, 5:10, 5:10] = 1
    image[11:14, 5:10, 5:10] = 1000.0
    ref[11:14, 5:10, 5:10] = 1
    pred = empty((20, 20, 20))
    pred[5, 5, 5] = 1
    dim, bright = reference_lesions(pred, ref, image, (1.0, 1.0, 1.0), connectivity=6)
    assert dim["shell_contrast"] == pytest.approx(0.2) and bright["shell_contrast"] == pytest.approx(9.0)
    assert dim["detected_any"] == 1.0 and dim["detected_10pct"] == 0.0
    with pytest.raises(InputImageError, match="image shape"):
        reference_lesions(pred, ref, image[:-1], (1.0, 1.0, 1.0))


def test_reference_lesions_of_an_empty_reference_are_none() -> None:
    assert reference_lesions(empty(), empty(), np.ones((20, 20, 20)), (1.0, 1.0, 1.0)) == []


def test_a_lesion_on_the_cord_rim_is_measured_against_the_cord_not_the_csf() -> None:
    """A lesion at +30% of the cord (130 in a cord of 100) in a corner of the cord, CSF (300) on two sides: against
    its shell, mostly CSF, it looks darker than its surroundings; against the cord it is +30%. Without a cord
    mask: NaN."""
    image = np.full((30, 30, 30), 10.0)
    cord = empty((30, 30, 30))
    cord[8:18, 8:18, :] = 1
    image[cord > 0] = 100.0
    image[18:24, 8:24, :] = 300.0  # CSF on two sides of the cord
    image[8:24, 18:24, :] = 300.0
    ref = empty((30, 30, 30))
    ref[16:18, 16:18, 12:15] = 1  # in the cord's corner, touching the CSF
    image[ref > 0] = 130.0
    (row,) = reference_lesions(empty((30, 30, 30)), ref, image, (1.0, 1.0, 1.0), cord=cord)
    assert row["cord_contrast"] == pytest.approx(0.3)
    assert row["shell_contrast"] == pytest.approx(130 / 300 - 1)
    (plain,) = reference_lesions(empty((30, 30, 30)), ref, image, (1.0, 1.0, 1.0))
    assert math.isnan(plain["cord_contrast"])
    outside = empty((30, 30, 30))
    outside[1:3, 1:3, 1:3] = 1  # no cord within reach
    (far,) = reference_lesions(empty((30, 30, 30)), outside, image, (1.0, 1.0, 1.0), cord=cord)
    assert math.isnan(far["cord_contrast"])
    with pytest.raises(InputImageError, match="cord mask shape"):
        reference_lesions(empty((30, 30, 30)), ref, image, (1.0, 1.0, 1.0), cord=cord[:-1])
