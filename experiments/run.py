"""The whole experiment in order: data, training, export and publication, evaluation, report.

Every step leaves its output in the work folder and is skipped when that output exists, so an interrupted run
is resumed by running the same command again (training jobs also resume mid-way from their state files).
"""

from __future__ import annotations

import datetime as dt
import logging
import platform
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from experiments import report, runner, scoring
from experiments.plan import (
    Plan,
    Settings,
    base_config,
    curve_order,
    make_plan,
    predicted_splits,
    read_splits,
    scored_split,
    short_of,
    subjects_per_site,
)
from sct_sitehead.errors import UsageError
from sct_sitehead.version import __version__

logger = logging.getLogger(__name__)

REPO = Path(__file__).resolve().parents[1]


def prepare_data(settings: Settings) -> dict[str, dict[str, str]]:
    """Simulate the dataset unless it exists (or ``-data`` names one); its splits, checked for the plan."""
    if settings.data is None and not (settings.sim / "participants.tsv").is_file():
        n = subjects_per_site(settings)
        runner.simulate_data(settings, n)
    if not (settings.sim / "participants.tsv").is_file():
        raise UsageError(
            f"{settings.sim} is not a simulated dataset (no participants.tsv); run `sct_sitehead "
            "simulate` or leave -data out"
        )
    splits = read_splits(settings.sim)
    missing = [s for s in settings.sites if s not in splits]
    if missing:
        raise UsageError(f"the dataset {settings.sim} has no site {missing}; simulate them or choose other sites")
    problems = short_of({s: splits[s] for s in settings.sites}, settings, scored_split(settings.sim))
    curve_short = [p for p in problems if p.startswith(f"{settings.new_site}:") and "learning" in p]
    if curve_short:
        raise UsageError(f"{curve_short[0]}; simulate more subjects per site or shorten the curve")
    for problem in problems:
        logger.warning("data: %s; intervals will be wide", problem)
    return splits


def check_work_folder(settings: Settings, base: Mapping[str, Any]) -> None:
    """Refuse a work folder made with another config or data: its finished steps would be reused silently.
    More seeds or curve points are fine (they only add models and heads)."""
    config = runner.json_roundtrip(base)
    config["train"]["threads"] = None  # threads change speed, not results
    identity = {
        "config": config,
        "sites": list(settings.sites),
        "new_site": settings.new_site,
        "data": str(settings.sim.resolve()),
        "data_seed": settings.data_seed,
        "holdout": list(settings.holdout),
        "exporter": settings.exporter,
    }
    path = settings.work / "experiment.json"
    stored = runner.read_json(path)
    if stored is None:
        runner.write_json(identity, path)
    elif stored != runner.json_roundtrip(identity):
        changed = sorted(k for k in identity if stored.get(k) != runner.json_roundtrip(identity[k]))
        raise UsageError(
            f"{settings.work} was made with other settings ({', '.join(changed)} differ, see {path}); "
            "use another -work folder, or delete this one to start again"
        )


def describe_plan(plan: Plan, base: Mapping[str, Any]) -> str:
    """One line per model: its sites, label mode, seed and heads, with the step counts."""
    lines = []
    steps = head_steps = 0
    for model in plan.models:
        trained = [h for h in model.heads if h.steps != 0]
        steps += int(base["train"]["steps"])
        head_steps += len(trained) * int(base["head"]["steps"])
        lines.append(
            f"{model.key}: {len(model.sites)} site(s), labels {model.mode}, seed {model.seed}, "
            f"{len(model.heads)} head(s) ({len(trained)} trained)"
        )
    lines.append(
        f"total: {len(plan.models)} backbones x {base['train']['steps']} steps = {steps} steps, {head_steps} head steps"
    )
    return "\n".join(lines)


