"""``sct_sitehead``: models, cache and registry administration, and the model-building commands.

The commands that need numpy, scipy or torch (phantom, simulate, evaluate, the model-building ones) import
them inside their body, so ``sct_sitehead -h`` stays fast and the deploy commands never import torch.
"""

from __future__ import annotations

import json
import logging
import sys
import traceback
from pathlib import Path
from types import ModuleType

import click

from sct_sitehead import env, training
from sct_sitehead.api import ALL_SITES, open_segmenter
from sct_sitehead.atomic import write_json_atomic
from sct_sitehead.cli.logs import configure_logging
from sct_sitehead.deploy.options import Options
from sct_sitehead.errors import EXIT_INTERRUPTED, IntegrityError, SiteHeadError, UsageError
from sct_sitehead.registry.asset_names import name_cached_assets
from sct_sitehead.registry.cache import Cache
from sct_sitehead.registry.index import parse_model_spec
from sct_sitehead.registry.publish import publish as run_publish
from sct_sitehead.registry.server import serve
from sct_sitehead.registry.signing import generate_keypair, sign_index
from sct_sitehead.settings import ModelSource, parse_sites
from sct_sitehead.version import __version__

logger = logging.getLogger("sct_sitehead")

# -help as well: sct_deepseg_lesion and SCT's other tools take single-dash long options.
CONTEXT = {"help_option_names": ["-h", "-help", "--help"], "max_content_width": 110}


def _verbosity(ctx: click.Context, _param: click.Parameter, value: int) -> int:
    configure_logging(value)
    ctx.meta["verbosity"] = value
    return value


verbosity_option = click.option(
    "-v",
    "verbosity",
    type=click.IntRange(0, 2),
    default=1,
    show_default=True,
    expose_value=False,
    callback=_verbosity,
    is_eager=True,
    help="0 quiet, 1 info, 2 debug (and tracebacks)",
)
registry_option = click.option(
    "-registry", "registry", metavar="URL_OR_PATH", help="registry index (default: embedded)"
)
offline_option = click.option("-offline", is_flag=True, help="no network at all: use the cache only")


trust_option = click.option(
    "-trust",
    "trust",
    multiple=True,
    type=click.Path(exists=True, dir_okay=False, path_type=Path),
    help="also trust this ed25519 public key (repeatable)",
)
unsigned_option = click.option(
    "-allow-unsigned", "allow_unsigned", is_flag=True, help="accept an unsigned remote registry index"
)


@click.group(context_settings=CONTEXT)
@click.version_option(__version__, "-version", prog_name="sct_sitehead")
def cli() -> None:
    """Shared-backbone, per-site-head lesion models: fetch, cache, serve, build and evaluate them."""


# --- models ---------------------------------------------------------------------------------------------------
@cli.group()
def models() -> None:
    """List and pre-fetch models."""


@models.command("list")
@registry_option
@offline_option
@trust_option
@unsigned_option
@verbosity_option
def models_list(registry: str | None, offline: bool, trust: tuple[Path, ...], allow_unsigned: bool) -> None:
    """List models, their releases and their sites."""
    index, _ = ModelSource.resolve(registry, offline=offline, trust=trust, allow_unsigned=allow_unsigned).open()
    for name in index.models():
        for version in index.versions(name):
            release = index.release(name, version)
            default = " (default)" if name == index.default_model else ""
            click.echo(f"{name}@{version}{default}: sites {', '.join(sorted(release.heads))}")


@models.command("install")
@click.argument("model", required=False)
@click.option("-site", "sites", metavar="A,B", help="site heads to fetch (default: all of the release's)")
@registry_option
@trust_option
@unsigned_option
@verbosity_option
def models_install(
    model: str | None, sites: str | None, registry: str | None, trust: tuple[Path, ...], allow_unsigned: bool
) -> None:
    """Pre-fetch MODEL[@VERSION] (backbone and site heads) into the cache, for later offline use."""
    source = ModelSource.resolve(registry, trust=trust, allow_unsigned=allow_unsigned)
    index, cache = source.open()
    name, version = parse_model_spec(model) if model else (None, None)
    release = index.release(name, version)
    wanted = parse_sites(sites) or sorted(release.heads)
    heads = [release.head(site) for site in wanted]
    progress = sys.stderr.isatty()
    allow_http = source.allow_http
    path = cache.fetch(release.backbone, offline=False, progress=progress, allow_http=allow_http)
    click.echo(f"backbone {release.backbone.sha256[:12]} {path}")
    if release.localiser is not None:
        for asset in (release.localiser.backbone, release.localiser.head):
            path = cache.fetch(asset, offline=False, progress=progress, allow_http=allow_http)
            click.echo(f"{asset.name} {asset.sha256[:12]} {path}")
    for head in heads:
        path = cache.fetch(head.asset, offline=False, progress=progress, allow_http=allow_http)
        click.echo(f"{head.site} {head.asset.sha256[:12]} {path}")
    click.echo(f"{release.model}@{release.version}: {len(heads)} site(s) cached in {cache.root}")


