"""Per-site evaluation of a published release, through the deploy path itself (ONNX Runtime, no torch).

Every head of the release is applied to every test case (the backbone runs once per patch), so one pass gives
both each site's own head and the cross-site matrix (site data x head). Metrics follow SCT's definitions
(:mod:`sct_sitehead.evaluation.metrics`); tables are written as CSV and Markdown, and a plot as PNG.
"""

from __future__ import annotations

import csv
import logging
import math
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sct_sitehead.errors import UsageError

logger = logging.getLogger(__name__)

#: Columns of the summary tables, with their headings.
SUMMARY_METRICS = {
    "dice": "Dice",
    "f1_any": "F1 (any voxel)",
    "f1_10pct": "F1 (10%)",
    "sensitivity_any": "sensitivity",
    "precision_any": "precision",
    "avd_mm3": "AVD mm³",
}


@dataclass(frozen=True)
class Case:
    """One labelled test image."""

    subject: str
    site: str
    image: Path
    reference: Path


def read_split(dataset: Path) -> dict[str, str]:
    """``participant_id -> split`` from ``participants.tsv`` (every subject ``test`` when there is no column)."""
    table = dataset / "participants.tsv"
    with table.open(newline="", encoding="utf-8") as handle:
        rows = list(csv.DictReader(handle, delimiter="\t"))
    return {row["participant_id"]: row.get("split") or "test" for row in rows}


def find_cases(dataset: Path, split: str = "test", sites: list[str] | None = None) -> list[Case]:
    """Labelled cases of one split, read with the BIDS reader (problems are logged by it)."""
    from sct_sitehead.evaluation.bids import read_bids

    splits = read_split(dataset)
    samples, problems = read_bids(dataset)
    for problem in problems:
        logger.warning("%s", problem)
    cases = [
        Case(sample.subject, sample.site, sample.image, sample.labels["lesion"])
        for sample in samples
        if "lesion" in sample.labels and splits.get(sample.subject) == split and (sites is None or sample.site in sites)
    ]
    if not cases:
        raise UsageError(f"no labelled {split!r} cases in {dataset}; check participants.tsv and derivatives/labels")
    return cases


def score_case(prediction, reference, zooms) -> dict[str, float]:
    """Both detection rules of one case, flattened into one row."""
    from sct_sitehead.evaluation.metrics import evaluate_case

    row: dict[str, float] = {}
    for rule, tag in (("any", "any"), ("10pct", "10pct")):
        result = evaluate_case(prediction, reference, zooms, rule=rule)
        for key, value in result.items():
            if key in ("dice", "volume_pred_mm3", "volume_ref_mm3", "avd_mm3"):
                row[key] = float(value)
            else:
                row[f"{key}_{tag}"] = float(value)
    return row


def lesion_index(segmenter, head: str) -> int:
    """Position of the ``lesion`` label among ``head``'s outputs (as :meth:`Segmenter.predict` returns them)."""
    return [label.name for label in segmenter.heads[head].labels].index("lesion")


def evaluate_release(segmenter, cases: list[Case]) -> list[dict[str, Any]]:
    """One row per (case, head): the case's site, subject, head and every metric."""
    import nibabel as nib
    import numpy as np
    from nibabel.affines import voxel_sizes

    rows: list[dict[str, Any]] = []
    for number, case in enumerate(cases, 1):
        image, probabilities = segmenter.predict(case.image)
        reference = np.asanyarray(nib.load(case.reference).dataobj) > 0
        zooms = voxel_sizes(image.affine)
        for head in segmenter.sites:
            lesion = lesion_index(segmenter, head)
            prediction = segmenter.lesion_mask(head, probabilities[head][lesion], zooms)
            rows.append(
                {"site": case.site, "subject": case.subject, "head": head, **score_case(prediction, reference, zooms)}
            )
        logger.info("%d/%d %s (%s)", number, len(cases), case.subject, case.site)
    return rows