def train_all(settings: Settings, plan: Plan, base: Mapping[str, Any], verbosity: int = 1) -> None:
    """Train every model; with ``jobs`` > 1, that many models at once in worker processes (one model's
    backbone and heads stay in one worker), the longest first."""
    if settings.jobs <= 1:
        for model in plan.models:
            runner.train_model(settings, model, base)
        return
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor

    def work(model: Any) -> float:
        trained = [h for h in model.heads if h.steps != 0]
        return base["train"]["steps"] + len(trained) * base["head"]["steps"] / 2

    order = sorted(plan.models, key=work, reverse=True)
    context = multiprocessing.get_context("spawn")  # no fork of a process that may hold threads
    with ProcessPoolExecutor(
        settings.jobs, mp_context=context, initializer=_worker_logging, initargs=(verbosity,)
    ) as pool:
        for future in [pool.submit(runner.train_model, settings, model, base) for model in order]:
            future.result()


def _worker_logging(verbosity: int) -> None:
    from sct_sitehead.cli.logs import configure_logging

    configure_logging(verbosity)


def run_experiment(settings: Settings, *, plan_only: bool = False, verbosity: int = 1) -> Path:
    """Run (or resume) everything and write the report; returns ``report.md`` (or prints the plan)."""
    import dataclasses

    from sct_sitehead.evaluation import evaluate as ev

    base = base_config(settings)
    if plan_only:  # from the predicted splits when there is no dataset yet: nothing is simulated or written
        sim = settings.sim / "participants.tsv"
        splits = read_splits(settings.sim) if sim.is_file() else predicted_splits(settings, subjects_per_site(settings))
        print(describe_plan(make_plan(settings, curve_order(splits, settings)), base))
        return settings.out
    check_work_folder(settings, base)
    splits = prepare_data(settings)
    plan = make_plan(settings, curve_order(splits, settings))
    runner.preprocess(settings, base)
    train_all(settings, plan, base, verbosity)
    for model in plan.models:
        runner.export_and_publish(settings, model)
    cases = ev.find_cases(settings.sim, scored_split(settings.sim), list(settings.sites))
    rows = []
    for key, heads_by_site in plan.needed().items():
        rows += scoring.evaluate_model(settings, key, heads_by_site, cases)
    index = scoring.index_rows(rows)
    subjects = scoring.subjects_by_site(cases)
    persons = scoring.persons_by_subject(cases)
    entries = {c.name: scoring.summarize_comparison(c, index, subjects, persons) for c in plan.comparisons}
    keys = [m.key for m in plan.models]
    costs = runner.costs(settings, keys)
    cost_rows = [report.variant_cost(c, v, costs) for c in plan.comparisons if c.name != "curve" for v in c.variants]
    out = settings.out
    out.mkdir(parents=True, exist_ok=True)
    report.write_tables(out, plan, entries, cost_rows, rows)
    for comparison in plan.comparisons:
        if comparison.name == "curve":
            report.plot_curve(comparison, entries["curve"], out / "learning_curve.png")
        else:
            report.plot_bars(comparison, entries[comparison.name], out / f"dice_{comparison.name}.png")
    runner.write_json(
        {
            "settings": settings.as_dict(),
            "base_config": base,
            "jobs": runner.job_configs(settings, keys),
            "seeds": {c.name: list(c.seeds) for c in plan.comparisons},
            "data": {"splits": splits},
            "git": runner.version_of_git(REPO, settings.out),
            "sct_sitehead": __version__,
            "python": platform.python_version(),
            "torch": _torch_version(),
            "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
            "plan": [dataclasses.asdict(m) for m in plan.models],
        },
        out / "configs_used.json",
    )
    path = out / "report.md"
    from sct_sitehead.atomic import write_text_atomic

    write_text_atomic(document(settings, plan, base, splits, entries, cost_rows, costs), path)
    return path


def _torch_version() -> str | None:
    try:
        import torch
    except ImportError:
        return None
    return str(torch.__version__)


def _versus_release(base: Mapping[str, Any]) -> str:
    """How the training config compares with the release's (the experiment config is the smaller one)."""
    from sct_sitehead.training.config import load_config

    release = load_config("release")
    ours, theirs = base["train"], release["train"]
    size = (
        "the same size as"
        if ours["steps"] * ours["batch_size"] >= theirs["steps"] * theirs["batch_size"]
        else "smaller than"
    )
    return (
        f"This config is {size} the release's: backbone {ours['steps']} steps x batch {ours['batch_size']} "
        f"per job ({ours['threads']} thread(s)) vs {theirs['steps']} x {theirs['batch_size']} per process on "
        f"2 DDP processes; heads {base['head']['steps']} vs {release['head']['steps']} steps; architecture "
        f"{base['model']['features']} vs {release['model']['features']}. Conclusions are about the methods, "
        "not the release's absolute numbers.\n"
    )