# --- cache ----------------------------------------------------------------------------------------------------
@cli.group()
def cache() -> None:
    """Inspect, verify and clean the model cache."""


@cache.command("dir")
def cache_dir() -> None:
    """Print the cache folder ($SCT_SITEHEAD_CACHE or the platform user cache)."""
    click.echo(str(env.cache_dir()))


@cache.command("list")
@verbosity_option
def cache_list() -> None:
    """List cached assets: sha256, size, path, and what each is (model, version, backbone, localiser or site head),
    from the embedded index and the cached copies of remote indexes."""
    cache = Cache(env.cache_dir())
    entries = cache.list()
    names = name_cached_assets(cache.root, [entry["sha256"] for entry in entries])
    for entry in entries:
        click.echo(f"{entry['sha256']}  {entry['size']:>12}  {entry['path']}  {names[entry['sha256']]}")
    click.echo(f"{len(entries)} asset(s), {sum(e['size'] for e in entries)} bytes")


@cache.command("verify")
@verbosity_option
def cache_verify() -> None:
    """Re-hash every cached asset; remove the ones that do not match their name."""
    bad = Cache(env.cache_dir()).verify()
    for path in bad:
        click.echo(f"removed corrupt asset {path}")
    click.echo("all cached assets verified" if not bad else f"{len(bad)} corrupt asset(s) removed")
    if bad:
        sys.exit(IntegrityError.exit_code)


@cache.command("clean")
@verbosity_option
def cache_clean() -> None:
    """Delete every cached asset and index copy (the next run downloads again)."""
    freed = Cache(env.cache_dir()).clean()
    click.echo(f"freed {freed} bytes")


# --- registry -------------------------------------------------------------------------------------------------
@cli.group()
def registry() -> None:
    """Host and check release registries."""


@registry.command("serve")
@click.argument("directory", type=click.Path(exists=True, file_okay=False, path_type=Path))
@click.option("-port", default=8000, show_default=True, help="TCP port")
@click.option("-host", default="127.0.0.1", show_default=True, help="address to listen on")
@verbosity_option
def registry_serve(directory: Path, port: int, host: str) -> None:
    """Serve DIRECTORY (a registry index and its assets) over HTTP, with Range support, as a site mirror."""
    click.echo(f"serving {directory} on http://{host}:{port}/ (Ctrl-C to stop)")
    serve(directory, port=port, host=host)


@registry.command("keygen")
@click.argument("private", type=click.Path(dir_okay=False, path_type=Path))
@click.argument("public", type=click.Path(dir_okay=False, path_type=Path))
@click.option("-force", is_flag=True, help="replace existing key files")
@verbosity_option
def registry_keygen(private: Path, public: Path, force: bool) -> None:
    """Make an ed25519 key pair for signing registry indexes (keep PRIVATE secret; give PUBLIC to sites)."""
    key_id = generate_keypair(private, public, force=force)
    click.echo(f"key {key_id}: private {private} (keep it secret), public {public}")


