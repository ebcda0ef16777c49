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

import numpy as np

from sct_sitehead.atomic import write_atomic, write_text_atomic
from sct_sitehead.deploy.masks import LESION, MaskRule, threshold_mask
from sct_sitehead.deploy.results import Segmentation
from sct_sitehead.errors import UsageError
from sct_sitehead.evaluation import metrics
from sct_sitehead.evaluation.bids import load_spatial_image, read_bids
from sct_sitehead.evaluation.metrics import (
    Rule,
    detection_scores,
    dice,
    evaluate_case,
    lesion_detection,
    mean_by_person,
    pooled_detection_by_person,
)
from sct_sitehead.evaluation.splits import describe_splits, load_splits

logger = logging.getLogger(__name__)

#: Columns of the summary tables, with their headings (see :func:`summarize_cases` for what each is over).
SUMMARY_METRICS = {
    "dice": "Dice (lesion cases)",
    "f1_any": "F1 (any voxel)",
    "f1_10pct": "F1 (10%)",
    "sensitivity_any": "sensitivity",
    "precision_any": "precision",
    "avd_mm3": "AVD mm³ (lesion cases)",
    "false_lesions": "false lesions per lesion-free case",
    "false_volume_mm3": "false mm³ per lesion-free case",
}


@dataclass(frozen=True)
class Case:
    """One labelled test image; ``person`` is the human its anatomy comes from (what intervals resample)."""

    subject: str
    site: str
    image: Path
    reference: Path
    person: str = ""
    contrast: str = ""


def read_split(dataset: Path) -> dict[str, str]:
    """``participant_id -> split`` from ``participants.tsv`` (every subject ``test`` when there is no column)."""
    table = dataset / "participants.tsv"
    with table.open(newline="", encoding="utf-8") as handle:
        rows = list(csv.DictReader(handle, delimiter="\t"))
    return {row["participant_id"]: row.get("split") or "test" for row in rows}


def case_persons(dataset: Path) -> dict[str, str]:
    """``participant_id -> person`` of a dataset: its ``participants.tsv``'s ``person`` column (real data, the
    insertion panel), else the person of each simulated subject's ``source`` anatomy (:mod:`.splits`), else
    each participant is its own person."""
    splits = load_splits()
    out = {}
    for participant, row in read_participants(dataset).items():
        if row.get("person"):
            out[participant] = row["person"]
        elif row.get("source"):
            out[participant] = splits.person_of_source(row["source"])
        else:
            out[participant] = participant
    return out


def find_cases(dataset: Path, split: str = "test", sites: list[str] | None = None) -> list[Case]:
    """Labelled cases of one split, read with the BIDS reader (problems are logged by it)."""
    splits = read_split(dataset)
    persons = case_persons(dataset)
    samples, problems = read_bids(dataset)
    for problem in problems:
        logger.warning("%s", problem)
    cases = [
        Case(
            sample.subject,
            sample.site,
            sample.image,
            sample.labels["lesion"],
            persons.get(sample.subject, sample.subject),
            sample.contrast,
        )
        for sample in samples
        if "lesion" in sample.labels and splits.get(sample.subject) == split and (sites is None or sample.site in sites)
    ]
    if not cases:
        raise UsageError(f"no labelled {split!r} cases in {dataset}; check participants.tsv and derivatives/labels")
    return cases


def score_case(prediction, reference, zooms) -> dict[str, float]:
    """Both detection rules of one case, flattened into one row."""
    row: dict[str, float] = {}
    rules: tuple[tuple[Rule, str], ...] = (("any", "any"), ("10pct", "10pct"))
    for rule, tag in rules:
        result = evaluate_case(prediction, reference, zooms, rule=rule)
        for key, value in result.items():
            if key in ("dice", "volume_pred_mm3", "volume_ref_mm3", "avd_mm3"):
                row[key] = float(value)
            else:
                row[f"{key}_{tag}"] = float(value)
    return row


def lesion_mask(segmentation: Segmentation, head: str) -> np.ndarray:
    """``head``'s lesion mask on the whole input grid, (X, Y, Z) bool: what ``sct_deepseg_lesion`` writes."""
    return segmentation[head].labels[LESION].full(segmentation.image.shape).astype(bool)


