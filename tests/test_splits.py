"""The frozen split by person (sct_sitehead/evaluation/splits.json) against itself and against the real data."""

from __future__ import annotations

import csv
import re
from collections import defaultdict
from pathlib import Path

import pytest

from sct_sitehead.errors import UsageError
from sct_sitehead.evaluation.splits import SPLITS, describe_splits, load_splits, parse_splits

CONTRASTS = ("T2w", "T2star", "MTS", "T1w")


def contrast_of(stem: str) -> str:
    return stem.rsplit("_", 1)[1]


def test_no_person_or_participant_is_in_two_splits():
    splits = load_splits()
    split_of_person: dict[str, set[str]] = defaultdict(set)
    split_of_participant: dict[str, set[str]] = defaultdict(set)
    for person in splits.persons:
        split_of_person[person.name].add(person.split)
        for participant in person.participants:
            split_of_participant[participant].add(person.split)
    assert all(len(found) == 1 for found in split_of_person.values())
    assert all(len(found) == 1 for found in split_of_participant.values())
    assert len(split_of_person) == len(splits.persons)  # every name once
    assert {p.split for p in splits.persons} == set(SPLITS)


def test_the_test_split_covers_every_contrast_with_cord_masks_where_the_data_allows():
    """Two persons with a cord mask per contrast in test, except T1w (two T1w persons in all: one trains)."""
    splits = load_splits()
    masked: dict[str, set[str]] = defaultdict(set)
    for person in splits.in_split("test"):
        for stem in person.cord_masks:
            masked[contrast_of(stem)].add(person.name)
    assert set(masked) == set(CONTRASTS)
    assert all(len(masked[c]) >= 2 for c in ("T2w", "T2star", "MTS"))
    assert masked["T1w"] == {"sg-unf01"}
    training_t1w = {p.name for p in splits.in_split("train") if any(contrast_of(s) == "T1w" for s in p.cord_masks)}
    assert training_t1w == {"errsm30"}
    assert "T1w" in splits.description and "did not allow" in splits.description


def test_val_lacks_only_t1w_and_mts_anatomy_which_the_simulator_then_takes_from_train():
    """`simulate -splits` stands val subjects in on train anatomy for a contrast no val person has a cord mask of
    (tests/test_simulator.py checks it does): every contrast has one in train and test, val lacks T1w and MTS."""
    splits = load_splits()
    masked = {split: {contrast_of(s) for p in splits.in_split(split) for s in p.cord_masks} for split in SPLITS}
    assert masked["train"] == masked["test"] == set(CONTRASTS)
    assert set(CONTRASTS) - masked["val"] == {"T1w", "MTS"}
    assert "Val's T1w and MTS cases must therefore be simulated on training anatomy" in splits.description


def test_lesion_113_training_anatomy_is_not_in_test():
    """lesion@1.1.x trained on errsm30 and the PAM50 template and was tested on sg-unf01 and sg-unf05."""
    splits = load_splits()
    assert {splits.person(p).split for p in ("errsm30", "pam50-template")} == {"train"}
    assert {splits.person(p).split for p in ("sg-unf01", "sg-unf05")} == {"test"}


def test_simulated_sources_map_to_persons():
    splits = load_splits()
    assert splits.person_of_source("sub-unf01_T2w") == "sg-unf01"
    assert splits.person_of_source("sub-tut01_acq-MToff_MTS") == "sg-unf01"  # same human, other label
    assert splits.person_of_source("sub-errsm30_T2w as T1w") == "errsm30"  # borrowed anatomy
    assert splits.person_of_source("sub-phantom03_T2w") == "sub-phantom03"  # not in the file: its own person
    assert splits.split_of("sub-tut05") == "test" and splits.split_of("sub-nobody") is None


def test_a_participant_under_two_persons_is_refused():
    document = {
        "description": "x",
        "persons": {
            "a": {"split": "train", "participants": {"sub-1": ["sub-1_T2w"]}},
            "b": {"split": "test", "participants": {"sub-1": ["sub-1_T1w"]}},
        },
    }
    with pytest.raises(UsageError, match="sub-1 belongs to persons 'a' and 'b'"):
        parse_splits(document)
    document["persons"]["b"] = {"split": "holdout", "participants": {"sub-2": []}}
    with pytest.raises(UsageError, match="split 'holdout'"):
        parse_splits(document)


def test_description_table_lists_every_image():
    table = describe_splits(load_splits())
    assert "| test (9 persons, 18 images) |" in table and "sub-unf01_T1w*" in table


def _participants(bids: Path) -> list[dict[str, str]]:
    with (bids / "participants.tsv").open(newline="", encoding="utf-8") as handle:
        return list(csv.DictReader(handle, delimiter="\t"))


def test_every_image_of_the_data_is_assigned_through_its_person(bids_dir: Path):
    """Each participant of participants.tsv sits under the person its `person` column names, with exactly the
    images of its anat/ folder and the cord masks of derivatives/labels."""
    splits = load_splits()
    rows = _participants(bids_dir)
    assert {row["participant_id"] for row in rows} == {
        participant for person in splits.persons for participant in person.participants
    }
    for row in rows:
        participant = row["participant_id"]
        assert splits.person_of(participant) == row["person"], participant
        person = splits.person(row["person"])
        images = sorted(re.sub(r"\.nii(\.gz)?$", "", p.name) for p in (bids_dir / participant / "anat").glob("*.nii*"))
        assert list(person.participants[participant]) == images, participant
        labels = bids_dir / "derivatives" / "labels" / participant / "anat"
        masked = {stem for stem in images if list(labels.glob(f"{stem}_seg*.nii*"))}
        assert masked == set(person.cord_masks) & set(images), participant
    assert sum(len(p.images) for p in splits.persons) == sum(
        len(list((bids_dir / row["participant_id"] / "anat").glob("*.nii*"))) for row in rows
    )
