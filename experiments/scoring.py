"""Score the published models through the deploy path, then summarise each comparison.

Each model is fetched from the work registry and run by :class:`pipeline.Segmenter` (ONNX Runtime, no torch),
exactly as ``sct_deepseg_lesion`` runs it; every test case is scored against its site's own annotation with
:func:`evaluate.score_case` (Dice, lesion-wise detection under both rules, AVD).

Seeds: for a comparison run with several training seeds, each case's metrics are first averaged over the seeds,
then summarised as ``evaluate`` summarises (:func:`evaluate.summarize_cases`: Dice on lesion-bearing cases, pooled
lesion-wise detection, false lesions on lesion-free cases, 95% intervals that resample the persons whose anatomy
the cases were made from); ``dice_seed_sd`` is the spread of the per-seed means. ``delta_dice`` is the paired
Dice difference to the comparison's baseline variant (same lesion-bearing cases, persons resampled).
"""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from experiments.plan import Comparison, Settings
from experiments.runner import published_release, record_time, timed
from sct_sitehead.evaluation import evaluate as ev

logger = logging.getLogger(__name__)

#: Per-case values averaged over seeds: the per-case metrics, the reference volume (lesion-free or not) and the
#: lesion counts behind pooled detection.
CASE_KEYS = (
    "dice",
    "avd_mm3",
    "false_lesions",
    "false_volume_mm3",
    "volume_pred_mm3",
    "volume_ref_mm3",
    *(f"{count}_{rule}" for rule in ("any", "10pct") for count in ("n_ref", "n_pred", "tp", "fp", "fn")),
)
POOLED = "pooled"


def eval_path(settings: Settings, key: str) -> Path:
    return settings.work / "eval" / f"{key}.jsonl"


def read_rows(path: Path) -> list[dict[str, Any]]:
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def evaluate_model(
    settings: Settings, key: str, heads_by_site: Mapping[str, set[str]], cases: Sequence[ev.Case]
) -> list[dict[str, Any]]:
    """One row per (test case of a site in ``heads_by_site``, head wanted for that site); reuses the stored
    rows when they already cover every wanted (case, head)."""
    from sct_sitehead.atomic import write_text_atomic
    from sct_sitehead.deploy.options import Options
    from sct_sitehead.deploy.pipeline import Segmenter

    mine = [case for case in cases if case.site in heads_by_site]
    wanted = {(case.subject, head) for case in mine for head in heads_by_site[case.site]}
    path = eval_path(settings, key)
    stored = read_rows(path)
    if wanted <= {(row["subject"], row["head"]) for row in stored}:
        return [row for row in stored if (row["subject"], row["head"]) in wanted]
    release, cache = published_release(settings, key)

    def score_all() -> list[dict[str, Any]]:
        import nibabel as nib
        from nibabel.affines import voxel_sizes

        rows = []
        # One session per site with that site's heads only: each case runs the backbone once and no head
        # it does not need.
        for site in sorted({case.site for case in mine}):
            heads = sorted(heads_by_site[site])
            segmenter = Segmenter.open(
                release, heads, cache, Options(threads=settings.threads), offline=False, progress=False
            )
            for case in (c for c in mine if c.site == site):
                segmentation = segmenter.segment(case.image)
                reference = np.asanyarray(nib.load(case.reference).dataobj) > 0
                zooms = voxel_sizes(segmentation.image.affine)
                for head in heads:
                    # The mask sct_deepseg_lesion writes: the head's threshold and smallest lesion.
                    prediction = ev.lesion_mask(segmentation, head)
                    rows.append(
                        {
                            "model": key,
                            "head": head,
                            "site": case.site,
                            "subject": case.subject,
                            "person": case.person or case.subject,
                            "contrast": case.contrast,
                            **ev.score_case(prediction, reference, zooms),
                        }
                    )
        return rows

    rows, took = timed(score_all)
    record_time(settings, key, "evaluate", {**took, "cases": len(mine)})
    path.parent.mkdir(parents=True, exist_ok=True)
    write_text_atomic("".join(json.dumps(row) + "\n" for row in rows), path)
    logger.info("evaluated %s: %d cases, %d (case, head) rows in %.0f s", key, len(mine), len(rows), took["wall_s"])
    return rows


def index_rows(rows: Sequence[Mapping[str, Any]]) -> dict[tuple[str, str, str], dict[str, Any]]:
    """``{(model, head, subject): row}``."""
    return {(row["model"], row["head"], row["subject"]): dict(row) for row in rows}


def seed_mean(rows: Sequence[Mapping[str, Any]]) -> dict[str, float]:
    """Each of :data:`CASE_KEYS` averaged over the rows (NaN or missing values left out; NaN when all are)."""
    out = {}
    for key in CASE_KEYS:
        # rows scored before score_case kept the false lesions unsuffixed hold them under the "any" rule's name
        values = [float(row.get(key, row.get(f"{key}_any", math.nan))) for row in rows]
        values = [value for value in values if not math.isnan(value)]
        out[key] = float(np.mean(values)) if values else math.nan
    return out