def lesion_index(segmenter, head: str) -> int:
    """Position of the ``lesion`` label among ``head``'s outputs (as :meth:`Segmenter.predict` returns them)."""
    return [label.name for label in segmenter.heads[head].labels].index("lesion")


def evaluate_release(segmenter, cases: list[Case]) -> list[dict[str, Any]]:
    """One row per (case, head): the case's site, subject, head and every metric."""
    from nibabel.affines import voxel_sizes

    rows: list[dict[str, Any]] = []
    for number, case in enumerate(cases, 1):
        # The very masks sct_deepseg_lesion writes for this image (Segmenter.segment, then .write).
        segmentation = segmenter.segment(case.image)
        image = segmentation.image
        reference = np.asanyarray(load_spatial_image(case.reference).dataobj) > 0
        zooms = voxel_sizes(image.affine)
        for head in segmenter.sites:
            prediction = lesion_mask(segmentation, head)
            rows.append(
                {
                    "site": case.site,
                    "subject": case.subject,
                    "person": case.person or case.subject,
                    "contrast": case.contrast,
                    "head": head,
                    **score_case(prediction, reference, zooms),
                }
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

    Returns:
        ``{head: {"threshold", "dice" (mean at that threshold, every lesion kept; NaN without a lesion-bearing
        case), "dice_at_0.5", "cases" (lesion-bearing: those Dice is over), "lesion_free_cases", "loo_dice"
        (leave-one-out mean at the tuned thresholds; None with one case), "holds" (whether the pick beats 0.5
        leave-one-out; None with one case), "min_lesion_mm3", "f1" (pooled, with it), "f1_all_lesions" (pooled,
        every lesion kept)}}`` for every head with at least one case. A head without a lesion-bearing case keeps
        the threshold closest to 0.5.
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
        best = half if (leave_one_out and not holds) or not per_case else best_threshold(mean[:, 0])
        allowed = [j for j in range(len(volumes)) if not per_case or mean[best, j] >= mean[best, 0] - DICE_TOLERANCE]
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
        }
    return tuned


def pooled_detection(rows: list[dict[str, Any]], tag: str) -> float:
    """Lesion-wise F1 over all lesions of the rows (counts summed, not per-case means; NaN when the rows hold no
    reference and no predicted lesion)."""
    return metrics.pooled_detection(rows, f"_{tag}")["f1"]


def person_of(row: dict[str, Any]) -> str:
    """The person a row's case comes from (its subject when the row does not say)."""
    return str(row.get("person") or row["subject"])


def is_lesion_free(row: dict[str, Any]) -> bool:
    """Whether the row's reference has no lesion (its case is scored by false lesions, not by Dice); a row that
    does not give the reference's volume counts as lesion-bearing."""
    return float(row.get("volume_ref_mm3", math.nan)) == 0


def summarize_cases(rows: list[dict[str, Any]], *, seed: int = 0) -> dict[str, Any]:
    """Every summary metric of a group of case rows, with 95% intervals that resample persons.

    Dice and AVD are means over the lesion-bearing cases; sensitivity, precision and F1 come from lesion counts
    pooled over every case (a lesion-free case adds its false lesions); false lesions and false volume are
    means over the lesion-free cases. ``persons_lesion``, ``persons`` and ``persons_free`` count the persons each
    kind of interval rests on (an interval needs two: NaN with fewer).

    Args:
        rows: case rows of :func:`evaluate_release` (``volume_ref_mm3``, ``dice``, ``avd_mm3``,
            ``false_lesions``, ``false_volume_mm3``, ``n_ref_any``, ``n_pred_any``, ``tp_any``, ``fp_any`` and
            the same ``_10pct``; ``person`` when known).

    Returns:
        ``n``, ``lesion_cases``, ``free_cases``, ``free_cases_flagged`` (lesion-free cases with a false lesion),
        the three person counts, and for each key of :data:`SUMMARY_METRICS` its mean, ``_low`` and ``_high``.
    """
    persons = [person_of(row) for row in rows]
    lesion = [k for k, row in enumerate(rows) if not is_lesion_free(row)]
    free = [k for k, row in enumerate(rows) if is_lesion_free(row)]
    stats: dict[str, dict[str, float]] = {}
    for key in ("dice", "avd_mm3"):
        stats[key] = mean_by_person([rows[k][key] for k in lesion], [persons[k] for k in lesion], seed=seed)
    for key, fallback in (("false_lesions", "n_pred_any"), ("false_volume_mm3", "volume_pred_mm3")):
        # Rows scored before these columns existed (an older cases.tsv) hold the same numbers under other names.
        values = [float(rows[k].get(key, rows[k].get(fallback, math.nan))) for k in free]
        stats[key] = mean_by_person(values, [persons[k] for k in free], seed=seed)
    for tag in ("any", "10pct"):
        for name, found in pooled_detection_by_person(rows, persons, f"_{tag}", seed=seed).items():
            stats[f"{name}_{tag}"] = found
    entry: dict[str, Any] = {
        "n": len(rows),
        "lesion_cases": len(lesion),
        "free_cases": len(free),
        "free_cases_flagged": sum(float(rows[k].get("false_lesions", rows[k].get("n_pred_any", 0))) > 0 for k in free),
        "persons_lesion": len({persons[k] for k in lesion}),
        "persons": len(set(persons)),
        "persons_free": len({persons[k] for k in free}),
    }
    for key in SUMMARY_METRICS:
        entry[key] = stats[key]["mean"]
        entry[f"{key}_low"], entry[f"{key}_high"] = stats[key]["low"], stats[key]["high"]
    return entry


