"""Which source anatomy each simulated subject is drawn from, and which split (train, val, test) it is in.

Two schemes, chosen by :func:`sct_sitehead.simulate.simulate`'s arguments:

- **The frozen split** (``splits``, ``sct_sitehead simulate -splits``; :mod:`sct_sitehead.evaluation.splits`).
  Each subject's split is planned before its source is drawn (:func:`plan_site`), and the source comes from the
  anatomy of that split's persons: train subjects from train persons' images (and the procedural phantoms, which
  are train only), val from val persons', test from test persons'. A site's borrowed anatomy (another contrast,
  remapped: :class:`~sct_sitehead.simulate.sites.Borrow`) follows its person's split too, and only train and val
  subjects borrow. Where val has no real image of a contrast a site scans, its val subjects of that contrast are
  drawn from train persons' real images of it (``seen_anatomy``); test subjects never are: a contrast without test
  anatomy gets no test subject, and a site without any has its test subjects left out.
- **Held-out subjects** (``holdout``, ``-holdout``): the anatomy of a few source subjects appears only in the test
  split; every other subject is drawn from the rest and shuffled into train and val after it is drawn
  (:func:`holdout_splits`), so train and val share anatomy.
"""

from __future__ import annotations

import logging
import zlib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Any, TypeVar

import numpy as np

from sct_sitehead.errors import UsageError
from sct_sitehead.evaluation.bids import Sample
from sct_sitehead.evaluation.splits import SPLITS, Splits
from sct_sitehead.simulate.sites import Borrow, Site

logger = logging.getLogger(__name__)

Item = TypeVar("Item")


@dataclass(frozen=True)
class Source:
    """A source image as one site uses it: in its own contrast, or borrowed (written as the site's contrast)."""

    sample: Sample
    borrow: Borrow | None = None

    @property
    def subject(self) -> str:
        return self.sample.subject

    @property
    def name(self) -> str:
        """``sub-errsm30_T2w``, or ``sub-errsm30_T2w as T1w`` when borrowed."""
        return f"{self.sample.stem} as {self.sample.contrast}" if self.borrow else self.sample.stem


def eligible_sources(samples: Sequence[Sample], site: Site, holdout: Sequence[str] = ()) -> list[Source]:
    """The site's own contrasts, then the contrasts it borrows (never from held-out anatomy)."""
    own = [Source(s) for s in samples if s.contrast in site.contrasts]
    if not own:
        raise UsageError(
            f"site {site.name!r} scans {list(site.contrasts)} but the source has cord-labelled images of "
            f"{sorted({s.contrast for s in samples})} only; leave the site out (sites=...) or add such images"
        )
    borrowed = [
        Source(replace(s, contrast=site.contrasts[0], entities={}), site.borrow[s.contrast])
        for s in samples
        if s.contrast in site.borrow and s.subject not in holdout
    ]
    return own + borrowed


def real_or_phantom(
    pool: list[Source], phantom_subjects: set[str] | frozenset[str], real_share: float, rng: np.random.Generator
) -> list[Source]:
    """The real sources of ``pool`` with probability ``real_share``, else its phantoms (the whole pool when it
    lacks either kind)."""
    real = [s for s in pool if s.subject not in phantom_subjects]
    made = [s for s in pool if s.subject in phantom_subjects]
    if not real or not made:
        return pool
    return real if rng.random() < real_share else made


def share_out(
    items: Sequence[Item], fractions: tuple[float, float, float], rng: np.random.Generator, *, with_test: bool = True
) -> dict[Item, str]:
    """Shuffle ``items`` into train, val and test by ``fractions`` (train and val only when not ``with_test``)."""
    train, val, test = (max(float(f), 0.0) for f in fractions)
    if not with_test:
        test = 0.0
    total = train + val + test
    if total <= 0:
        raise UsageError(f"split fractions {fractions} sum to 0; use e.g. (0.7, 0.15, 0.15)")
    order = [items[i] for i in rng.permutation(len(items))]
    n_train = int(round(len(items) * train / total))
    n_val = int(round(len(items) * val / total)) if test > 0 else len(items) - n_train
    return {item: "train" if k < n_train else "val" if k < n_train + n_val else "test" for k, item in enumerate(order)}