def variant_cases(
    comparison: Comparison,
    variant,
    index: Mapping[tuple[str, str, str], Mapping[str, Any]],
    subjects: Mapping[str, Sequence[str]],
) -> dict[str, dict[int, dict[str, Mapping[str, Any]]]]:
    """``{site: {seed: {subject: row}}}`` of one variant (cases without a row are left out)."""
    out: dict[str, dict[int, dict[str, Mapping[str, Any]]]] = {}
    for site in comparison.sites:
        for seed in comparison.seeds:
            key, head = variant.pick(site, seed)
            found = {s: index[(key, head, s)] for s in subjects.get(site, ()) if (key, head, s) in index}
            out.setdefault(site, {})[seed] = found
    return out


def _groups(cases: Mapping[str, Mapping[int, Mapping[str, Any]]]) -> dict[str, dict[int, dict[str, Any]]]:
    """Per site and pooled over sites: ``{group: {seed: {subject: row}}}``."""
    groups = {site: {seed: dict(rows) for seed, rows in by_seed.items()} for site, by_seed in cases.items()}
    pooled: dict[int, dict[str, Any]] = {}
    for by_seed in cases.values():
        for seed, rows in by_seed.items():
            pooled.setdefault(seed, {}).update(rows)
    groups[POOLED] = pooled
    return groups


def summarize_comparison(
    comparison: Comparison,
    index: Mapping[tuple[str, str, str], Mapping[str, Any]],
    subjects: Mapping[str, Sequence[str]],
    persons: Mapping[str, str] | None = None,
) -> list[dict[str, Any]]:
    """One entry per (variant, site or ``pooled``): n, seeds, the summary of :func:`evaluate.summarize_cases`
    (means and 95% intervals that resample persons, with the persons they rest on), Dice spread over seeds, and
    the paired Dice difference to the baseline.

    Args:
        persons: subject -> the person its anatomy comes from (:func:`persons_by_subject`); a subject it lacks
            is its own person.
    """
    from sct_sitehead.evaluation.metrics import mean_by_person

    persons = persons or {}
    averaged: dict[str, dict[str, dict[str, dict[str, Any]]]] = {}
    seed_means: dict[str, dict[str, list[float]]] = {}
    for variant in comparison.variants:
        for group, by_seed in _groups(variant_cases(comparison, variant, index, subjects)).items():
            names = sorted(set().union(*[set(rows) for rows in by_seed.values()]))
            averaged.setdefault(variant.name, {})[group] = {
                s: {
                    **seed_mean([rows[s] for rows in by_seed.values() if s in rows]),
                    "subject": s,
                    "person": persons.get(s, s),
                }
                for s in names
            }
            seed_means.setdefault(variant.name, {})[group] = [
                float(np.nanmean([float(r["dice"]) for r in lesion_rows(rows.values())] or [math.nan]))
                for rows in by_seed.values()
                if rows
            ]
    entries = []
    for variant in comparison.variants:
        for group in [*comparison.sites, POOLED]:
            cases = averaged[variant.name].get(group, {})
            if not cases:
                continue
            rows = list(cases.values())
            entry: dict[str, Any] = {
                "comparison": comparison.name,
                "variant": variant.name,
                "site": group,
                "strategy": variant.strategy or "",
                "n_train": "" if variant.n is None else variant.n,
                "seeds": len(comparison.seeds),
                **ev.summarize_cases(rows),
            }
            spread = [value for value in seed_means[variant.name].get(group, []) if not math.isnan(value)]
            entry["dice_seed_sd"] = float(np.std(spread, ddof=1)) if len(spread) > 1 else math.nan
            base = averaged[comparison.baseline].get(group, {})
            paired = [s for s in cases if s in base and not ev.is_lesion_free(cases[s])]
            diffs = [cases[s]["dice"] - base[s]["dice"] for s in paired]
            found = mean_by_person(diffs, [cases[s]["person"] for s in paired])
            entry["delta_dice"] = found["mean"]
            entry["delta_dice_low"], entry["delta_dice_high"] = found["low"], found["high"]
            entries.append(entry)
    return entries


def lesion_rows(rows: Iterable[Mapping[str, Any]]) -> list[Mapping[str, Any]]:
    """The rows of lesion-bearing cases (a lesion-free case has no Dice)."""
    return [row for row in rows if not ev.is_lesion_free(dict(row))]


def persons_by_subject(cases: Sequence[ev.Case]) -> dict[str, str]:
    """``{subject: person}`` of the test cases (:func:`evaluate.find_cases` reads the person of each)."""
    return {case.subject: case.person or case.subject for case in cases}


def subjects_by_site(cases: Sequence[ev.Case]) -> dict[str, list[str]]:
    """``{site: test subjects}``."""
    out: dict[str, list[str]] = {}
    for case in cases:
        out.setdefault(case.site, []).append(case.subject)
    return out
