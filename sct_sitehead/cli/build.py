"""The model-building commands of ``sct_sitehead``: phantom, simulate, train-backbone, train-head, export, publish,
evaluate and tune-thresholds.

The commands that need numpy, scipy or torch import them inside their body, so ``sct_sitehead -h`` stays fast and
the deploy commands never import torch.
"""

from __future__ import annotations

import json
from pathlib import Path
from types import ModuleType

import click

from sct_sitehead import training
from sct_sitehead.api import ALL_SITES, open_segmenter
from sct_sitehead.atomic import write_json_atomic
from sct_sitehead.cli.options import (
    offline_option,
    registry_option,
    verbosity_option,
)
from sct_sitehead.deploy.options import Options
from sct_sitehead.evaluation.splits import load_splits
from sct_sitehead.registry.publish import publish as run_publish
from sct_sitehead.settings import ModelSource, parse_sites


# --- synthetic data ---------------------------------------------------------------------------------------------
@click.command()
@click.option("-o", "out", required=True, type=click.Path(dir_okay=False, path_type=Path), help="output image")
@click.option("-shape", nargs=3, type=int, default=(64, 64, 96), show_default=True, help="voxels per axis")
@click.option("-spacing", nargs=3, type=float, default=(0.8, 0.8, 0.8), show_default=True, help="voxel size, mm")
@click.option("-orientation", default="RPI", show_default=True, help="axis codes of the voxel grid (RAS, LPI, PSR...)")
@click.option("-contrast", type=click.Choice(["T2w", "T2star", "T1w", "MTS"]), default="T2w", show_default=True)
@click.option(
    "-lesions",
    "n_lesions",
    type=click.IntRange(0, 50),
    default=3,
    show_default=True,
    help="lesions placed in the cord (lesions that touch count as one in the truth)",
)
@click.option("-oblique", "oblique_deg", type=float, default=0.0, show_default=True, help="tilt of the grid, degrees")
@click.option("-seed", type=int, default=0, show_default=True)
@verbosity_option
def phantom(
    out: Path,
    shape: tuple[int, int, int],
    spacing: tuple[float, float, float],
    orientation: str,
    contrast: str,
    n_lesions: int,
    oblique_deg: float,
    seed: int,
) -> None:
    """Write a procedural spinal cord phantom (cord, CSF, vertebrae, discs, lesions) and its ground truth."""
    # simulate/ (numpy, scipy, nibabel) loads here and in `simulate`, so `sct_sitehead -h` does not pay for it.
    from sct_sitehead.simulate import make_phantom, write_phantom

    made = make_phantom(
        tuple(shape),
        tuple(spacing),
        orientation=orientation,
        contrast=contrast,
        n_lesions=n_lesions,
        seed=seed,
        oblique_deg=oblique_deg,
    )
    written = write_phantom(made, out)
    # The files written are a report, not a result: -v 0 (quiet) leaves them out, as it does the log.
    if click.get_current_context().meta.get("verbosity", 1) > 0:
        for label, path in written.items():
            click.echo(f"{label}: {path}")