# --- held-out subjects ------------------------------------------------------------------------------------------
def holdout_pool(
    eligible: list[Source], holdout: Sequence[str], test_per_site: int | None, number: int
) -> list[Source]:
    """The sources subject ``number`` (1-based) of a site may come from."""
    if not holdout or test_per_site is None:
        return eligible
    held = [s for s in eligible if s.subject in holdout]
    rest = [s for s in eligible if s.subject not in holdout]
    wanted = held if number <= test_per_site else rest
    return wanted or eligible


def holdout_splits(
    chosen: Sequence[tuple[str, Source | Sample]],
    holdout: Sequence[str],
    fractions: tuple[float, float, float],
    rng: np.random.Generator,
) -> dict[str, str]:
    """Holdout anatomy -> test; the rest shuffled into train/val/test by the fractions (train/val with a holdout).

    Args:
        chosen: ``(participant, source)`` of a site's subjects, in order.
        holdout: the held-out source subjects.
        fractions: train, val and test fractions.
        rng: the site's split generator.
    """
    splits = {p: "test" for p, s in chosen if s.subject in holdout}
    rest = [p for p, s in chosen if s.subject not in holdout]
    return {**splits, **share_out(rest, fractions, rng, with_test=not holdout)}


# --- the frozen split -------------------------------------------------------------------------------------------
def participant_id(site: str, number: int) -> str:
    """``sub-<site><NNN>``: the participant id of a site's subject ``number`` (1-based)."""
    return f"sub-{site}{number:03d}"


def split_rng(seed: int, site: str) -> np.random.Generator:
    """The generator that shares a site's subjects between the splits, separate from each subject's own
    (:func:`sct_sitehead.simulate.simulator.subject_rng`)."""
    return np.random.default_rng([int(seed), zlib.crc32(site.encode()), 0])


def plan_sites(
    samples: Sequence[Sample],
    profiles: Sequence[Site],
    splits: Splits,
    *,
    n_per_site: int,
    seed: int,
    test_per_site: int | None,
    fractions: tuple[float, float, float],
    phantom_subjects: set[str] | frozenset[str] = frozenset(),
) -> dict[str, SitePlan]:
    """Each site's :func:`plan_site` for subjects ``1..n_per_site``, by site name."""
    return {
        site.name: plan_site(
            eligible_sources(samples, site),
            site,
            splits,
            [participant_id(site.name, number) for number in range(1, n_per_site + 1)],
            test_per_site=test_per_site,
            fractions=fractions,
            rng=split_rng(seed, site.name),
            phantom_subjects=phantom_subjects,
        )
        for site in profiles
    }


def split_report(splits: Splits, plans: Mapping[str, SitePlan]) -> dict[str, Any]:
    """``simulation.json``'s ``splits``: the persons of each split, and each site's :attr:`SitePlan.report`."""
    return {
        "persons": {split: [person.name for person in splits.in_split(split)] for split in SPLITS},
        "sites": {name: dict(plan.report) for name, plan in plans.items()},
    }


def check_split_covers(splits: Splits, samples: Sequence[Sample]) -> None:
    """Refuse source subjects that no person of ``splits`` holds: their split would be a guess."""
    unknown = sorted({s.subject for s in samples if splits.split_of(s.subject) is None})
    if unknown:
        raise UsageError(
            f"source subjects {unknown} belong to no person of the split file; add them to its persons "
            "(participants) or simulate without the split"
        )


def source_split(source: Source, splits: Splits, phantom_subjects: set[str] | frozenset[str]) -> str:
    """The split of a source's person (``"train"`` for a procedural phantom)."""
    if source.subject in phantom_subjects:
        return "train"
    found = splits.split_of(source.subject)
    if found is None:
        raise UsageError(f"{source.name} belongs to no person of the split file; add its participant to one")
    return found


@dataclass(frozen=True)
class SitePlan:
    """A site's subjects under the frozen split.

    Attributes:
        site: the site's name.
        split_of: participant id -> its split, planned before its source is drawn.
        pools: split -> the sources its subjects are drawn from (empty: that split's subjects are left out).
        homes: source name -> the split of its person.
        report: for ``simulation.json``: per split the subjects drawn and left out, its sources, the contrasts it
            has no anatomy of, and ``seen_anatomy``: the contrasts whose val subjects come from train anatomy.
    """

    site: str
    split_of: Mapping[str, str]
    pools: Mapping[str, list[Source]]
    homes: Mapping[str, str]
    report: Mapping[str, Any]

    def pool(self, participant: str) -> list[Source]:
        """The sources ``participant`` may be drawn from."""
        return self.pools[self.split_of[participant]]

    def seen(self, participant: str, source: Source) -> bool:
        """Whether ``participant`` was drawn from the anatomy of another split's person (val on train anatomy)."""
        return self.homes[source.name] != self.split_of[participant]


