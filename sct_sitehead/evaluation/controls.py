"""Healthy controls: every head's false lesions on scans that hold none (``evaluate -controls``)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from sct_sitehead.evaluation.evaluate import read_participants
from sct_sitehead.evaluation.splits import load_splits


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


def healthy_controls(bids: Path) -> list[Path]:
    """Images of every participant whose ``pathology`` in ``participants.tsv`` is one of
    :data:`CONTROL_PATHOLOGIES` (the right answer on each is no lesion)."""
    wanted = {p.upper() for p in CONTROL_PATHOLOGIES}
    controls = {sub for sub, row in read_participants(bids).items() if row.get("pathology", "").upper() in wanted}
    return sorted(p for p in bids.glob("sub-*/**/anat/*.nii*") if p.parts[len(bids.parts)] in controls)


def split_controls(bids: Path, split: str) -> list[Path]:
    """:func:`healthy_controls` of the persons of one split of the frozen split (e.g. ``val``)."""
    splits = load_splits()
    return [path for path in healthy_controls(bids) if splits.split_of(_subject(path.name)) == split]


def _subject(image: str) -> str:
    """The participant of a BIDS image name (``sub-X_..._T2w.nii.gz`` -> ``sub-X``)."""
    return image.split("_")[0]


def describe_controls(rows: list[dict[str, Any]], bids: Path) -> list[dict[str, Any]]:
    """The rows of :func:`check_controls` with each image's participant, person, pathology and split (of the
    frozen split, :mod:`sct_sitehead.evaluation.splits`; ``unassigned`` for a participant it lacks)."""
    participants = read_participants(bids)
    splits = load_splits()
    out = []
    for row in rows:
        subject = _subject(str(row["image"]))
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