#: Thresholds tried by :func:`tune_thresholds`.
THRESHOLDS = tuple(round(0.05 * k, 2) for k in range(2, 19))
#: Smallest lesions (mm³) tried by :func:`tune_thresholds`; the simulated lesions are 8 mm³ and larger.
MIN_LESIONS_MM3 = (0.0, 3.0, 6.0, 10.0, 15.0, 20.0)
#: How much mean Dice a smallest-lesion setting may cost for its lesion-wise F1 gain.
DICE_TOLERANCE = 0.005


def tune_thresholds(
    segmenter,
    cases: list[Case],
    thresholds=THRESHOLDS,
    min_lesions_mm3=MIN_LESIONS_MM3,
    *,
    leave_one_out: bool = False,
) -> dict[str, dict[str, Any]]:
    """Each head's probability threshold with the best mean lesion Dice on its own site's cases, then the
    smallest lesion volume kept with the best pooled lesion-wise F1 (any-voxel rule) at that threshold, among
    the settings whose mean Dice is within ``DICE_TOLERANCE`` of the best.

    Meant for the validation split (never the test split): a site's head is tuned on that site's cases, the
    ``universal`` head on every case. Ties go to the threshold closest to 0.5 and to the smallest volume.

    A site has few validation cases (7 per site in the release), and a threshold picked on so few may fit them
    and nothing else. So the pick is checked leave-one-out: each case is scored at the threshold that is best on
    the head's other cases; the pick holds when that mean Dice beats 0.5's on the same cases. With
    ``leave_one_out``, a head whose pick does not hold (or that has a single case) gets the threshold closest to
    0.5; without it (the default, what the shipped release was tuned with) the check is only reported.

    Returns:
        ``{head: {"threshold", "dice" (mean at that threshold, every lesion kept), "dice_at_0.5", "cases",
        "loo_dice" (leave-one-out mean at the tuned thresholds; None with one case), "holds" (whether the pick
        beats 0.5 leave-one-out; None with one case), "min_lesion_mm3", "f1" (pooled, with it), "f1_all_lesions"
        (pooled, every lesion kept)}}`` for every head with at least one case.
    """
    import nibabel as nib
    import numpy as np
    from nibabel.affines import voxel_sizes

    from sct_sitehead.deploy.lesions import drop_small_lesions
    from sct_sitehead.evaluation.metrics import dice, lesion_detection

    thresholds = tuple(float(t) for t in thresholds)
    volumes = tuple(float(v) for v in min_lesions_mm3)
    shape = (len(thresholds), len(volumes))
    dices: dict[str, list[np.ndarray]] = defaultdict(list)  # per case, Dice per (threshold, smallest lesion)
    # tp, fp, fn summed over cases, per (threshold, smallest lesion)
    detections: dict[str, np.ndarray] = defaultdict(lambda: np.zeros((*shape, 3)))
    for number, case in enumerate(cases, 1):
        image, probabilities = segmenter.predict(case.image)
        zooms = tuple(voxel_sizes(image.affine))
        reference = np.asanyarray(nib.load(case.reference).dataobj) > 0
        for head in segmenter.sites:
            if head not in ("universal", case.site):
                continue
            values = probabilities[head][lesion_index(segmenter, head)]
            case_dice = np.zeros(shape)
            for i, t in enumerate(thresholds):
                above = values >= t
                for j, volume in enumerate(volumes):
                    mask = drop_small_lesions(above.copy(), zooms, volume)
                    case_dice[i, j] = dice(mask, reference)
                    found = lesion_detection(mask, reference, rule="any")
                    detections[head][i, j] += (found["tp"], found["fp"], found["fn"])
            dices[head].append(case_dice)
        logger.info("%d/%d %s (%s)", number, len(cases), case.subject, case.site)
    half = min(range(len(thresholds)), key=lambda k: abs(thresholds[k] - 0.5))

    def best_threshold(mean_dice: np.ndarray) -> int:
        return max(range(len(thresholds)), key=lambda k: (round(float(mean_dice[k]), 6), -abs(thresholds[k] - 0.5)))

    tuned = {}
    for head, per_case in dices.items():
        stacked = np.stack(per_case)  # (cases, thresholds, smallest lesions)
        mean = stacked.mean(axis=0)
        per_case_dice = stacked[:, :, 0]  # every lesion kept
        tp, fp, fn = np.moveaxis(detections[head], -1, 0)
        f1 = np.where(tp + fp + fn > 0, 2 * tp / np.maximum(2 * tp + fp + fn, 1), 1.0)
        n = len(per_case)
        held_out = (
            [per_case_dice[k, best_threshold(np.delete(per_case_dice, k, axis=0).mean(axis=0))] for k in range(n)]
            if n > 1
            else []
        )
        loo_dice = float(np.mean(held_out)) if held_out else None
        holds = None if loo_dice is None else round(loo_dice, 6) > round(float(per_case_dice[:, half].mean()), 6)
        best = half if leave_one_out and not holds else best_threshold(mean[:, 0])
        allowed = [j for j in range(len(volumes)) if mean[best, j] >= mean[best, 0] - DICE_TOLERANCE]
        smallest = max(allowed, key=lambda j: (round(float(f1[best, j]), 6), -volumes[j]))
        tuned[head] = {
            "threshold": thresholds[best],
            "dice": float(mean[best, 0]),
            "dice_at_0.5": float(mean[half, 0]),
            "cases": n,
            "loo_dice": loo_dice,
            "holds": holds,
            "min_lesion_mm3": volumes[smallest],
            "f1": float(f1[best, smallest]),
            "f1_all_lesions": float(f1[best, 0]),
        }
    return tuned


