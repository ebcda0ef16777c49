"""What the experiment trains and compares: settings, the data it needs, the models and the comparisons.

Pure data and numpy: nothing here imports torch or ONNX Runtime, so ``-plan`` and the tests of the plan are fast.

A *model* is one backbone + universal head trained on some sites (``ModelSpec``), with the site heads trained on
it (``HeadJob``). A *comparison* is a list of *variants*; a variant names, per site and seed, which model and
which of its heads a site's test cases go through (``Variant.model`` and ``Variant.head`` are templates over
``{site}`` and ``{seed}``).
"""

from __future__ import annotations

import copy
import csv
import json
import zlib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from sct_sitehead.errors import UsageError

HEAD_STRATEGIES = ("finetune", "wider", "spatial")
#: Every model is published as this version of a registry model named after it.
VERSION = "1.0.0"
UNIVERSAL = "universal"
#: Splits of the simulated data, as ``simulate`` makes them (train/val/test; held-out anatomy -> test).
SPLIT_FRACTIONS = (0.7, 0.15, 0.15)


@dataclass(frozen=True)
class Settings:
    """Everything that decides what is run; written to ``configs_used.json``."""

    config: str
    work: Path
    out: Path
    source: Path
    data: Path | None = None
    seeds: int = 3
    quick: bool = False
    threads: int = 2
    jobs: int = 2
    exporter: str = "dynamo"
    sites: tuple[str, ...] = ()
    new_site: str = "london"
    curve: tuple[int, ...] = (1, 2, 4, 8, 16)
    curve_strategies: tuple[str, ...] = ("finetune", "wider")
    data_seed: int = 0
    holdout: tuple[str, ...] = ("sub-unf01", "sub-tut05")
    min_test: int = 10
    min_n: int = 40
    overrides: Mapping[str, Any] = field(default_factory=dict)

    @property
    def sim(self) -> Path:
        """The simulated dataset: ``data`` when given, else ``<work>/sim``."""
        return self.data if self.data is not None else self.work / "sim"

    def as_dict(self) -> dict[str, Any]:
        return {k: (str(v) if isinstance(v, Path) else v) for k, v in self.__dict__.items()}


#: ``-quick``: the tiny config, two sites, a two-point learning curve, torchscript export (10x faster).
QUICK = dict(
    config="tiny",
    seeds=2,
    threads=1,
    jobs=1,
    exporter="torchscript",
    sites=("montreal", "london"),
    curve=(1, 2),
    min_test=1,
    min_n=4,
    overrides={
        "input": {"patch_size": [32, 32, 32]},
        "labels": {
            "grouping": {"lesion": ["lesion"], "cord": ["cord"], "csf": ["csf"]},
            "suffixes": {"lesion": "lesion-manual", "cord": ["seg-manual", "seg"], "csf": "csf-manual"},
        },
    },
)


def make_settings(*, quick: bool, work: Path | None, out: Path | None, seeds: int | None, **given: Any) -> Settings:
    """Full-experiment defaults, or :data:`QUICK` ones; explicit arguments (not None) win."""
    from sct_sitehead.simulate.sites import load_sites

    values: dict[str, Any] = dict(QUICK) if quick else {}
    values.update({k: v for k, v in given.items() if v is not None})
    if seeds is not None:
        values["seeds"] = seeds
    work = Path(work or ("work/experiment-quick" if quick else "work/experiment"))
    out = Path(out or (work / "report" if quick else "reports/experiment"))
    values.setdefault("sites", tuple(sorted(load_sites())))
    settings = Settings(work=work, out=out, quick=quick, **values)
    if settings.new_site not in settings.sites:
        raise UsageError(f"new site {settings.new_site!r} is not among the sites {list(settings.sites)}")
    if settings.seeds < 1 or settings.jobs < 1:
        raise UsageError(f"-seeds is {settings.seeds} and -jobs {settings.jobs}; use 1 or more")
    return settings