#: The ``contrast`` of a summary entry over every contrast.
ALL_CONTRASTS = "all"


def summarize_rows(rows: list[dict[str, Any]], *, seed: int = 0) -> list[dict[str, Any]]:
    """:func:`summarize_cases` per (site, head), then pooled over sites per contrast and over everything (where
    each site's own head is pooled as ``own``).

    Returns:
        One entry per group: ``site`` (a site or ``pooled``), ``head``, ``contrast`` (a contrast, or ``all``),
        then the keys of :func:`summarize_cases`.
    """
    groups: dict[tuple[str, str, str], list[dict[str, Any]]] = defaultdict(list)
    for row in rows:
        head = "own" if row["head"] == row["site"] else row["head"]
        groups[(row["site"], row["head"], ALL_CONTRASTS)].append(row)
        groups[("pooled", head, ALL_CONTRASTS)].append(row)
        if row.get("contrast"):
            groups[("pooled", head, str(row["contrast"]))].append(row)
    return [
        {"site": site, "head": head, "contrast": contrast, **summarize_cases(members, seed=seed)}
        for (site, head, contrast), members in sorted(groups.items())
    ]


def write_csv(rows: list[dict[str, Any]], path: Path) -> Path:
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


def interval_cell(entry: dict[str, Any], key: str, digits: int = 3) -> str:
    """``mean [low, high]``; the mean alone when the interval is undefined (fewer than two persons), ``n/a``
    when the mean is."""
    mean, low, high = (float(entry.get(k, math.nan)) for k in (key, f"{key}_low", f"{key}_high"))
    if math.isnan(mean):
        return "n/a"
    if math.isnan(low):
        return f"{mean:.{digits}f}"
    return f"{mean:.{digits}f} [{low:.{digits}f}, {high:.{digits}f}]"


def markdown_table(summary: list[dict[str, Any]], heads: list[str] | None = None) -> str:
    """Per group (site or pooled, head, contrast): cases, the persons the intervals rest on, and mean [95% CI]
    of each metric (an interval resamples persons; the mean alone where fewer than two persons)."""
    selected = [e for e in summary if heads is None or e["head"] in heads]
    header = (
        "| site | head | contrast | cases (lesion / lesion-free) | persons (lesion / all / lesion-free) | "
        + " | ".join(SUMMARY_METRICS.values())
        + " | lesion-free cases with a false lesion |"
    )
    lines = [header, "|" + "---|" * (6 + len(SUMMARY_METRICS))]
    for entry in selected:
        cells = [interval_cell(entry, k, 1 if k.endswith("mm3") else 3) for k in SUMMARY_METRICS]
        lines.append(
            f"| {entry['site']} | {entry['head']} | {entry['contrast']} | "
            f"{entry['lesion_cases']} / {entry['free_cases']} | "
            f"{entry['persons_lesion']} / {entry['persons']} / {entry['persons_free']} | "
            + " | ".join(cells)
            + f" | {entry['free_cases_flagged']} of {entry['free_cases']} |"
        )
    return "\n".join(lines) + "\n"


