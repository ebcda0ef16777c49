"""The frozen train/val/test split of the real data, by person (``splits.json``, shipped with the package).

A person is one human (or the PAM50 template): every participant label of that person, and every image of those
labels, is in one split. The simulator's datasets name each subject's source image (``participants.tsv``, column
``source``, e.g. ``sub-unf01_T2w`` or ``sub-errsm30_T2w as T1w``); :meth:`Splits.person_of_source` turns that into
the person, so that evaluation resamples persons, not the simulated cases drawn from one anatomy.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass
from functools import cache
from importlib import resources
from pathlib import Path

from sct_sitehead.errors import UsageError

#: The splits, in the order they are reported.
SPLITS = ("train", "val", "test")


@dataclass(frozen=True)
class Person:
    """One human (or the template) of the real data.

    Attributes:
        name: the ``person`` value of ``participants.tsv``, e.g. ``"sg-unf01"``.
        split: ``"train"``, ``"val"`` or ``"test"``.
        participants: participant id -> the stems of its images, e.g.
            ``{"sub-tut01": ("sub-tut01_acq-MToff_MTS",)}``.
        cord_masks: stems of the images with a cord mask (the only ones lesions can be inserted into).
        note: why the person is where it is.
    """

    name: str
    split: str
    participants: Mapping[str, tuple[str, ...]]
    cord_masks: tuple[str, ...]
    note: str = ""

    @property
    def images(self) -> tuple[str, ...]:
        """Every image stem of the person, over its participant labels."""
        return tuple(stem for stems in self.participants.values() for stem in stems)


@dataclass(frozen=True)
class Splits:
    """The persons of the real data and the split of each."""

    description: str
    persons: tuple[Person, ...]

    def person(self, name: str) -> Person:
        """The person called ``name``."""
        for person in self.persons:
            if person.name == name:
                return person
        raise UsageError(f"no person {name!r} in the splits; known: {', '.join(p.name for p in self.persons)}")

    def in_split(self, split: str) -> list[Person]:
        """The persons of one split."""
        if split not in SPLITS:
            raise UsageError(f"split is {split!r}; use one of {', '.join(SPLITS)}")
        return [person for person in self.persons if person.split == split]

    def person_of(self, participant: str) -> str | None:
        """The person of a participant id (``"sub-tut01"`` -> ``"sg-unf01"``), None when the file lacks it."""
        for person in self.persons:
            if participant in person.participants:
                return person.name
        return None

    def split_of(self, participant: str) -> str | None:
        """The split of a participant id, through its person; None when the file lacks it."""
        name = self.person_of(participant)
        return None if name is None else self.person(name).split

    def person_of_source(self, source: str) -> str:
        """The person behind a simulated subject's ``source`` (``"sub-unf01_T2w as T1w"`` -> ``"sg-unf01"``).

        A source the file does not know (a procedural phantom, another dataset) is its own person, named by
        its participant id.
        """
        participant = source.split(" as ")[0].split("_")[0].strip()
        return self.person_of(participant) or participant


def parse_splits(document: Mapping) -> Splits:
    """Check and read a splits document (the JSON of ``splits.json``)."""
    try:
        persons = tuple(
            Person(
                name=name,
                split=str(entry["split"]),
                participants={sub: tuple(stems) for sub, stems in entry["participants"].items()},
                cord_masks=tuple(entry.get("cord_masks", ())),
                note=str(entry.get("note", "")),
            )
            for name, entry in document["persons"].items()
        )
        description = str(document["description"])
    except (KeyError, TypeError, AttributeError) as exc:
        raise UsageError(f"splits document lacks {exc}; it needs 'description' and 'persons'") from exc
    for person in persons:
        if person.split not in SPLITS:
            raise UsageError(f"person {person.name!r} is in split {person.split!r}; use one of {', '.join(SPLITS)}")
    seen: dict[str, str] = {}
    for person in persons:
        for participant in person.participants:
            if participant in seen:
                raise UsageError(f"{participant} belongs to persons {seen[participant]!r} and {person.name!r}")
            seen[participant] = person.name
    return Splits(description, persons)


@cache
def _packaged() -> Splits:
    text = resources.files("sct_sitehead.evaluation").joinpath("splits.json").read_text(encoding="utf-8")
    return parse_splits(json.loads(text))


def load_splits(path: Path | None = None) -> Splits:
    """The split file: ``path``, or the one shipped with the package (``sct_sitehead/evaluation/splits.json``)."""
    if path is None:
        return _packaged()
    try:
        return parse_splits(json.loads(Path(path).read_text(encoding="utf-8")))
    except (OSError, json.JSONDecodeError) as exc:
        raise UsageError(f"cannot read the splits file {path}: {exc}; give a JSON file like splits.json") from exc


def describe_splits(splits: Splits) -> str:
    """Markdown: per split, its persons and their images (with the cord-masked ones marked)."""
    lines = ["| split | persons | images (cord mask *) |", "|---|---|---|"]
    for split in SPLITS:
        persons = splits.in_split(split)
        images = [f"{stem}{'*' if stem in person.cord_masks else ''}" for person in persons for stem in person.images]
        names = ", ".join(person.name for person in persons)
        lines.append(f"| {split} ({len(persons)} persons, {len(images)} images) | {names} | {', '.join(images)} |")
    return "\n".join(lines) + "\n"
