"""The evaluation report's lesion table: reference lesions found, by band, per MRI contrast and head kind."""

from __future__ import annotations

import math

from sct_sitehead.evaluation.report import lesions_markdown, write_report


def lesion(site: str, head: str, contrast: str, volume: float, shell: float, found: bool) -> dict:
    return {
        "site": site,
        "subject": f"sub-{site}001",
        "person": "p1",
        "contrast": contrast,
        "head": head,
        "lesion": 1,
        "volume_mm3": volume,
        "shell_contrast": shell,
        "overlap": 1.0 if found else 0.0,
        "detected_any": float(found),
        "detected_10pct": float(found),
    }


def test_lesion_table_counts_found_of_all_per_band_contrast_and_head_kind() -> None:
    rows = [
        lesion("montreal", "universal", "T2w", 5.0, 0.3, True),
        lesion("montreal", "universal", "T2w", 8.0, 1.5, False),
        lesion("montreal", "montreal", "T2w", 5.0, 0.3, False),
        lesion("zurich", "universal", "T1w", 50.0, -0.3, True),  # a dark lesion: banded by its size
        lesion("zurich", "montreal", "T1w", 50.0, -0.3, True),  # another site's head: not in the table
        lesion("zurich", "zurich", "T1w", 50.0, math.nan, True),  # no shell: in no contrast band
    ]
    rows[0]["cord_contrast"] = 0.6  # where the dataset has the cord: banded by contrast to the cord too
    table = lesions_markdown(rows)
    assert "| universal | contrast to the cord | 0.5 to 1 |  | 1 of 1 | 1 of 1 |" in table
    assert "| universal | contrast to the cord | 1 or more |" not in table  # the others have none
    assert "| head | lesions by | band | T1w | T2w | all |" in table
    assert "| universal | volume mm³ | 0 to 10 |  | 1 of 2 | 1 of 2 |" in table
    assert "| universal | volume mm³ | 30 to 100 | 1 of 1 |  | 1 of 1 |" in table
    assert "| universal | shell contrast | 0.25 to 0.5 | 1 of 1 | 1 of 1 | 2 of 2 |" in table
    assert "| universal | shell contrast | 1 or more |  | 0 of 1 | 0 of 1 |" in table
    assert "| own | volume mm³ | 0 to 10 |  | 0 of 1 | 0 of 1 |" in table
    assert "| own | volume mm³ | 30 to 100 | 1 of 1 |  | 1 of 1 |" in table
    assert "| own | shell contrast | 0.25 to 0.5 |  | 0 of 1 | 0 of 1 |" in table
    assert "| universal | volume mm³ | 10 to 30 |" not in table  # no lesion in that band
    assert lesions_markdown([]) == ""
    assert "| own |" not in lesions_markdown(rows[:2])


def test_report_writes_the_lesion_table_when_given(tmp_path) -> None:
    case = {
        "site": "montreal",
        "subject": "sub-montreal001",
        "person": "p1",
        "contrast": "T2w",
        "head": "universal",
        "dice": 0.5,
        "volume_pred_mm3": 5.0,
        "volume_ref_mm3": 5.0,
        "avd_mm3": 0.0,
        "false_lesions": math.nan,
        "false_volume_mm3": math.nan,
    }
    for tag in ("any", "10pct"):
        case.update({f"n_ref_{tag}": 1, f"n_pred_{tag}": 1, f"tp_{tag}": 1, f"fp_{tag}": 0, f"fn_{tag}": 0})
    write_report(tmp_path / "plain", "# plain\n", [case])
    assert not (tmp_path / "plain" / "lesions.tsv").exists()
    write_report(
        tmp_path / "with", "# with\n", [case], lesion_rows=[lesion("montreal", "universal", "T2w", 5, 0.3, True)]
    )
    assert (tmp_path / "with" / "lesions.tsv").read_text().splitlines()[0].split("\t")[-5:] == [
        "volume_mm3",
        "shell_contrast",
        "overlap",
        "detected_any",
        "detected_10pct",
    ]
    assert "Reference lesions found" in (tmp_path / "with" / "report.md").read_text()