def own_head_rows(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The rows where a site's data went through its own head or the universal one."""
    return [row for row in rows if row["head"] in (row["site"], "universal")]


def plot_dice(summary: list[dict[str, Any]], path: Path) -> Path:
    """Bar chart of Dice per site: universal head vs the site's own head, with 95% intervals (PNG)."""
    from PIL import Image, ImageDraw

    sites = sorted({e["site"] for e in summary if e["site"] != "pooled"})
    lookup = {(e["site"], e["head"]): e for e in summary if e.get("contrast", ALL_CONTRASTS) == ALL_CONTRASTS}
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
            if not math.isnan(entry["dice_low"]):  # no interval from fewer than two persons
                draw.line(
                    [(left + 17, y(entry["dice_low"])), (left + 17, y(entry["dice_high"]))], fill="black", width=2
                )
        draw.text((x0, bottom + 8), site, fill="black")
    draw.text(
        (margin, 12),
        "lesion Dice (lesion cases) per site: grey universal, red own head (95% CI by person, from 2 or more)",
        fill="black",
    )
    write_atomic(path, lambda tmp: picture.save(tmp, format="PNG"))
    return path


def check_controls(segmenter, images: list[Path]) -> list[dict[str, Any]]:
    """Lesions predicted by every head on images of healthy controls (the right answer is none)."""
    rows = []
    for path in images:
        segmentation = segmenter.segment(path)
        for head in segmenter.sites:
            stats = segmentation[head].lesions
            rows.append(
                {
                    "image": path.name,
                    "head": head,
                    "lesions": int(stats["count"]),
                    "volume_mm3": float(stats["total_volume_mm3"]),
                }
            )
    return rows


#: Pathologies of ``participants.tsv`` whose images hold no cord lesion: healthy, or a disc pressing on the cord
#: from outside (``MildCompression``, no intramedullary lesion; see the data's participants.json).
CONTROL_PATHOLOGIES = ("HC", "MildCompression")


def read_participants(bids: Path) -> dict[str, dict[str, str]]:
    """``participant_id -> row`` of a dataset's ``participants.tsv``."""
    with (bids / "participants.tsv").open(newline="", encoding="utf-8") as handle:
        return {row["participant_id"]: row for row in csv.DictReader(handle, delimiter="\t")}


def healthy_controls(bids: Path) -> list[Path]:
    """Images of every participant whose ``pathology`` in ``participants.tsv`` is one of
    :data:`CONTROL_PATHOLOGIES` (the right answer on each is no lesion)."""
    wanted = {p.upper() for p in CONTROL_PATHOLOGIES}
    controls = {sub for sub, row in read_participants(bids).items() if row.get("pathology", "").upper() in wanted}
    return sorted(p for p in bids.glob("sub-*/**/anat/*.nii*") if p.parts[len(bids.parts)] in controls)


def describe_controls(rows: list[dict[str, Any]], bids: Path) -> list[dict[str, Any]]:
    """The rows of :func:`check_controls` with each image's participant, person, pathology and split (of the
    frozen split, :mod:`sct_sitehead.evaluation.splits`; ``unassigned`` for a participant it lacks)."""
    participants = read_participants(bids)
    splits = load_splits()
    out = []
    for row in rows:
        subject = str(row["image"]).split("_")[0]
        found = participants.get(subject, {})
        person = found.get("person") or splits.person_of(subject) or subject
        split = splits.split_of(subject) or "unassigned"
        out.append(
            {**row, "subject": subject, "person": person, "pathology": found.get("pathology", ""), "split": split}
        )
    return out


#: Which control images each summary of :func:`summarize_controls` counts.
CONTROL_SCOPES = {"test": "held-out (test) persons", "all": "every healthy image (training anatomy included)"}


def summarize_controls(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per head and scope (:data:`CONTROL_SCOPES`): images, persons, runs with a false lesion, false lesions
    and false volume per scan (every lesion on a control is false).

    Args:
        rows: rows of :func:`describe_controls` (``image``, ``head``, ``lesions``, ``volume_mm3``, ``person``,
            ``split``).
    """
    summary = []
    for scope in CONTROL_SCOPES:
        for head in sorted({row["head"] for row in rows}):
            members = [r for r in rows if r["head"] == head and (scope == "all" or r.get("split") == scope)]
            if not members:
                continue
            summary.append(
                {
                    "scope": scope,
                    "head": head,
                    "images": len(members),
                    "persons": len({r.get("person", r["image"]) for r in members}),
                    "runs_flagged": sum(int(r["lesions"]) > 0 for r in members),
                    "false_lesions_per_scan": sum(float(r["lesions"]) for r in members) / len(members),
                    "false_volume_mm3_per_scan": sum(float(r["volume_mm3"]) for r in members) / len(members),
                }
            )
    return summary


def controls_markdown(summary: list[dict[str, Any]]) -> str:
    """One table per scope: per head, runs with a false lesion, false lesions and false mm³ per scan."""
    parts = []
    for scope, title in CONTROL_SCOPES.items():
        entries = [e for e in summary if e["scope"] == scope]
        if not entries:
            continue
        first = entries[0]
        parts.append(
            f"\nHealthy controls, {title}: {first['images']} images of {first['persons']} persons, whole field "
            "of view, every head.\n\n| head | runs with a false lesion | false lesions per scan | false mm³ per scan |"
            "\n|---|---|---|---|\n"
            + "".join(
                f"| {e['head']} | {e['runs_flagged']} of {e['images']} | {e['false_lesions_per_scan']:.2f} | "
                f"{e['false_volume_mm3_per_scan']:.1f} |\n"
                for e in entries
            )
        )
    return "".join(parts)


#: What the tables measure, said at the top of every evaluation report.
METRICS_NOTE = (
    "Dice and AVD: lesion-bearing cases only (a lesion-free case has no Dice). Sensitivity, precision and F1: "
    "lesion counts pooled over every case (SCT's rules: any voxel, 10% overlap), so a lesion-free case adds its "
    "false lesions. False lesions and mm³: per lesion-free case. 95% intervals resample persons (the human whose "
    "anatomy a case was made from), not cases; persons (lesion / all / lesion-free) say how many each interval "
    "rests on, and with fewer than two the mean stands alone.\n"
)


def persons_markdown(rows: list[dict[str, Any]]) -> str:
    """Which persons the evaluated cases come from: per person, its frozen split, cases, lesion-free cases and
    contrasts (one row per case and head in, each case counted once)."""
    splits = load_splits()
    cases: dict[str, dict[str, set[str]]] = defaultdict(lambda: defaultdict(set))
    for row in rows:
        found = cases[person_of(row)]
        found["cases"].add(row["subject"])
        found["contrasts"].add(str(row.get("contrast") or "?"))
        if is_lesion_free(row):
            found["free"].add(row["subject"])
    lines = ["| person | frozen split | cases | lesion-free | contrasts |", "|---|---|---|---|---|"]
    for person, found in sorted(cases.items()):
        known = {p.name: p.split for p in splits.persons}
        lines.append(
            f"| {person} | {known.get(person, 'not in splits.json')} | {len(found['cases'])} | "
            f"{len(found['free'])} | {', '.join(sorted(found['contrasts']))} |"
        )
    return "\n".join(lines) + "\n"


def write_report(
    out: Path, title: str, rows: list[dict[str, Any]], control_rows: list[dict[str, Any]] | None = None
) -> list[str]:
    """Write an evaluation's tables (``cases.tsv``, ``summary.tsv`` own heads and ``universal``,
    ``summary_all_heads.tsv``, ``controls.tsv``), ``dice.png`` and ``report.md``; return the report's parts.

    Args:
        out: the report folder (created).
        title: the report's first line.
        rows: case rows of :func:`evaluate_release`.
        control_rows: rows of :func:`describe_controls`, or None without controls.
    """
    out.mkdir(parents=True, exist_ok=True)
    summary = summarize_rows(own_head_rows(rows))
    write_csv(rows, out / "cases.tsv")
    write_csv(summarize_rows(rows), out / "summary_all_heads.tsv")
    write_csv(summary, out / "summary.tsv")
    plot_dice(summary, out / "dice.png")
    report = [title, METRICS_NOTE, markdown_table(summary), "\nCases by person:\n\n" + persons_markdown(rows)]
    if control_rows is not None:
        write_csv(control_rows, out / "controls.tsv")
        report.append(controls_markdown(summarize_controls(control_rows)))
    report.append(
        "\nThe frozen split of the real data by person (`sct_sitehead/evaluation/splits.json`):\n\n"
        + describe_splits(load_splits())
    )
    write_text_atomic("\n".join(report), out / "report.md")
    return report
