"""The experiment behind the release: universal vs per-site heads, separate models, label-space construction
and a new site's learning curve, all evaluated through the deploy path (see reports/README.md).

Modules: :mod:`.plan` (settings, data needs, models and comparisons; no torch), :mod:`.runner` (train, export,
publish; torch inside functions), :mod:`.scoring` (ONNX Runtime evaluation and summaries), :mod:`.report`
(tables and plots), :mod:`.run` (the whole sequence). ``bin/run_experiments`` calls :func:`main`.
"""

from __future__ import annotations

import sys
from pathlib import Path

import click

CONTEXT = {"help_option_names": ["-h", "--help"], "max_content_width": 110}


def _default_source() -> Path:
    from sct_sitehead import env

    return env.data_dir() or Path(__file__).resolve().parents[2] / "shared" / "data" / "bids"


@click.command(context_settings=CONTEXT)
@click.option("-config", "config", default=None, help="training config name or JSON path [experiment; -quick: tiny]")
@click.option(
    "-work",
    "work",
    type=click.Path(file_okay=False, path_type=Path),
    default=None,
    help="work folder, resumable [work/experiment; -quick: work/experiment-quick]",
)
@click.option(
    "-out",
    "out",
    type=click.Path(file_okay=False, path_type=Path),
    default=None,
    help="report folder [reports/experiment; -quick: WORK/report]",
)
@click.option(
    "-seeds",
    "seeds",
    type=click.IntRange(1),
    default=None,
    help="training seeds of the head comparison [3; -quick: 2]; the other comparisons use seed 0",
)
@click.option("-quick", is_flag=True, help="everything on the tiny config and a tiny dataset (a test, not results)")
@click.option(
    "-data",
    "data",
    type=click.Path(exists=True, file_okay=False, path_type=Path),
    default=None,
    help="use this simulated dataset instead of simulating one into WORK/sim",
)
@click.option(
    "-source",
    "source",
    type=click.Path(exists=True, file_okay=False, path_type=Path),
    default=None,
    help="real BIDS anatomy to simulate from [$SCT_SITEHEAD_DATA or ../shared/data/bids]",
)
@click.option(
    "-threads",
    "threads",
    type=click.IntRange(1),
    default=None,
    help="CPU threads in all: shared by the training jobs, all of them for evaluation [2; -quick: 1]",
)
@click.option(
    "-jobs",
    "jobs",
    type=click.IntRange(1),
    default=None,
    help="models trained at once, in worker processes [2; -quick: 1]",
)
@click.option("-plan", "plan_only", is_flag=True, help="print the models that would be trained, and stop")
@click.option(
    "-v", "verbosity", type=click.IntRange(0, 2), default=1, show_default=True, help="0 quiet, 1 info, 2 debug"
)
def command(config, work, out, seeds, quick, data, source, threads, jobs, plan_only, verbosity) -> None:
    """Train every arm of the experiment, evaluate it through the deploy path, and write the report."""
    from experiments.plan import make_settings
    from experiments.run import run_experiment
    from sct_sitehead.cli.logs import configure_logging

    configure_logging(verbosity)
    settings = make_settings(
        quick=quick,
        work=work,
        out=out,
        seeds=seeds,
        config=config or (None if quick else "experiment"),
        data=data,
        source=source or _default_source(),
        threads=threads,
        jobs=jobs,
    )
    path = run_experiment(settings, plan_only=plan_only, verbosity=verbosity)
    if not plan_only:
        click.echo(f"report: {path}")


def main(argv: list[str] | None = None) -> int:
    """Entry point of ``bin/run_experiments``; errors of the package map to their exit codes."""
    from sct_sitehead.errors import SiteHeadError

    try:
        command.main(args=argv, prog_name="run_experiments", standalone_mode=False)
        return 0
    except click.ClickException as exc:
        exc.show()
        return 2
    except click.exceptions.Exit as exc:
        return exc.exit_code
    except SiteHeadError as exc:
        sys.stderr.write(f"run_experiments: error: {exc}\n")
        return exc.exit_code


__all__ = ["main", "command"]