def pooled_detection(rows: list[dict[str, Any]], tag: str) -> float:
    """Lesion-wise F1 over all lesions of the rows (counts summed, not per-case means)."""
    tp = sum(row[f"tp_{tag}"] for row in rows)
    fp = sum(row[f"fp_{tag}"] for row in rows)
    fn = sum(row[f"fn_{tag}"] for row in rows)
    return 1.0 if tp + fp + fn == 0 else 2 * tp / (2 * tp + fp + fn)


def summarize_rows(rows: list[dict[str, Any]], *, seed: int = 0) -> list[dict[str, Any]]:
    """Mean and bootstrap 95% interval of each metric per (site, head), plus pooled over sites (where each
    site's own head is pooled as ``own``)."""
    from sct_sitehead.evaluation.metrics import summarize

    groups: dict[tuple[str, str], list[dict[str, Any]]] = defaultdict(list)
    for row in rows:
        groups[(row["site"], row["head"])].append(row)
        groups[("pooled", "own" if row["head"] == row["site"] else row["head"])].append(row)
    summary = []
    for (site, head), members in sorted(groups.items()):
        stats = summarize(members, seed=seed)
        entry: dict[str, Any] = {"site": site, "head": head, "n": len(members)}
        for key in SUMMARY_METRICS:
            entry[key] = stats[key]["mean"]
            entry[f"{key}_low"], entry[f"{key}_high"] = stats[key]["low"], stats[key]["high"]
        entry["f1_pooled_any"] = pooled_detection(members, "any")
        entry["f1_pooled_10pct"] = pooled_detection(members, "10pct")
        summary.append(entry)
    return summary


def write_csv(rows: list[dict[str, Any]], path: Path) -> Path:
    from sct_sitehead.deploy.pipeline import write_text_atomic

    if not rows:
        raise UsageError(f"nothing to write to {path}")
    columns = list(rows[0])
    lines = ["\t".join(columns)]
    lines += ["\t".join(_cell(row.get(c)) for c in columns) for row in rows]
    write_text_atomic("\n".join(lines) + "\n", path)
    return path


def _cell(value: Any) -> str:
    if isinstance(value, float):
        return "nan" if math.isnan(value) else f"{value:.4f}"
    return str(value)


