"""``sct_sitehead bids BIDS_DIR OUT_DIR participant|group``: the BIDS App (the BIDS Apps convention).

``participant`` segments the anatomical images of the chosen participants into a BIDS-derivatives folder, skipping
scans already done from the same input and release (``-force`` redoes them), in this process or on Dask
(``-jobs N``, ``-scheduler tcp://HOST:PORT``); ``group`` writes the cohort table and a plot of lesion load.
"""

from __future__ import annotations

import logging
import re
import sys
from pathlib import Path

import click

from sct_sitehead.cli.options import (
    CONTEXT,
    offline_option,
    registry_option,
    trust_option,
    unsigned_option,
    verbosity_option,
)
from sct_sitehead.cohort.execute import run_cohort
from sct_sitehead.cohort.plan import fingerprint, plan_units, split_work, write_dataset_description
from sct_sitehead.cohort.scans import SUPPORTED_CONTRASTS, find_bids_scans
from sct_sitehead.cohort.table import write_group
from sct_sitehead.cohort.work import SegmenterSpec
from sct_sitehead.deploy.options import Options
from sct_sitehead.errors import UsageError
from sct_sitehead.registry.index import parse_model_spec
from sct_sitehead.settings import ModelSource, resolve_sites

logger = logging.getLogger("sct_sitehead")


def _labels(values: tuple[str, ...]) -> list[str]:
    """``-participant-label 01 -participant-label 02,03`` -> ``["01", "02", "03"]``."""
    return [label for value in values for label in re.split(r"[,\s]+", value) if label]


@click.command("bids", context_settings=CONTEXT)
@click.argument("bids_dir", type=click.Path(exists=True, file_okay=False, path_type=Path))
@click.argument("out_dir", type=click.Path(file_okay=False, path_type=Path))
@click.argument("level", type=click.Choice(["participant", "group"]))
@click.option(
    "-participant-label",
    "participants",
    multiple=True,
    metavar="LABEL[,LABEL...]",
    help="participants (comma-separated or repeated; default all)",
)
@click.option(
    "-session-label",
    "sessions",
    multiple=True,
    metavar="LABEL[,LABEL...]",
    help="sessions (comma-separated or repeated; default all)",
)
@click.option("-contrast", "contrasts", default=",".join(SUPPORTED_CONTRASTS), show_default=True, help="BIDS suffixes")
@click.option("-site", "sites", metavar="NAME[,NAME...]", help="site head(s) (default: $SCT_SITEHEAD_SITE)")
@click.option("-model", metavar="NAME[@VERSION]", help="model (default: the registry's default, latest)")
@click.option("-thr", type=float, help="probability threshold (default: the head's)")
@click.option("-min-lesion", "min_lesion", type=float, help="smallest lesion kept, mm³ (default: the head's)")
@click.option("-no-crop", is_flag=True, help="run on the whole image, not around the cord")
@click.option("-tta", is_flag=True, help="left-right test-time mirroring")
@click.option(
    "-qc", "qc_dir", type=click.Path(file_okay=False, path_type=Path), help="QC report folder (default OUT_DIR/qc)"
)
@click.option("-force", is_flag=True, help="redo scans already done")
@click.option("-jobs", type=int, help="Dask: worker processes of a local cluster (one model load each)")
@click.option("-scheduler", metavar="tcp://HOST:PORT", help="Dask: run on this existing cluster")
@click.option("-threads", type=int, help="ONNX Runtime threads per process (default: cores / jobs)")
@registry_option
@offline_option
@trust_option
@unsigned_option
@verbosity_option
def bids(
    bids_dir: Path,
    out_dir: Path,
    level: str,
    participants: tuple[str, ...],
    sessions: tuple[str, ...],
    contrasts: str,
    sites: str | None,
    model: str | None,
    thr: float | None,
    min_lesion: float | None,
    no_crop: bool,
    tta: bool,
    qc_dir: Path | None,
    force: bool,
    jobs: int | None,
    scheduler: str | None,
    threads: int | None,
    registry: str | None,
    offline: bool,
    trust: tuple[Path, ...],
    allow_unsigned: bool,
) -> None:
    """BIDS App: segment BIDS_DIR's scans into OUT_DIR (participant), or summarise them (group)."""
    if level == "group":
        table, plot, rows = write_group(out_dir)
        failed = sum(row.get("status") != "done" for row in rows)
        click.echo(f"{table} ({len(rows)} row(s), {failed} failed scan(s)); {plot}")
        return
    if jobs is not None and scheduler is not None:
        raise UsageError("-jobs starts a local cluster and -scheduler names an existing one; pick one")
    source = ModelSource.resolve(registry, offline=offline, trust=trust, allow_unsigned=allow_unsigned)
    index, _ = source.open()
    release = index.release(*(parse_model_spec(model) if model else (None, None)))
    chosen = resolve_sites(sites)
    if not chosen:
        raise UsageError(f"no site given; use -site NAME with one of: {', '.join(sorted(release.heads))}")
    for site in chosen:
        release.head(site)
    qc_dir = qc_dir if qc_dir is not None else out_dir / "qc"
    options = Options(
        threshold=thr, min_lesion_mm3=min_lesion, threads=threads, qc_dir=qc_dir, crop=not no_crop, mirror=tta
    )
    wanted = [c for c in re.split(r"[,\s]+", contrasts) if c]
    scans = find_bids_scans(
        bids_dir, participants=_labels(participants), sessions=_labels(sessions), contrasts=wanted, exclude=[out_dir]
    )
    print_ = fingerprint(release, chosen, options)
    units = plan_units(scans, out_dir, chosen)
    todo, skipped = split_work(units, out_dir, print_, force=force)
    out_dir.mkdir(parents=True, exist_ok=True)
    write_dataset_description(out_dir, bids_dir, print_)
    logger.info("%d scan(s) found, %d to run, %d already done", len(units), len(todo), len(skipped))
    spec = SegmenterSpec(tuple(chosen), model, options, source)
    summary = run_cohort(
        todo, spec, out_dir, print_, jobs=jobs, scheduler=scheduler, qc_dir=qc_dir, skipped=len(skipped)
    )
    for record in summary.failed:
        click.echo(f"failed (exit {record.get('ExitCode')}): {record.get('Error')}", err=True)
    click.echo(summary.line())
    if summary.failed:
        sys.exit(int(summary.failed[0].get("ExitCode") or 1))


COMMANDS = [bids]
