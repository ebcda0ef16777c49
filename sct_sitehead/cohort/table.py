"""The group level: the cohort table (TSV, a row per scan and head) and a plot of lesion load per subject, coloured
by site, from the records the participant level wrote."""

from __future__ import annotations

import csv
import io
from collections import defaultdict
from pathlib import Path
from typing import Any

from sct_sitehead.atomic import write_atomic
from sct_sitehead.cohort.plan import RECORDS, read_record

COLUMNS = [
    "subject",
    "session",
    "contrast",
    "acq",
    "run",
    "site",
    "head",
    "status",
    "lesion_count",
    "lesion_volume_mm3",
    "lesion_volumes_mm3",
    "cord_volume_mm3",
    "seconds",
    "exit_code",
    "error",
    "image",
    "mask",
]
TABLE = "cohort.tsv"
PLOT = "cohort_lesion_load.png"
#: Site colours, all distinct (Tableau 10 and two more): a study of up to 12 sites has no two alike.
PALETTE = [
    (31, 119, 180),
    (255, 127, 14),
    (44, 160, 44),
    (214, 39, 40),
    (148, 103, 189),
    (140, 86, 75),
    (227, 119, 194),
    (127, 127, 127),
    (188, 189, 34),
    (23, 190, 207),
    (0, 0, 128),
    (128, 64, 0),
]


def cohort_rows(out_dir: Path) -> list[dict[str, Any]]:
    """A row per scan and head (a failed scan: one row with its error and exit code), sorted by subject and image."""
    rows = []
    for path in sorted((Path(out_dir) / RECORDS).glob("*.json")):
        record = read_record(path)
        if record is None:
            continue
        entities = record.get("Entities") or {}
        base = {
            "subject": record.get("Subject", ""),
            "session": record.get("Session") or "n/a",
            "contrast": record.get("Contrast", ""),
            "acq": entities.get("acq", "n/a"),
            "run": entities.get("run", "n/a"),
            "site": record.get("ParticipantSite", "n/a"),
            "status": record.get("Status", ""),
            "image": record.get("Image", ""),
            "seconds": record.get("Seconds", ""),
        }
        if record.get("Status") != "done":
            rows.append({**base, "exit_code": record.get("ExitCode", ""), "error": record.get("Error", "")})
            continue
        for row in record.get("Rows") or []:
            volumes = ";".join(f"{v:g}" for v in row.get("lesion_volumes_mm3") or [])
            rows.append({**base, **row, "lesion_volumes_mm3": volumes, "exit_code": 0, "error": ""})
    return sorted(rows, key=lambda r: (str(r["subject"]), str(r["image"]), str(r.get("head", ""))))


def write_table(rows: list[dict[str, Any]], path: Path) -> Path:
    """The rows as TSV, :data:`COLUMNS` in order; a missing value is ``n/a`` (BIDS)."""
    buffer = io.StringIO()
    writer = csv.writer(buffer, delimiter="\t", lineterminator="\n")
    writer.writerow(COLUMNS)
    for row in rows:
        writer.writerow(["n/a" if row.get(c) in (None, "") else row.get(c) for c in COLUMNS])
    write_atomic(path, lambda tmp: tmp.write_text(buffer.getvalue(), encoding="utf-8"))
    return path


def plot_lesion_load(rows: list[dict[str, Any]], path: Path) -> Path:
    """Bars of total lesion volume per subject (summed over its scans, first head), grouped and coloured by site."""
    from PIL import Image, ImageDraw

    load: dict[tuple[str, str], float] = defaultdict(float)
    first_head: dict[str, str] = {}
    for row in rows:
        if row.get("status") != "done":
            continue
        head = first_head.setdefault(str(row["image"]), str(row.get("head")))
        if row.get("head") == head:
            load[(str(row["site"]), str(row["subject"]))] += float(row.get("lesion_volume_mm3") or 0.0)
    bars = sorted(load.items())
    sites = sorted({site for site, _ in load})
    colour = {site: PALETTE[i % len(PALETTE)] for i, site in enumerate(sites)}
    width, height, left, bottom, top = max(400, 60 + 18 * len(bars)), 360, 60, 120, 30
    canvas = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(canvas)
    most = max([v for _, v in bars] + [1.0])
    # PIL's default font has no superscript 3.
    draw.text((left, 8), f"lesion load per subject (mm3, max {most:.0f}), by site", fill="black")
    draw.line([(left, height - bottom), (width - 10, height - bottom)], fill="black")
    for i, ((site, subject), value) in enumerate(bars):
        x = left + 4 + 18 * i
        y = height - bottom - int((height - bottom - top) * value / most)
        draw.rectangle([x, y, x + 12, height - bottom], fill=colour[site])
        label = Image.new("RGB", (bottom - 6, 12), "white")
        ImageDraw.Draw(label).text((0, 0), subject, fill="black")
        canvas.paste(label.rotate(90, expand=True), (x, height - bottom + 4))
    for i, site in enumerate(sites):
        draw.rectangle([width - 120, top + 14 * i, width - 110, top + 10 + 14 * i], fill=colour[site])
        draw.text((width - 105, top - 1 + 14 * i), site, fill="black")
    buffer = io.BytesIO()
    canvas.save(buffer, format="PNG")
    write_atomic(path, lambda tmp: tmp.write_bytes(buffer.getvalue()))
    return path


def write_group(out_dir: Path) -> tuple[Path, Path, list[dict[str, Any]]]:
    """The group level: ``cohort.tsv`` and ``cohort_lesion_load.png`` in ``out_dir``, and the rows."""
    rows = cohort_rows(out_dir)
    return write_table(rows, Path(out_dir) / TABLE), plot_lesion_load(rows, Path(out_dir) / PLOT), rows