# --- configs ----------------------------------------------------------------------------------------------------
def base_config(settings: Settings) -> dict[str, Any]:
    """The named training config with the settings' overrides (section by section) and the threads of one
    training job (``threads`` shared among ``jobs`` parallel jobs)."""
    from sct_sitehead.training.config import check_config, load_config

    config = load_config(settings.config)
    for section, values in settings.overrides.items():
        config[section].update(copy.deepcopy(dict(values)))
    config["train"]["threads"] = max(1, settings.threads // settings.jobs)
    check_config(config)
    return config


def meaning_grouping() -> dict[str, list[str]]:
    """Grouping by meaning when the config has none: every label the simulator knows is its own channel."""
    from sct_sitehead.simulate.sites import KNOWN_LABELS

    return {name: [name] for name in KNOWN_LABELS}


# --- models and heads -------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class HeadJob:
    """One site head to train on a model. ``steps`` 0 keeps the universal head's weights (the site then reads
    its own channels of the pooled model); None uses the config's ``head.steps``."""

    name: str
    site: str
    strategy: str
    steps: int | None = None
    subjects: tuple[str, ...] | None = None


@dataclass(frozen=True)
class ModelSpec:
    """A backbone + universal head trained on ``sites`` with label mode ``mode`` and seed ``seed``."""

    key: str
    sites: tuple[str, ...]
    mode: str
    seed: int
    heads: tuple[HeadJob, ...] = ()

    def config(self, base: Mapping[str, Any]) -> dict[str, Any]:
        """The backbone's training config."""
        config = copy.deepcopy(dict(base))
        config["train"].update(seed=self.seed, sites=list(self.sites), subjects=None)
        config["labels"]["mode"] = self.mode
        if self.mode == "grouping" and not config["labels"]["grouping"]:
            config["labels"]["grouping"] = meaning_grouping()
        return config

    def head_config(self, base: Mapping[str, Any], head: HeadJob) -> dict[str, Any]:
        """A head's training config: the backbone's, restricted to the head's site (and subjects)."""
        config = self.config(base)
        config["train"].update(sites=[head.site], subjects=list(head.subjects) if head.subjects else None)
        if head.steps is not None:
            config["head"]["steps"] = head.steps
        return config


@dataclass(frozen=True)
class Variant:
    """One arm of a comparison: per site and seed, ``model`` and ``head`` (templates over {site}, {seed})."""

    name: str
    model: str
    head: str
    strategy: str | None = None
    n: int | None = None

    def pick(self, site: str, seed: int) -> tuple[str, str]:
        return self.model.format(site=site, seed=seed), self.head.format(site=site, seed=seed)


@dataclass(frozen=True)
class Comparison:
    """Variants evaluated on the test cases of ``sites`` with each of ``seeds``; deltas are against ``baseline``."""

    name: str
    title: str
    variants: tuple[Variant, ...]
    sites: tuple[str, ...]
    seeds: tuple[int, ...]
    baseline: str


@dataclass(frozen=True)
class Plan:
    models: tuple[ModelSpec, ...]
    comparisons: tuple[Comparison, ...]
    curve_subjects: tuple[str, ...]

    def model(self, key: str) -> ModelSpec:
        return next(m for m in self.models if m.key == key)

    def needed(self) -> dict[str, dict[str, set[str]]]:
        """``{model key: {site: heads}}``: what the comparisons evaluate."""
        needed: dict[str, dict[str, set[str]]] = {}
        for comparison in self.comparisons:
            for variant in comparison.variants:
                for seed in comparison.seeds:
                    for site in comparison.sites:
                        key, head = variant.pick(site, seed)
                        needed.setdefault(key, {}).setdefault(site, set()).add(head)
        return needed


def make_plan(settings: Settings, curve_subjects: Sequence[str]) -> Plan:
    """Every model to train and every comparison to report (see reports/README.md for what each arm is)."""
    sites, new = settings.sites, settings.new_site
    seeds = tuple(range(settings.seeds))
    models = [
        ModelSpec(
            f"pooled-grouping-s{seed}",
            sites,
            "grouping",
            seed,
            tuple(HeadJob(f"{site}.{s}", site, s) for site in sites for s in HEAD_STRATEGIES),
        )
        for seed in seeds
    ]
    for mode in ("size", "merged"):
        own = tuple(HeadJob(f"{site}.own", site, "finetune", steps=0) for site in sites)
        models.append(ModelSpec(f"pooled-{mode}-s0", sites, mode, 0, own))
    curve = tuple(
        HeadJob(f"{new}.{strategy}.n{n:02d}", new, strategy, subjects=tuple(curve_subjects[:n]))
        for strategy in settings.curve_strategies
        for n in settings.curve
    )
    models.append(ModelSpec(f"pooled-minus-{new}-s0", tuple(s for s in sites if s != new), "grouping", 0, curve))
    models += [ModelSpec(f"separate-{site}-s0", (site,), "size", 0) for site in sites]

    grouping = "pooled-grouping-s{seed}"
    comparisons = [
        Comparison(
            "heads",
            "Site heads on one shared backbone (grouping by meaning)",
            (
                Variant("universal", grouping, UNIVERSAL),
                *(Variant(s, grouping, "{site}." + s, strategy=s) for s in HEAD_STRATEGIES),
            ),
            sites,
            seeds,
            "universal",
        ),
        Comparison(
            "separate",
            "Separate full per-site models (upper bound) vs the shared backbone",
            (
                Variant("separate", "separate-{site}-s0", UNIVERSAL),
                Variant("shared+wider", "pooled-grouping-s0", "{site}.wider", strategy="wider"),
                Variant("shared universal", "pooled-grouping-s0", UNIVERSAL),
            ),
            sites,
            (0,),
            "separate",
        ),
        Comparison(
            "labels",
            "Label-space construction: one pooled model, each site read through its own channels",
            (
                Variant("size-ranked", "pooled-size-s0", "{site}.own"),
                Variant("grouping", "pooled-grouping-s0", UNIVERSAL),
                Variant("merged", "pooled-merged-s0", "{site}.own"),
            ),
            sites,
            (0,),
            "size-ranked",
        ),
        Comparison(
            "curve",
            f"New site {new}: head trained on n labelled subjects, backbone without {new}",
            (
                Variant("n=0 universal", f"pooled-minus-{new}-s0", UNIVERSAL, n=0),
                *(
                    Variant(f"{s} n={n}", f"pooled-minus-{new}-s0", f"{new}.{s}.n{n:02d}", strategy=s, n=n)
                    for s in settings.curve_strategies
                    for n in settings.curve
                ),
                Variant(f"{new} in backbone, wider, all", "pooled-grouping-s0", f"{new}.wider", strategy="wider"),
            ),
            (new,),
            (0,),
            "n=0 universal",
        ),
    ]
    return Plan(tuple(models), tuple(comparisons), tuple(curve_subjects))


# --- data ---------------------------------------------------------------------------------------------------------
def predicted_splits(settings: Settings, n: int, samples: Sequence[Any] | None = None) -> dict[str, dict[str, str]]:
    """``{site: {participant: split}}`` that ``simulate`` would write with ``n`` subjects per site, computed
    without simulating: each subject's source is the first draw of its generator, as in the simulator.
    ``samples``: the source images with a cord mask (read from ``settings.source`` when None)."""
    from sct_sitehead.simulate import selection, simulator
    from sct_sitehead.simulate.sites import load_sites

    profiles = load_sites()
    # The simulator's own helpers, so the prediction cannot drift from what it writes.
    if samples is None:
        samples = simulator._sources(settings.source)
    out = {}
    for name in settings.sites:
        eligible = [s for s in samples if s.contrast in profiles[name].contrasts]
        chosen = []
        for number in range(1, n + 1):
            rng = simulator.subject_rng(settings.data_seed, name, number)
            chosen.append((f"sub-{name}{number:03d}", eligible[int(rng.integers(len(eligible)))]))
        split_rng = np.random.default_rng([settings.data_seed, zlib.crc32(name.encode()), 0])
        out[name] = selection.holdout_splits(chosen, list(settings.holdout), SPLIT_FRACTIONS, split_rng)
    return out


def scored_split(sim: Path) -> str:
    """The split the arms are scored on: ``val`` for a dataset simulated by the frozen split (``simulate -splits``,
    whose test split is held out for the release and scored once per shipped release), else ``test``."""
    meta = sim / "simulation.json"
    try:
        frozen = "persons" in (json.loads(meta.read_text(encoding="utf-8")).get("splits") or {})
    except (OSError, ValueError, AttributeError):
        frozen = False
    return "val" if frozen else "test"


def short_of(splits: Mapping[str, Mapping[str, str]], settings: Settings, split: str = "test") -> list[str]:
    """What the splits lack: fewer than ``min_test`` subjects of the scored ``split`` at a site, or too few
    training subjects of the new site for the learning curve."""
    problems = []
    for site, table in splits.items():
        tests = sum(v == split for v in table.values())
        if tests < settings.min_test:
            problems.append(f"{site}: {tests} {split} subjects < {settings.min_test}")
    trains = sum(v == "train" for v in splits.get(settings.new_site, {}).values())
    if trains < max(settings.curve):
        problems.append(f"{settings.new_site}: {trains} training subjects < {max(settings.curve)} (learning curve)")
    return problems


def subjects_per_site(settings: Settings, limit: int = 400) -> int:
    """The smallest n >= ``min_n`` whose splits satisfy :func:`short_of`."""
    from sct_sitehead.simulate import simulator

    samples = simulator._sources(settings.source)
    for n in range(settings.min_n, limit + 1):
        if not short_of(predicted_splits(settings, n, samples), settings):
            return n
    raise UsageError(f"no n <= {limit} subjects per site gives {settings.min_test} test subjects at every site")


def read_splits(sim: Path) -> dict[str, dict[str, str]]:
    """``{site: {participant: split}}`` of a simulated dataset."""
    with (sim / "participants.tsv").open(newline="", encoding="utf-8") as handle:
        rows = list(csv.DictReader(handle, delimiter="\t"))
    out: dict[str, dict[str, str]] = {}
    for row in rows:
        out.setdefault(row["site"], {})[row["participant_id"]] = row.get("split") or "test"
    return out


def curve_order(splits: Mapping[str, Mapping[str, str]], settings: Settings) -> list[str]:
    """The new site's training subjects in a fixed random order; the first n train the n-subject head, so the
    subsets are nested (1 within 2 within 4 ...)."""
    train = sorted(p for p, split in splits[settings.new_site].items() if split == "train")
    rng = np.random.default_rng([settings.data_seed, zlib.crc32(b"curve")])
    return [train[i] for i in rng.permutation(len(train))]