def plan_site(
    eligible: list[Source],
    site: Site,
    splits: Splits,
    participants: Sequence[str],
    *,
    test_per_site: int | None,
    fractions: tuple[float, float, float],
    rng: np.random.Generator,
    phantom_subjects: set[str] | frozenset[str] = frozenset(),
) -> SitePlan:
    """Plan a site's subjects under the frozen split (see the module docstring for the rules).

    Args:
        eligible: the site's sources (:func:`eligible_sources`, without a holdout).
        site: the site profile.
        splits: the frozen split.
        participants: the site's participant ids, in subject order.
        test_per_site: the first this many subjects are test and the others are shared between train and val by
            ``fractions``; None: every subject is shared between the three by ``fractions``.
        fractions: train, val and test fractions.
        rng: the site's split generator.
        phantom_subjects: the procedural phantoms' subjects (train only).
    """
    homes = {s.name: source_split(s, splits, phantom_subjects) for s in eligible}
    split_of = _planned_splits(participants, test_per_site, fractions, rng)
    pools, seen = _split_pools(eligible, site, homes, phantom_subjects)
    counts = {split: sum(v == split for v in split_of.values()) for split in SPLITS}
    report = {
        "subjects": {split: counts[split] if pools[split] else 0 for split in SPLITS},
        "left_out": {split: 0 if pools[split] else counts[split] for split in SPLITS},
        "sources": {split: [s.name for s in pools[split]] for split in SPLITS},
        "no_anatomy": {
            split: [c for c in site.contrasts if not any(s.sample.contrast == c for s in pools[split])]
            for split in SPLITS
        },
        "seen_anatomy": seen,
    }
    _log_plan(site.name, report)
    return SitePlan(site.name, split_of, pools, homes, report)


def _planned_splits(
    participants: Sequence[str],
    test_per_site: int | None,
    fractions: tuple[float, float, float],
    rng: np.random.Generator,
) -> dict[str, str]:
    if test_per_site is None:
        return share_out(participants, fractions, rng)
    tested = {p: "test" for p in participants[:test_per_site]}
    return {**tested, **share_out(participants[test_per_site:], fractions, rng, with_test=False)}


def _split_pools(
    eligible: list[Source], site: Site, homes: Mapping[str, str], phantom_subjects: set[str] | frozenset[str]
) -> tuple[dict[str, list[Source]], list[str]]:
    """Per split, the sources its subjects are drawn from; and the contrasts whose val stands in on train anatomy."""
    pools = {split: [s for s in eligible if homes[s.name] == split] for split in SPLITS}
    # test measures the site's own contrast on unseen anatomy: never borrowed, remapped images
    pools["test"] = [s for s in pools["test"] if s.borrow is None]
    seen = []
    for contrast in site.contrasts:
        if any(s.borrow is None and s.sample.contrast == contrast for s in pools["val"]):
            continue
        stand_ins = [
            s
            for s in pools["train"]
            if s.borrow is None and s.sample.contrast == contrast and s.subject not in phantom_subjects
        ]
        if stand_ins:
            pools["val"] = pools["val"] + stand_ins
            seen.append(contrast)
    return pools, seen


def _log_plan(site: str, report: Mapping[str, Any]) -> None:
    counts = ", ".join(f"{report['subjects'][split]} {split}" for split in SPLITS)
    seen = f"; val {', '.join(report['seen_anatomy'])} on train anatomy (seen)" if report["seen_anatomy"] else ""
    logger.info("%s: %s subjects by the frozen split%s", site, counts, seen)
    for split in SPLITS:
        missing = report["no_anatomy"][split]
        if missing:
            logger.warning("%s: no %s anatomy of %s in the split: no %s subject of it", site, split, missing, split)
        if report["left_out"][split]:
            logger.warning(
                "%s: its %d %s subjects are left out: the split has no %s anatomy the site can use",
                site,
                report["left_out"][split],
                split,
                split,
            )