def markdown_table(summary: list[dict[str, Any]], heads: list[str] | None = None) -> str:
    """Own head vs universal per site: mean [95% CI] of each metric."""
    selected = [e for e in summary if heads is None or e["head"] in heads]
    header = "| site | head | n | " + " | ".join(SUMMARY_METRICS.values()) + " | F1 pooled (any) |"
    lines = [header, "|" + "---|" * (4 + len(SUMMARY_METRICS))]
    for entry in selected:
        cells = [
            f"{entry[k]:.3f} [{entry[k + '_low']:.3f}, {entry[k + '_high']:.3f}]"
            if k != "avd_mm3"
            else f"{entry[k]:.1f}"
            for k in SUMMARY_METRICS
        ]
        lines.append(
            f"| {entry['site']} | {entry['head']} | {entry['n']} | "
            + " | ".join(cells)
            + f" | {entry['f1_pooled_any']:.3f} |"
        )
    return "\n".join(lines) + "\n"


def own_head_rows(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The rows where a site's data went through its own head or the universal one."""
    return [row for row in rows if row["head"] in (row["site"], "universal")]


def plot_dice(summary: list[dict[str, Any]], path: Path) -> Path:
    """Bar chart of Dice per site: universal head vs the site's own head, with 95% intervals (PNG)."""
    from PIL import Image, ImageDraw

    sites = sorted({e["site"] for e in summary if e["site"] != "pooled"})
    lookup = {(e["site"], e["head"]): e for e in summary}
    width, height, margin = 120 + 110 * len(sites), 360, 50
    picture = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(picture)
    top, bottom = margin, height - margin

    def y(value: float) -> float:
        return bottom - (bottom - top) * max(0.0, min(1.0, value))

    for tick in (0.0, 0.25, 0.5, 0.75, 1.0):
        draw.line([(margin, y(tick)), (width - 10, y(tick))], fill=(225, 225, 225))
        draw.text((8, y(tick) - 6), f"{tick:.2f}", fill="black")
    colours = {"universal": (150, 150, 150), "own": (200, 40, 40)}
    for index, site in enumerate(sites):
        x0 = margin + 20 + index * 110
        for offset, (key, head) in enumerate((("universal", "universal"), ("own", site))):
            entry = lookup.get((site, head))
            if entry is None or math.isnan(entry["dice"]):
                continue
            left = x0 + offset * 40
            draw.rectangle([left, y(entry["dice"]), left + 34, bottom], fill=colours[key])
            draw.line([(left + 17, y(entry["dice_low"])), (left + 17, y(entry["dice_high"]))], fill="black", width=2)
        draw.text((x0, bottom + 8), site, fill="black")
    draw.text((margin, 12), "lesion Dice per site: grey universal head, red the site's own head (95% CI)", fill="black")
    from sct_sitehead.deploy.outputs import write_atomic

    write_atomic(path, lambda tmp: picture.save(tmp, format="PNG"))
    return path


def check_controls(segmenter, images: list[Path]) -> list[dict[str, Any]]:
    """Lesions predicted by every head on images of healthy controls (the right answer is none)."""
    from nibabel.affines import voxel_sizes

    from sct_sitehead.deploy.lesions import lesion_stats

    rows = []
    for path in images:
        image, probabilities = segmenter.predict(path)
        zooms = tuple(voxel_sizes(image.affine))
        for head in segmenter.sites:
            lesion = lesion_index(segmenter, head)
            stats = lesion_stats(segmenter.lesion_mask(head, probabilities[head][lesion], zooms), zooms)
            rows.append(
                {
                    "image": path.name,
                    "head": head,
                    "lesions": int(stats["count"]),
                    "volume_mm3": float(stats["total_volume_mm3"]),
                }
            )
    return rows


def healthy_controls(bids: Path) -> list[Path]:
    """Images of every participant whose ``pathology`` is ``HC`` in ``participants.tsv``."""
    with (bids / "participants.tsv").open(newline="", encoding="utf-8") as handle:
        controls = {
            row["participant_id"]
            for row in csv.DictReader(handle, delimiter="\t")
            if row.get("pathology", "").upper() == "HC"
        }
    return sorted(p for p in bids.glob("sub-*/**/anat/*.nii*") if p.parts[len(bids.parts)] in controls)