@click.command()
@click.argument("source", type=click.Path(exists=True, file_okay=False, path_type=Path))
@click.argument("out", type=click.Path(path_type=Path))
@click.option("-n", "n_per_site", type=click.IntRange(1), default=20, show_default=True, help="subjects per site")
@click.option("-seed", type=int, default=0, show_default=True)
@click.option("-sites", "sites", metavar="A,B", help="sites to simulate (default: all in the config)")
@click.option(
    "-config",
    "sites_config",
    type=click.Path(exists=True, dir_okay=False, path_type=Path),
    help="site profiles JSON (default: the packaged sites.json)",
)
@click.option(
    "-splits",
    "by_splits",
    is_flag=True,
    help="draw each subject from the anatomy of its split's persons, by the frozen split shipped with the package "
    "(sct_sitehead/evaluation/splits.json); participants.tsv says which val subjects stand in on train anatomy "
    "(seen_anatomy)",
)
@click.option(
    "-holdout",
    metavar="SUB,SUB",
    help="the older scheme, instead of -splits: source subjects whose anatomy only appears in the test split",
)
@click.option(
    "-phantoms",
    type=click.IntRange(0),
    default=0,
    show_default=True,
    help="procedural phantom anatomies added to the sources (train and val only; train only with -splits)",
)
@click.option(
    "-phantom-contrasts", metavar="A,B", help="contrasts the phantoms cycle through (default: T1w,T2star,T2w)"
)
@click.option(
    "-test-n",
    "test_per_site",
    type=click.IntRange(1),
    default=None,
    help="with -splits or -holdout: the first N subjects of each site are the test split, drawn from the held-out "
    "anatomy (default: -splits shares every subject by 70/15/15%, -holdout leaves it to chance)",
)
@click.option(
    "-real-share",
    "real_share",
    type=click.FloatRange(0.0, 1.0),
    default=None,
    help="share of a site's train/val subjects drawn from real anatomy when it also has phantoms "
    "(default: every source equally likely)",
)
@click.option(
    "-train-rotation",
    "train_rotation_deg",
    type=click.FloatRange(0.0, 90.0),
    default=None,
    help="with -splits: rotate the train subjects' anatomy by up to this many degrees instead of the site's "
    "(tilted cords cut obliquely by thick slices; val and test unchanged)",
)
@click.option(
    "-pam50",
    type=click.Path(exists=True, file_okay=False, path_type=Path),
    help="the PAM50 template folder (template/, atlas/): grey matter and tract-weighted lesion placement "
    "(default: pam50 beside SOURCE)",
)
@verbosity_option
def simulate(
    source: Path,
    out: Path,
    n_per_site: int,
    seed: int,
    sites: str | None,
    sites_config: Path | None,
    by_splits: bool,
    holdout: str | None,
    phantoms: int,
    phantom_contrasts: str | None,
    test_per_site: int | None,
    real_share: float | None,
    pam50: Path | None,
    train_rotation_deg: float | None,
) -> None:
    """Simulate a labelled multi-site lesion BIDS dataset in OUT from real anatomy with cord masks in SOURCE."""
    from sct_sitehead.simulate import simulate as run_simulation

    written = run_simulation(
        source,
        out,
        sites_config=sites_config,
        n_per_site=n_per_site,
        seed=seed,
        holdout=parse_sites(holdout) or None,
        sites=parse_sites(sites) or None,
        phantoms=phantoms,
        test_per_site=test_per_site,
        phantom_contrasts=parse_sites(phantom_contrasts) or None,
        real_share=real_share,
        pam50=pam50,
        splits=load_splits() if by_splits else None,
        train_rotation_deg=train_rotation_deg,
    )
    click.echo(f"simulated dataset: {written}")


# --- model building (torch: the `train` extra) -------------------------------------------------------------------
def _training() -> ModuleType:
    """The training package (its names import torch on first use), or a one-line hint to install the extra."""
    try:
        import torch  # noqa: F401
    except ImportError:
        raise click.ClickException(
            "training needs PyTorch: pip install torch (CPU build first), then pip install 'sct_sitehead[train]'"
        ) from None
    return training


config_option = click.option(
    "-config",
    "config",
    default="release",
    show_default=True,
    help="training config: a name in sct_sitehead/training/configs (release, smoke, tiny) or a JSON path",
)


@click.command("train-backbone")
@click.argument("data", type=click.Path(exists=True, file_okay=False, path_type=Path))
@click.argument("out", type=click.Path(file_okay=False, path_type=Path))
@config_option
@verbosity_option
def train_backbone(data: Path, out: Path, config: str) -> None:
    """Train the backbone and the universal head on every site's training cases in the BIDS folder DATA.

    Runs on CPU or CUDA; under `torchrun --nproc_per_node N` it trains with DistributedDataParallel. OUT keeps a
    resumable state: running the same command again continues where it stopped.
    """
    checkpoint = _training().train_backbone(data, out, config)
    click.echo(f"backbone: {checkpoint}")


