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

from sct_sitehead.deploy.masks import LESION
from sct_sitehead.deploy.results import Segmentation
from sct_sitehead.errors import UsageError
from sct_sitehead.evaluation import metrics
from sct_sitehead.evaluation.bids import load_spatial_image, read_bids
from sct_sitehead.evaluation.metrics import (
    Rule,
    evaluate_case,
    mean_by_person,
    pooled_detection_by_person,
)
from sct_sitehead.evaluation.splits import load_splits

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


def read_participants(bids: Path) -> dict[str, dict[str, str]]:
    """``participant_id -> row`` of a dataset's ``participants.tsv``."""
    with (bids / "participants.tsv").open(newline="", encoding="utf-8") as handle:
        return {row["participant_id"]: row for row in csv.DictReader(handle, delimiter="\t")}


@dataclass(frozen=True)
class Case:
    """One labelled test image; ``person`` is the human its anatomy comes from (what intervals resample);
    ``cord`` its cord mask, when the dataset has one (what each lesion's contrast to the cord is measured on)."""

    subject: str
    site: str
    image: Path
    reference: Path
    person: str = ""
    contrast: str = ""
    cord: Path | None = None


#: Where a simulated dataset keeps its ground truth, with the whole cord of every subject (``*_cord-truth``).
TRUTH_DIR = Path("derivatives") / "truth"


def cord_mask_of(dataset: Path, sample: Any) -> Path | None:
    """The sample's cord mask: the simulator's whole-cord truth when there is one (a site's raters may trace
    less), else its ``cord`` label, else None."""
    truth = dataset / TRUTH_DIR / sample.image.parent.relative_to(dataset) / f"{sample.stem}_cord-truth.nii.gz"
    if truth.is_file():
        return truth
    cord = sample.labels.get("cord")
    return Path(cord) if cord else None


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
            cord_mask_of(dataset, sample),
        )
        for sample in samples
        if "lesion" in sample.labels and splits.get(sample.subject) == split and (sites is None or sample.site in sites)
    ]
    if not cases:
        raise UsageError(f"no labelled {split!r} cases in {dataset}; check participants.tsv and derivatives/labels")
    return cases


def score_case(prediction, reference, zooms) -> dict[str, float]:
    """Both detection rules of one case, flattened into one row (the keys that do not depend on the rule once,
    the detection counts once per rule)."""
    row: dict[str, float] = {}
    rules: tuple[tuple[Rule, str], ...] = (("any", "any"), ("10pct", "10pct"))
    for rule, tag in rules:
        result = evaluate_case(prediction, reference, zooms, rule=rule)
        for key, value in result.items():
            if key in ("dice", "volume_pred_mm3", "volume_ref_mm3", "avd_mm3", "false_lesions", "false_volume_mm3"):
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


def evaluate_release(segmenter, cases: list[Case]) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """Every head on every case.

    Returns:
        The case rows (one per case and head: the case's site, subject, person, contrast, head and every metric)
        and the lesion rows (one per reference lesion, case and head: the same keys and
        :func:`~sct_sitehead.evaluation.metrics.reference_lesions`' columns).
    """
    from nibabel.affines import voxel_sizes

    rows: list[dict[str, Any]] = []
    lesion_rows: list[dict[str, Any]] = []
    for number, case in enumerate(cases, 1):
        # The very masks sct_deepseg_lesion writes for this image (Segmenter.segment, then .write).
        segmentation = segmenter.segment(case.image)
        image = segmentation.image
        reference = np.asanyarray(load_spatial_image(case.reference).dataobj) > 0
        intensities = np.asanyarray(image.dataobj)
        zooms = voxel_sizes(image.affine)
        cord = np.asanyarray(load_spatial_image(case.cord).dataobj) > 0 if case.cord else None
        for head in segmenter.sites:
            prediction = lesion_mask(segmentation, head)
            keys = {
                "site": case.site,
                "subject": case.subject,
                "person": case.person or case.subject,
                "contrast": case.contrast,
                "head": head,
            }
            rows.append({**keys, **score_case(prediction, reference, zooms)})
            for lesion_number, lesion in enumerate(
                metrics.reference_lesions(prediction, reference, intensities, zooms, cord=cord), 1
            ):
                lesion_rows.append({**keys, "lesion": lesion_number, **lesion})
        logger.info("%d/%d %s (%s)", number, len(cases), case.subject, case.site)
    return rows, lesion_rows


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
