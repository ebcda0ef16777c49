"""Evaluation tables (TSV, Markdown), the Dice plot and the report of ``sct_sitehead evaluate``."""

from __future__ import annotations

import math
from collections import defaultdict
from pathlib import Path
from typing import Any

from sct_sitehead.atomic import write_atomic, write_text_atomic
from sct_sitehead.errors import UsageError
from sct_sitehead.evaluation.controls import controls_markdown, summarize_controls
from sct_sitehead.evaluation.evaluate import ALL_CONTRASTS, SUMMARY_METRICS, is_lesion_free, person_of, summarize_rows
from sct_sitehead.evaluation.splits import describe_splits, load_splits


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


#: Bands of reference lesions in the lesion table: volume (mm³) and contrast to the lesion's shell (absolute).
VOLUME_BANDS = ((0.0, 10.0), (10.0, 30.0), (30.0, 100.0), (100.0, math.inf))
CONTRAST_BANDS = ((0.0, 0.1), (0.1, 0.25), (0.25, 0.5), (0.5, 1.0), (1.0, math.inf))


def _band_name(low: float, high: float) -> str:
    return f"{low:g} or more" if math.isinf(high) else f"{low:g} to {high:g}"


def lesions_markdown(lesion_rows: list[dict[str, Any]]) -> str:
    """Reference lesions found (any voxel), by volume and by contrast to their shell, per MRI contrast, for the
    universal head and each site's own head (from :func:`evaluate_release`'s lesion rows); bands without a lesion
    are left out."""
    rows = own_head_rows(lesion_rows)
    if not rows:
        return ""
    contrasts = sorted({str(row.get("contrast") or "?") for row in rows})
    lines = [
        "\nReference lesions found (any voxel) by volume, by contrast to a 2-voxel shell around them "
        "(|lesion mean / shell median - 1|; a lesion on the cord's rim is measured against CSF too) and, where the "
        "dataset has the cord's mask, by contrast to the lesion-free cord within 4 voxels (CSF left out: what a "
        "reader compares it with), found of all (`lesions.tsv` has each lesion):\n",
        "| head | lesions by | band | " + " | ".join(contrasts) + " | all |",
        "|---|---|---|" + "---|" * (len(contrasts) + 1),
    ]
    for kind in ("universal", "own"):
        chosen = [row for row in rows if (row["head"] == "universal") == (kind == "universal")]
        if not chosen:
            continue
        for column, bands, label in (
            ("volume_mm3", VOLUME_BANDS, "volume mm³"),
            ("shell_contrast", CONTRAST_BANDS, "shell contrast"),
            ("cord_contrast", CONTRAST_BANDS, "contrast to the cord"),
        ):
            for low, high in bands:
                members = [row for row in chosen if low <= abs(float(row.get(column, math.nan))) < high]
                if not members:
                    continue
                cells = []
                for contrast in [*contrasts, None]:
                    group = [row for row in members if contrast is None or str(row.get("contrast") or "?") == contrast]
                    found = sum(int(row["detected_any"]) for row in group)
                    cells.append(f"{found} of {len(group)}" if group else "")
                lines.append(f"| {kind} | {label} | {_band_name(low, high)} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def write_report(
    out: Path,
    title: str,
    rows: list[dict[str, Any]],
    control_rows: list[dict[str, Any]] | None = None,
    lesion_rows: list[dict[str, Any]] | None = None,
) -> list[str]:
    """Write an evaluation's tables (``cases.tsv``, ``summary.tsv`` own heads and ``universal``,
    ``summary_all_heads.tsv``, ``controls.tsv``, ``lesions.tsv``), ``dice.png`` and ``report.md``; return the
    report's parts.

    Args:
        out: the report folder (created).
        title: the report's first line.
        rows: case rows of :func:`evaluate_release`.
        control_rows: rows of :func:`describe_controls`, or None without controls.
        lesion_rows: lesion rows of :func:`evaluate_release`, or None.
    """
    out.mkdir(parents=True, exist_ok=True)
    summary = summarize_rows(own_head_rows(rows))
    write_csv(rows, out / "cases.tsv")
    write_csv(summarize_rows(rows), out / "summary_all_heads.tsv")
    write_csv(summary, out / "summary.tsv")
    plot_dice(summary, out / "dice.png")
    report = [title, METRICS_NOTE, markdown_table(summary), "\nCases by person:\n\n" + persons_markdown(rows)]
    if lesion_rows:
        write_csv(lesion_rows, out / "lesions.tsv")
        report.append(lesions_markdown(lesion_rows))
    if control_rows is not None:
        write_csv(control_rows, out / "controls.tsv")
        report.append(controls_markdown(summarize_controls(control_rows)))
    report.append(
        "\nThe frozen split of the real data by person (`sct_sitehead/evaluation/splits.json`):\n\n"
        + describe_splits(load_splits())
    )
    write_text_atomic("\n".join(report), out / "report.md")
    return report
