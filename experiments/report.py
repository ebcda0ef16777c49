"""The experiment report: ``report.md``, one TSV per comparison, PNG plots (pillow) and ``configs_used.json``."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from experiments.plan import UNIVERSAL, Comparison, Plan, Variant
from sct_sitehead.evaluation import evaluate as ev
from sct_sitehead.evaluation.report import write_csv

PALETTE = [
    (150, 150, 150),
    (200, 40, 40),
    (40, 110, 200),
    (40, 160, 80),
    (230, 150, 30),
    (130, 70, 170),
    (90, 190, 190),
    (120, 80, 40),
    (240, 110, 180),
    (60, 60, 60),
    (170, 200, 60),
    (20, 60, 120),
]


def cell(entry: Mapping[str, Any], key: str, digits: int = 3) -> str:
    """``mean [low, high]``; ``n/a`` for an undefined mean."""
    mean, low, high = (float(entry.get(k, math.nan)) for k in (key, f"{key}_low", f"{key}_high"))
    if math.isnan(mean):
        return "n/a"
    if math.isnan(low):
        return f"{mean:.{digits}f}"
    return f"{mean:.{digits}f} [{low:.{digits}f}, {high:.{digits}f}]"


def comparison_table(comparison: Comparison, entries: Sequence[Mapping[str, Any]]) -> str:
    """Markdown: pooled rows first, then each site; every summary metric as mean [95% CI] (intervals resample
    persons; the mean alone with fewer than two), the paired Dice difference to the baseline, the spread over
    seeds when there are several, and the persons the intervals rest on."""
    seeds = len(comparison.seeds) > 1
    head = ["site", "variant", "n", *ev.SUMMARY_METRICS.values(), f"ΔDice vs {comparison.baseline}"]
    head += ["Dice seed sd"] if seeds else []
    head += ["persons (lesion / all / lesion-free)"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    order = {site: i for i, site in enumerate(["pooled", *comparison.sites])}
    for entry in sorted(entries, key=lambda e: order.get(e["site"], 99)):
        cells = [entry["site"], entry["variant"], str(entry["n"])]
        cells += [cell(entry, k, 1 if k.endswith("mm3") else 3) for k in ev.SUMMARY_METRICS]
        cells += ["—" if entry["variant"] == comparison.baseline else cell(entry, "delta_dice")]
        if seeds:
            cells += [f"{entry['dice_seed_sd']:.3f}" if not math.isnan(entry["dice_seed_sd"]) else "n/a"]
        cells += [
            f"{entry.get('persons_lesion', '?')} / {entry.get('persons', '?')} / {entry.get('persons_free', '?')}"
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def variant_cost(comparison: Comparison, variant: Variant, costs: Mapping[str, Mapping[str, Any]]) -> dict[str, Any]:
    """Training time and parameters of one variant for all of the comparison's sites (mean over seeds), and
    what one more site adds: nothing (universal head), a head, or a whole model (separate models)."""
    totals = []
    for seed in comparison.seeds:
        jobs: dict[tuple[str, str], Mapping[str, Any]] = {}
        params: dict[tuple[str, str], int] = {}
        added_t, added_p = [], []
        for site in comparison.sites:
            key, head = variant.pick(site, seed)
            timing, parameters = costs[key]["timing"], costs[key]["parameters"]
            if head != UNIVERSAL and timing.get(head, {}).get("steps") == 0:
                head = UNIVERSAL  # an untrained copy: the pooled model read through the site's own channels
            jobs[(key, "backbone")] = timing.get("backbone", {})
            params[(key, "backbone")] = parameters.get("backbone", 0)
            params[(key, head)] = parameters.get(head, 0)
            if head != UNIVERSAL:
                jobs[(key, head)] = timing.get(head, {})
            if "{site}" in variant.model:
                added_t.append(timing.get("backbone", {}).get("wall_s", 0.0))
                added_p.append(parameters.get("backbone", 0) + parameters.get(head, 0))
            elif head != UNIVERSAL:
                added_t.append(timing.get(head, {}).get("wall_s", 0.0))
                added_p.append(parameters.get(head, 0))
            else:
                added_t.append(0.0)
                added_p.append(0)
        totals.append(
            {
                "wall_s": sum(j.get("wall_s", 0.0) for j in jobs.values()),
                "cpu_s": sum(j.get("cpu_s", 0.0) for j in jobs.values()),
                "parameters": sum(params.values()),
                "added_wall_s": sum(added_t) / len(added_t),
                "added_parameters": sum(added_p) / len(added_p),
            }
        )
    mean = {k: sum(t[k] for t in totals) / len(totals) for k in totals[0]}
    return {
        "comparison": comparison.name,
        "variant": variant.name,
        **{k: int(round(v)) if "parameters" in k else round(v, 2) for k, v in mean.items()},
    }


def cost_table(rows: Sequence[Mapping[str, Any]]) -> str:
    lines = [
        "| comparison | variant | training, all sites (min) | CPU (min) | one more site (min) | parameters, all "
        "sites | parameters added per site |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['comparison']} | {r['variant']} | {r['wall_s'] / 60:.1f} | {r['cpu_s'] / 60:.1f} | "
            f"{r['added_wall_s'] / 60:.2f} | {int(r['parameters']):,} | {int(r['added_parameters']):,} |"
        )
    return "\n".join(lines) + "\n"


def curve_table(
    comparison: Comparison, entries: Sequence[Mapping[str, Any]], costs: Mapping[str, Mapping[str, Any]]
) -> str:
    """Rows: labelled subjects n; columns per head strategy: Dice and F1 (any) as mean [95% CI], head seconds."""
    site = comparison.sites[0]
    found = {e["variant"]: e for e in entries if e["site"] == site}
    strategies = sorted({v.strategy for v in comparison.variants if v.n and v.strategy})
    head = ["n"] + [f"{s} {m}" for s in strategies for m in ("Dice", "F1 (any)", "head s")]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    zero = next((v for v in comparison.variants if v.n == 0), None)
    if zero is not None and zero.name in found:
        e = found[zero.name]
        lines.append(
            "| 0 (universal head) | " + " | ".join([cell(e, "dice"), cell(e, "f1_any"), "0"] * len(strategies)) + " |"
        )
    for n in sorted({v.n for v in comparison.variants if v.n}):
        cells = [str(n)]
        for strategy in strategies:
            variant = next(v for v in comparison.variants if v.n == n and v.strategy == strategy)
            e = found.get(variant.name, {})
            key, head_name = variant.pick(site, comparison.seeds[0])
            seconds = costs[key]["timing"].get(head_name, {}).get("wall_s", math.nan)
            cells += [cell(e, "dice"), cell(e, "f1_any"), f"{seconds:.1f}"]
        lines.append("| " + " | ".join(cells) + " |")
    for variant in comparison.variants:
        if variant.n is None and variant.name in found:
            e = found[variant.name]
            lines.append(
                f"\nReference, {variant.name}: Dice {cell(e, 'dice')}, F1 (any) {cell(e, 'f1_any')} "
                f"(n = {e['n']} test cases)."
            )
    return "\n".join(lines) + "\n"


# --- plots (pillow) -----------------------------------------------------------------------------------------------
def _canvas(width: int, height: int):
    from PIL import Image, ImageDraw

    picture = Image.new("RGB", (width, height), "white")
    return picture, ImageDraw.Draw(picture)


def _save(picture, path: Path) -> Path:
    from sct_sitehead.atomic import write_atomic

    write_atomic(path, lambda tmp: picture.save(tmp, format="PNG"))
    return path


def _axis(draw, left: int, right: int, top: int, bottom: int, label: str):
    def y(value: float) -> float:
        return bottom - (bottom - top) * max(0.0, min(1.0, value))

    for tick in (0.0, 0.25, 0.5, 0.75, 1.0):
        draw.line([(left, y(tick)), (right, y(tick))], fill=(225, 225, 225))
        draw.text((6, y(tick) - 6), f"{tick:.2f}", fill="black")
    draw.text((6, top - 28), label, fill="black")
    return y


def plot_bars(comparison: Comparison, entries: Sequence[Mapping[str, Any]], path: Path, metric: str = "dice") -> Path:
    """Grouped bars: one group per site (and pooled), one bar per variant, 95% interval whiskers."""
    groups = [*comparison.sites, "pooled"]
    variants = [v.name for v in comparison.variants]
    bar, gap = 16, 24
    width = 60 + len(groups) * (len(variants) * bar + gap) + 20
    height = 330 + 16 * len(variants)
    picture, draw = _canvas(max(width, 480), height)
    y = _axis(draw, 50, picture.width - 10, 50, 270, f"{comparison.name}: lesion {metric} per site (95% CI)")
    lookup = {(e["site"], e["variant"]): e for e in entries}
    for g, group in enumerate(groups):
        x0 = 60 + g * (len(variants) * bar + gap)
        for v, name in enumerate(variants):
            entry = lookup.get((group, name))
            if entry is None or math.isnan(entry[metric]):
                continue
            left = x0 + v * bar
            draw.rectangle([left, y(entry[metric]), left + bar - 3, y(0)], fill=PALETTE[v % len(PALETTE)])
            if not math.isnan(entry[f"{metric}_low"]):
                mid = left + (bar - 3) / 2
                draw.line([(mid, y(entry[f"{metric}_low"])), (mid, y(entry[f"{metric}_high"]))], fill="black", width=1)
        draw.text((x0, 276), group[:12], fill="black")
    for v, name in enumerate(variants):
        draw.rectangle([60, 300 + 16 * v, 72, 310 + 16 * v], fill=PALETTE[v % len(PALETTE)])
        draw.text((78, 299 + 16 * v), name, fill="black")
    return _save(picture, path)


def plot_curve(comparison: Comparison, entries: Sequence[Mapping[str, Any]], path: Path) -> Path:
    """Dice against labelled subjects (0 = universal head), one line per strategy, whiskers = 95% CI; the
    dashed line is the reference (the site in the backbone, head trained on all its subjects)."""
    site = comparison.sites[0]
    found = {e["variant"]: e for e in entries if e["site"] == site}
    ns = [0, *sorted({v.n for v in comparison.variants if v.n})]
    picture, draw = _canvas(max(480, 140 + 90 * len(ns)), 360)
    y = _axis(
        draw,
        50,
        picture.width - 10,
        50,
        290,
        f"new site {site}: lesion Dice (95% CI); dashed: {site} in the backbone, all subjects",
    )
    x = {n: 80 + 90 * i for i, n in enumerate(ns)}
    zero = next((v for v in comparison.variants if v.n == 0), None)
    strategies = sorted({v.strategy for v in comparison.variants if v.n and v.strategy})
    for s, strategy in enumerate(strategies):
        colour = PALETTE[(s + 1) % len(PALETTE)]
        points = [(0, found.get(zero.name))] if zero is not None else []
        points += [(v.n, found.get(v.name)) for v in comparison.variants if v.strategy == strategy and v.n]
        points = [(n, e) for n, e in points if e is not None and not math.isnan(e["dice"])]
        offset = 4 * s
        for (n0, e0), (n1, e1) in zip(points, points[1:]):
            draw.line([(x[n0] + offset, y(e0["dice"])), (x[n1] + offset, y(e1["dice"]))], fill=colour, width=2)
        for n, e in points:
            if not math.isnan(e["dice_low"]):
                draw.line([(x[n] + offset, y(e["dice_low"])), (x[n] + offset, y(e["dice_high"]))], fill=colour)
            draw.ellipse([x[n] + offset - 3, y(e["dice"]) - 3, x[n] + offset + 3, y(e["dice"]) + 3], fill=colour)
        draw.text((picture.width - 150, 60 + 14 * s), strategy, fill=colour)
    reference = next((found[v.name] for v in comparison.variants if v.n is None and v.name in found), None)
    if reference is not None and not math.isnan(reference["dice"]):
        for start in range(50, picture.width - 10, 12):
            draw.line([(start, y(reference["dice"])), (start + 6, y(reference["dice"]))], fill=(0, 0, 0))
    for n in ns:
        draw.text((x[n] - 4, 298), str(n), fill="black")
    draw.text((picture.width // 2 - 60, 318), "labelled subjects of the new site", fill="black")
    return _save(picture, path)


def write_tables(
    out: Path,
    plan: Plan,
    entries: Mapping[str, list[dict[str, Any]]],
    cost_rows: Sequence[Mapping[str, Any]],
    rows: Sequence[Mapping[str, Any]],
) -> list[Path]:
    """``<comparison>.tsv``, ``cost.tsv`` and ``cases.tsv`` (every scored (case, head) row)."""
    written = [write_csv(entries[c.name], out / f"{c.name}.tsv") for c in plan.comparisons if entries[c.name]]
    written.append(write_csv(list(cost_rows), out / "cost.tsv"))
    columns = [
        "model",
        "head",
        "site",
        "subject",
        *[k for k in rows[0] if k not in ("model", "head", "site", "subject")],
    ]
    written.append(write_csv([{c: r.get(c) for c in columns} for r in rows], out / "cases.tsv"))
    return written