def _data_table(settings: Settings, splits: Mapping[str, Mapping[str, str]]) -> str:
    lines = ["| site | train | val | test |", "|---|---|---|---|"]
    for site in settings.sites:
        counts = {k: sum(v == k for v in splits[site].values()) for k in ("train", "val", "test")}
        lines.append(f"| {site} | {counts['train']} | {counts['val']} | {counts['test']} |")
    return "\n".join(lines) + "\n"


def _scored_text(settings: Settings) -> str:
    """What the figures are scored on, and over what the intervals resample."""
    if scored_split(settings.sim) == "val":
        return (
            f"Scored on the val split of `{settings.sim}`: simulated subjects of persons no training job sees. Its "
            "test split is the release's frozen test split (`simulate -splits`), never scored here. Mean [bootstrap "
            "95% CI, persons resampled]; "
        )
    return (
        f"Test split: simulated subjects whose anatomy comes from {', '.join(settings.holdout)} only (never seen in "
        "training). Mean [bootstrap 95% CI, persons resampled]; "
    )


def document(
    settings: Settings,
    plan: Plan,
    base: Mapping[str, Any],
    splits: Mapping[str, Mapping[str, str]],
    entries: Mapping[str, Sequence[Mapping[str, Any]]],
    cost_rows: Sequence[Mapping[str, Any]],
    costs: Mapping[str, Mapping[str, Any]],
) -> str:
    """``report.md``."""
    git = runner.version_of_git(REPO, settings.out)
    train, head = base["train"], base["head"]
    parts = [
        "# Shared backbone + site heads: experiment report\n",
        f"Generated by `bin/run_experiments -config {settings.config} -seeds {settings.seeds}"
        f"{' -quick' if settings.quick else ''}` at commit `{(git['commit'] or 'unknown')[:12]}`"
        f"{' (with local changes)' if git['dirty'] else ''}. Training config `{settings.config}`: "
        f"features {base['model']['features']}, backbone {train['steps']} steps of batch {train['batch_size']} "
        f"x {train['patch_size']} patches, heads {head['steps']} steps"
        f"{' (the tiny test config: numbers mean nothing)' if settings.quick else ''}; see configs_used.json. "
        "Every number comes through the deploy path: ONNX export, publication into the work registry, "
        "`pipeline.Segmenter` (ONNX Runtime) on the native grid, scored against the site's own annotation.\n",
        _scored_text(settings)
        + "ΔDice is paired over the same cases. F1 = lesion-wise F1, per case (any-voxel and 10%-overlap rules); "
        "AVD = absolute volume difference.\n",
        _versus_release(base),
        "## Data\n",
        _data_table(settings, splits),
    ]
    for comparison in plan.comparisons:
        seeds = f"{len(comparison.seeds)} seed(s): {list(comparison.seeds)}"
        parts.append(f"## {comparison.title}\n\n{seeds}. Table `{comparison.name}.tsv`; ")
        if comparison.name == "curve":
            parts[-1] += "plot `learning_curve.png`.\n"
            parts.append(report.curve_table(comparison, entries["curve"], costs))
            parts.append("\nAll rows, every metric:\n")
        else:
            parts[-1] += f"plot `dice_{comparison.name}.png`.\n"
        parts.append(report.comparison_table(comparison, entries[comparison.name]))
    parts += [
        "## Cost\n",
        "Training wall time on this machine (all sites, mean over seeds; including the shared backbone) and "
        "parameter counts (every network a deployment of all sites needs; 'one more site' = what adding a "
        "site trains: nothing for the universal head, one head, or one whole model).\n",
        report.cost_table(cost_rows),
    ]
    return "\n".join(parts)