@click.command("train-head")
@click.argument("data", type=click.Path(exists=True, file_okay=False, path_type=Path))
@click.argument("out", type=click.Path(file_okay=False, path_type=Path))
@click.option(
    "-backbone",
    "backbone",
    required=True,
    type=click.Path(exists=True, dir_okay=False, path_type=Path),
    help="backbone checkpoint from train-backbone",
)
@click.option("-site", "site", required=True, help="the site whose head to train")
@click.option(
    "-strategy",
    type=click.Choice(["finetune", "wider", "spatial"]),
    default="finetune",
    show_default=True,
    help="finetune the universal head, widen it, or widen it with a spatial gate",
)
@config_option
@verbosity_option
def train_head(data: Path, out: Path, backbone: Path, site: str, strategy: str, config: str) -> None:
    """Train one site's head on its training cases in DATA, the backbone frozen (other sites are untouched)."""
    checkpoint = _training().train_head(data, backbone, site, strategy, out, config)
    click.echo(f"head: {checkpoint}")


@click.command("export")
@click.argument("out", type=click.Path(file_okay=False, path_type=Path))
@click.option("-backbone", "backbone", required=True, type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.option(
    "-head",
    "heads",
    multiple=True,
    type=click.Path(exists=True, dir_okay=False, path_type=Path),
    help="a head checkpoint head-<site>.safetensors (repeatable); the universal head is always exported",
)
@click.option("-opset", type=click.IntRange(17), default=17, show_default=True)
@click.option("-atol", type=float, default=1e-4, show_default=True, help="ONNX Runtime vs PyTorch tolerance")
@verbosity_option
def export(out: Path, backbone: Path, heads: tuple[Path, ...], opset: int, atol: float) -> None:
    """Export the backbone and heads to ONNX in OUT, each checked against PyTorch with ONNX Runtime."""
    by_site = {}
    for path in heads:
        if not path.name.startswith("head-") or not path.name.endswith(".safetensors"):
            raise click.BadParameter(f"{path.name} is not named head-<site>.safetensors", param_hint="-head")
        by_site[path.name[len("head-") : -len(".safetensors")]] = path
    manifest = _training().export_release(backbone, by_site, out, opset=opset, atol=atol, rtol=atol)
    worst = max(manifest["check"]["max_abs_diff"].values())
    click.echo(
        f"exported backbone + {len(manifest['heads'])} heads to {out}; largest ONNX/PyTorch difference {worst:.2g}"
    )


@click.command("publish")
@click.argument("export_dir", type=click.Path(exists=True, file_okay=False, path_type=Path))
@click.argument("registry_dir", type=click.Path(file_okay=False, path_type=Path))
@click.option("-model", "model", required=True, help="model name in the registry")
@click.option("-version", "version", required=True, help="release version, e.g. 1.0.0")
@click.option("-threshold", type=click.FloatRange(0, 1, min_open=True, max_open=True), default=0.5, show_default=True)
@click.option("-site", "sites", metavar="A,B", help="heads to publish (default: every exported head)")
@click.option("-description", default="", help="model description")
@click.option("-default", "make_default", is_flag=True, help="make this the registry's default model")
@click.option("-replace", is_flag=True, help="replace an already published version with other files")
@click.option(
    "-sign",
    "sign_key",
    type=click.Path(exists=True, dir_okay=False, path_type=Path),
    help="ed25519 private key: sign the new index",
)
@click.option(
    "-thresholds",
    "thresholds_file",
    type=click.Path(exists=True, dir_okay=False, path_type=Path),
    help="per-head thresholds and smallest lesions from tune-thresholds (JSON)",
)
@click.option(
    "-localiser",
    type=click.Path(exists=True, file_okay=False, path_type=Path),
    help="export folder of a cord localiser (train-backbone -config localiser, then export)",
)
@click.option(
    "-margin",
    "margin_mm",
    type=click.FloatRange(0),
    default=12.0,
    show_default=True,
    help="mm kept around the localised cord for the lesion model",
)
@click.option(
    "-cord-margin",
    "cord_margin_mm",
    type=click.FloatRange(0),
    default=5.0,
    show_default=True,
    help="lesions further than this (mm) from the localised cord are dropped",
)
@verbosity_option
def publish(
    export_dir: Path,
    registry_dir: Path,
    model: str,
    version: str,
    threshold: float,
    sites: str | None,
    description: str,
    make_default: bool,
    replace: bool,
    sign_key: Path | None,
    thresholds_file: Path | None,
    localiser: Path | None,
    margin_mm: float,
    cord_margin_mm: float,
) -> None:
    """Add an exported release to the registry folder REGISTRY_DIR (index updated, assets copied)."""

    head_thresholds = head_min_lesion = None
    if thresholds_file is not None:
        try:
            tuned = json.loads(thresholds_file.read_text(encoding="utf-8"))["heads"]
            head_thresholds = {head: float(row["threshold"]) for head, row in tuned.items()}
            head_min_lesion = {head: float(row.get("min_lesion_mm3", 0.0)) for head, row in tuned.items()}
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise click.BadParameter(
                f"{thresholds_file}: not a tune-thresholds file ({exc})", param_hint="-thresholds"
            ) from None
    index = run_publish(
        export_dir,
        registry_dir,
        model=model,
        version=version,
        threshold=threshold,
        head_thresholds=head_thresholds,
        head_min_lesion_mm3=head_min_lesion,
        sites=parse_sites(sites) or None,
        description=description,
        make_default=make_default,
        replace=replace,
        sign_key=sign_key,
        localiser=localiser,
        localiser_margin_mm=margin_mm,
        cord_margin_mm=cord_margin_mm,
    )
    click.echo(f"published {model}@{version} in {index}")


@click.command("evaluate")
@click.argument("dataset", type=click.Path(exists=True, file_okay=False, path_type=Path))
@click.option("-o", "out", required=True, type=click.Path(file_okay=False, path_type=Path), help="report folder")
@click.option("-model", "model", metavar="NAME[@VERSION]", help="model (default: the registry's default)")
@click.option("-split", default="test", show_default=True, help="participants.tsv split to evaluate")
@click.option("-site", "sites", metavar="A,B", help="data sites to evaluate (default: all)")
@click.option(
    "-controls",
    type=click.Path(exists=True, file_okay=False, path_type=Path),
    help="BIDS folder of healthy controls (pathology HC or MildCompression): false lesions per head, for the "
    "held-out (test) persons and for every image",
)
@click.option("-threads", type=click.IntRange(1), default=None, help="CPU threads")
@click.option("-no-crop", "no_crop", is_flag=True, help="whole images, without the release's cord localiser")
@click.option(
    "-tta",
    "tta",
    is_flag=True,
    help="also run on left-right mirrored images and average (the lesion network runs twice)",
)
@registry_option
@offline_option
@verbosity_option
def evaluate(
    dataset: Path,
    out: Path,
    model: str | None,
    split: str,
    sites: str | None,
    controls: Path | None,
    threads: int | None,
    no_crop: bool,
    tta: bool,
    registry: str | None,
    offline: bool,
) -> None:
    """Evaluate every head of a release on the labelled SPLIT of DATASET: per site, per contrast and pooled, with
    95% intervals that resample persons."""
    from sct_sitehead.evaluation import evaluate as ev  # numpy: see `phantom`
    from sct_sitehead.evaluation.controls import check_controls, describe_controls, healthy_controls
    from sct_sitehead.evaluation.report import write_report

    segmenter = open_segmenter(
        ALL_SITES,
        model=model,
        options=Options(threads=threads, crop=not no_crop, mirror=tta, warn_contrast=False),
        source=ModelSource.resolve(registry, offline=offline),
    )
    release = segmenter.release
    out.mkdir(parents=True, exist_ok=True)
    cases = ev.find_cases(dataset, split, parse_sites(sites) or None)
    rows, lesion_rows = ev.evaluate_release(segmenter, cases)
    how = "cord localiser on" if segmenter.localiser is not None else "whole images"
    how += ", left-right mirroring" if tta else ""
    title = f"# {release.model}@{release.version} on {dataset.name} ({split}, {len(cases)} cases, {how})\n"
    control_rows = None
    if controls is not None:
        control_rows = describe_controls(check_controls(segmenter, healthy_controls(controls)), controls)
    click.echo("".join(write_report(out, title, rows, control_rows, lesion_rows)))


@click.command("tune-thresholds")
@click.argument("dataset", type=click.Path(exists=True, file_okay=False, path_type=Path))
@click.option("-o", "out", required=True, type=click.Path(dir_okay=False, path_type=Path), help="JSON file to write")
@click.option("-model", "model", metavar="NAME[@VERSION]", help="model (default: the registry's default)")
@click.option("-split", default="val", show_default=True, help="participants.tsv split to tune on (never test)")
@click.option("-threads", type=click.IntRange(1), default=None, help="CPU threads")
@click.option(
    "-loo",
    "leave_one_out",
    is_flag=True,
    help="leave a head at 0.5 unless its tuned threshold beats 0.5 leave-one-out on its cases",
)
@click.option(
    "-controls",
    "controls",
    type=click.Path(exists=True, file_okay=False, path_type=Path),
    default=None,
    help="real BIDS data: only settings that mark few of its healthy SPLIT persons' scans may be chosen",
)
@click.option(
    "-max-flagged",
    "max_flagged",
    type=click.FloatRange(0.0, 1.0),
    default=0.1,
    show_default=True,
    help="with -controls: the largest share of those scans a head may mark with a lesion",
)
@registry_option
@offline_option
@verbosity_option
def tune_thresholds(
    dataset: Path,
    out: Path,
    model: str | None,
    split: str,
    threads: int | None,
    leave_one_out: bool,
    controls: Path | None,
    max_flagged: float,
    registry: str | None,
    offline: bool,
) -> None:
    """Each head's threshold with the best mean Dice on its site's SPLIT cases, then its smallest lesion with the
    best lesion-wise F1 there; for `publish -thresholds`. With -controls, among the settings that mark at most
    -max-flagged of the SPLIT persons' healthy scans."""
    from sct_sitehead.evaluation import evaluate as ev  # numpy: see `phantom`
    from sct_sitehead.evaluation import thresholds
    from sct_sitehead.evaluation.controls import split_controls

    if split == "test":
        raise click.BadParameter(
            "tuning on the test split would leak it into the results; use val", param_hint="-split"
        )
    segmenter = open_segmenter(
        ALL_SITES,
        model=model,
        options=Options(threads=threads, warn_contrast=False),
        source=ModelSource.resolve(registry, offline=offline),
    )
    release = segmenter.release
    healthy: list[Path] = []
    if controls is not None:
        healthy = split_controls(controls, split)
        if not healthy:
            raise click.BadParameter(f"no healthy scan of a {split!r} person in {controls}", param_hint="-controls")
    tuned = thresholds.tune_thresholds(
        segmenter,
        ev.find_cases(dataset, split),
        leave_one_out=leave_one_out,
        controls=healthy,
        max_flagged=max_flagged,
    )
    document = {"model": release.spec, "split": split, "leave_one_out": leave_one_out, "heads": tuned}
    if controls is not None:
        document["controls"] = {"images": [p.name for p in healthy], "max_flagged": max_flagged}
    write_json_atomic(document, out)
    for head, row in sorted(tuned.items()):
        loo = "one case" if row["loo_dice"] is None else f"leave-one-out {row['loo_dice']:.3f}"
        if row["holds"] is None:
            kept = ", left at 0.5: one case" if leave_one_out else ""
        elif row["holds"] or (not leave_one_out and row["threshold"] == 0.5):
            kept = ""
        elif leave_one_out:
            kept = ", left at 0.5: the pick does not hold leave-one-out"
        else:
            kept = ", does not hold leave-one-out (-loo would leave it at 0.5)"
        click.echo(
            f"{head}: threshold {row['threshold']:.2f} (Dice {row['dice']:.3f}; {row['dice_at_0.5']:.3f} at "
            f"0.5; {loo}; {row['cases']} cases{kept}), smallest lesion {row['min_lesion_mm3']:g} mm³ "
            f"(F1 {row['f1']:.3f}; {row['f1_all_lesions']:.3f} keeping all)"
            + (
                ""
                if row["controls_met"] is None
                else f"; marks {row['controls_flagged']} of {row['controls']} healthy scans"
                + ("" if row["controls_met"] else f" (no setting marks {max_flagged:.0%} or fewer)")
            )
        )


#: Added to the ``sct_sitehead`` group by :mod:`sct_sitehead.cli.admin`.
COMMANDS = [phantom, simulate, train_backbone, train_head, export, publish, evaluate, tune_thresholds]