@registry.command("sign")
@click.argument("index", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.option(
    "-key",
    "key",
    required=True,
    type=click.Path(exists=True, dir_okay=False, path_type=Path),
    help="ed25519 private key (PEM)",
)
@verbosity_option
def registry_sign(index: Path, key: Path) -> None:
    """Sign a registry index: writes INDEX.sig next to it."""
    click.echo(f"signature: {sign_index(index, key)}")


# --- synthetic data -------------------------------------------------------------------------------------------
@cli.command()
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


@cli.command()
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
@click.option("-holdout", metavar="SUB,SUB", help="source subjects whose anatomy only appears in the test split")
@click.option(
    "-phantoms",
    type=click.IntRange(0),
    default=0,
    show_default=True,
    help="procedural phantom anatomies added to the sources (train and val only)",
)
@click.option(
    "-phantom-contrasts", metavar="A,B", help="contrasts the phantoms cycle through (default: T1w,T2star,T2w)"
)
@click.option(
    "-test-n",
    "test_per_site",
    type=click.IntRange(1),
    default=None,
    help="with -holdout: subjects per site drawn from the held-out anatomy (default: left to chance)",
)
@click.option(
    "-real-share",
    "real_share",
    type=click.FloatRange(0.0, 1.0),
    default=None,
    help="share of a site's train/val subjects drawn from real anatomy when it also has phantoms "
    "(default: every source equally likely)",
)
@verbosity_option
def simulate(
    source: Path,
    out: Path,
    n_per_site: int,
    seed: int,
    sites: str | None,
    sites_config: Path | None,
    holdout: str | None,
    phantoms: int,
    phantom_contrasts: str | None,
    test_per_site: int | None,
    real_share: float | None,
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


@cli.command("train-backbone")
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


@cli.command("train-head")
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


@cli.command("export")
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


@cli.command("publish")
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


@cli.command("evaluate")
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

    segmenter = open_segmenter(
        ALL_SITES,
        model=model,
        options=Options(threads=threads, crop=not no_crop, mirror=tta),
        source=ModelSource.resolve(registry, offline=offline),
    )
    release = segmenter.release
    out.mkdir(parents=True, exist_ok=True)
    cases = ev.find_cases(dataset, split, parse_sites(sites) or None)
    rows = ev.evaluate_release(segmenter, cases)
    how = "cord localiser on" if segmenter.localiser is not None else "whole images"
    how += ", left-right mirroring" if tta else ""
    title = f"# {release.model}@{release.version} on {dataset.name} ({split}, {len(cases)} cases, {how})\n"
    control_rows = None
    if controls is not None:
        control_rows = ev.describe_controls(ev.check_controls(segmenter, ev.healthy_controls(controls)), controls)
    report = ev.write_report(out, title, rows, control_rows)
    click.echo("".join(report))


@cli.command("tune-thresholds")
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
    registry: str | None,
    offline: bool,
) -> None:
    """Each head's threshold with the best mean Dice on its site's SPLIT cases, then its smallest lesion with the
    best lesion-wise F1 there; for `publish -thresholds`."""
    from sct_sitehead.evaluation import evaluate as ev  # numpy: see `phantom`

    if split == "test":
        raise click.BadParameter(
            "tuning on the test split would leak it into the results; use val", param_hint="-split"
        )
    segmenter = open_segmenter(
        ALL_SITES, model=model, options=Options(threads=threads), source=ModelSource.resolve(registry, offline=offline)
    )
    release = segmenter.release
    tuned = ev.tune_thresholds(segmenter, ev.find_cases(dataset, split), leave_one_out=leave_one_out)
    write_json_atomic({"model": release.spec, "split": split, "leave_one_out": leave_one_out, "heads": tuned}, out)
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
        )


def main(argv: list[str] | None = None) -> int:
    """Entry point; maps the package's errors to the exit codes documented in the README."""
    try:
        cli.main(args=argv, prog_name="sct_sitehead", standalone_mode=False)
        return 0
    except click.UsageError as exc:
        if type(exc).__name__.startswith("NoArgsIsHelp"):  # a bare group invocation shows its help, exit 0
            click.echo(exc.format_message())
            return 0
        sys.stderr.write(f"sct_sitehead: error: {exc.format_message()} (see -h)\n")
        return UsageError.exit_code
    except click.exceptions.Exit as exc:
        return exc.exit_code
    except click.ClickException as exc:
        sys.stderr.write(f"sct_sitehead: error: {exc.format_message()}\n")
        return exc.exit_code
    except SystemExit as exc:
        return int(exc.code or 0)
    except SiteHeadError as exc:
        if logging.getLogger("sct_sitehead").level <= logging.DEBUG:
            traceback.print_exc()
        sys.stderr.write(f"sct_sitehead: error: {exc}\n")
        return exc.exit_code
    except (KeyboardInterrupt, click.exceptions.Abort):
        sys.stderr.write("sct_sitehead: interrupted\n")
        return EXIT_INTERRUPTED


if __name__ == "__main__":
    sys.exit(main())
