"""``train_backbone`` and ``train_head``: the two training entry points behind ``sct_sitehead train-*``.

The backbone trains with the ``universal`` head on every site's cases pooled, in the shared label space (each
sample's loss masked to its own labels). A site head then trains on that site alone with the backbone frozen
(``requires_grad`` off, eval mode), so adding a site never changes the backbone or another site's head.
Both run as one process or under ``torchrun`` (see :mod:`.distributed`); rank 0 writes every file.
"""

from __future__ import annotations

import csv
import json
import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from sct_sitehead.errors import TrainingError
from sct_sitehead.evaluation.bids import read_bids
from sct_sitehead.training.arch import Arch
from sct_sitehead.training.checkpoint import load_checkpoint, save_checkpoint, weights_digest
from sct_sitehead.training.config import load_config
from sct_sitehead.training.data import Case, prepare_cases
from sct_sitehead.training.distributed import Context, barrier, setup
from sct_sitehead.training.heads import STRATEGIES, UNIVERSAL_STRATEGY, Head, build_head
from sct_sitehead.training.labels import LabelSpace, build_label_space, measure_label_sizes
from sct_sitehead.training.loop import Job, Result, fit
from sct_sitehead.training.unet import Backbone, UNet

logger = logging.getLogger(__name__)

BACKBONE_FILE = "backbone.safetensors"


def head_file(site: str) -> str:
    """File name of a site head's checkpoint."""
    return f"head-{site}.safetensors"


class FrozenBackboneHead(nn.Module):
    """Image -> logits through a frozen backbone and a trainable head; the backbone stays in eval mode."""

    def __init__(self, backbone: Backbone, head: Head) -> None:
        super().__init__()
        self.backbone = backbone.requires_grad_(False).eval()
        self.head = head

    def train(self, mode: bool = True) -> FrozenBackboneHead:
        super().train(mode)
        self.backbone.eval()
        return self

    def forward(self, image: Tensor) -> Tensor:
        """(N, 1, X, Y, Z) -> (N, K, X, Y, Z) logits."""
        with torch.no_grad():
            features = self.backbone(image)
        return self.head.logits(features)


def _samples(data: Path | str | Sequence[Any], config: Mapping[str, Any]) -> list[Any]:
    if not isinstance(data, (str, Path)):
        return list(data)
    labels = config["labels"]
    samples, problems = read_bids(Path(data), label_suffixes=labels["suffixes"], labels_dir=labels["derivatives"])
    if problems:
        logger.warning("%d problem(s) reading %s; the affected files were left out", len(problems), data)
    train = config["train"]
    split = train["split"]
    chosen = _in_split(Path(data), split) if split else None
    kept = samples if chosen is None else [s for s in samples if s.subject in chosen]
    if chosen is not None:
        logger.info("split %r: %d of %d images", split, len(kept), len(samples))
    for key, field in (("sites", "site"), ("subjects", "subject")):
        if train[key] is not None:
            wanted = set(train[key])
            kept = [s for s in kept if getattr(s, field) in wanted]
            logger.info("train.%s %s: %d images left", key, sorted(wanted), len(kept))
    return kept


def _in_split(root: Path, split: str) -> set[str] | None:
    """Participants whose ``split`` column in participants.tsv is ``split``; None without such a column."""
    table = root / "participants.tsv"
    if not table.is_file():
        return None
    with table.open(newline="", encoding="utf-8") as handle:
        rows = list(csv.DictReader(handle, delimiter="\t"))
    if not rows or "split" not in rows[0]:
        return None
    return {row["participant_id"].strip() for row in rows if (row.get("split") or "").strip() == split}


def _cases(
    samples: Sequence[Any],
    spec: Mapping[str, Any],
    out_dir: Path,
    ctx: Context,
    label_maps: Mapping[Path, Path] | None = None,
) -> list[Case]:
    """Rank 0 preprocesses into the cache first; the other ranks then read it."""
    cache = out_dir / "cache"
    if ctx.is_main:
        cases = prepare_cases(samples, spec, cache, label_maps)
    barrier(ctx)
    if not ctx.is_main:
        cases = prepare_cases(samples, spec, cache, label_maps)
    return cases


def label_maps(data: Path | str | Sequence[Any], samples: Sequence[Any], suffix: str | None) -> dict[Path, Path]:
    """Each sample's label map, ``derivatives/truth/<its folders>/<stem>_<suffix>.nii.gz`` of a BIDS folder.

    Raises:
        TrainingError: ``suffix`` is set and a sample has no such file (a dataset simulated before label maps).
    """
    if suffix is None or not isinstance(data, (str, Path)):
        return {}
    root, found, missing = Path(data), {}, []
    for sample in samples:
        image = Path(sample.image)
        stem = image.name[: -len(".nii.gz")] if image.name.endswith(".nii.gz") else image.stem
        path = root / "derivatives" / "truth" / image.parent.relative_to(root) / f"{stem}_{suffix}.nii.gz"
        if path.is_file():
            found[image] = path
        else:
            missing.append(path)
    if missing:
        raise TrainingError(
            f"{len(missing)} image(s) have no label map, e.g. {missing[0]}; simulate the data again "
            "(sct_sitehead simulate writes them) or set labels.label_map to null"
        )
    return found


def with_class_count(config: dict[str, Any], data: Path | str | Sequence[Any]) -> dict[str, Any]:
    """``config`` with ``augment.synth_classes.count`` set, when null, from the dataset's label map table
    (``simulation.json``'s ``label_map.classes``: the largest class + 1); unchanged without synthesis or table."""
    classes = config["augment"]["synth_classes"]
    if classes["count"] is not None or not config["labels"]["label_map"] or not isinstance(data, (str, Path)):
        return config
    table = Path(data) / "simulation.json"
    try:
        names = json.loads(table.read_text(encoding="utf-8"))["label_map"]["classes"]
        count = max(int(value) for value in names) + 1
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise TrainingError(
            f"{table}: no label map table to count the synthesis classes by ({exc}); set augment.synth_classes.count"
        ) from exc
    config["augment"]["synth_classes"] = {**classes, "count": count}
    return config


def contrasts_of(samples: Sequence[Any]) -> list[str]:
    """The contrasts (BIDS suffixes, e.g. ``["T2star", "T2w"]``) of the samples that become training cases: those
    with a label, as :func:`~sct_sitehead.training.data.prepare_cases` keeps. Recorded in each head's checkpoint
    and carried into its registry entry, so the deploy path can warn about an image of another contrast."""
    return sorted({str(sample.contrast) for sample in samples if sample.labels and getattr(sample, "contrast", None)})


def _shard(cases: list[Case], space: LabelSpace, ctx: Context) -> tuple[list[Case], list[Any]]:
    """This rank's cases (every ``world_size``-th) with their shared-channel targets."""
    mine = cases[ctx.rank :: ctx.world_size]
    if not mine:
        raise TrainingError(
            f"{len(cases)} case(s) cannot be shared among {ctx.world_size} processes; use fewer processes"
        )
    return mine, [space.targets(case.site, case.labels) for case in mine]


def _prepare(config: Mapping[str, Any] | str | Path) -> tuple[dict[str, Any], Context]:
    config = load_config(config)
    train = config["train"]
    if train["threads"]:
        torch.set_num_threads(int(train["threads"]))
    ctx = setup(train["device"])
    torch.manual_seed(int(train["seed"]))
    return config, ctx


@dataclass
class BackboneSetup:
    """What backbone training runs on: the config with its class count, the samples, the preprocessed cases,
    their shared label space and the U-Net's architecture (:func:`backbone_setup`)."""

    config: dict[str, Any]
    samples: list[Any]
    cases: list[Case]
    space: LabelSpace
    arch: Arch


def backbone_setup(data: Path | Sequence[Any], config: dict[str, Any], out_dir: Path, ctx: Context) -> BackboneSetup:
    """Read and preprocess (into ``out_dir/cache``) the labelled cases of ``data`` for ``config``, and derive the
    label space and architecture; shared by :func:`train_backbone` and ``bin/benchmark_training``.

    Raises:
        TrainingError: ``train.site_weights`` names a site without a training case, or no labelled case.
    """
    config = with_class_count(config, data)
    out_dir.mkdir(parents=True, exist_ok=True)
    samples = _samples(data, config)
    # Checked before preprocessing, which can take minutes: the labelled samples are the cases to be.
    sites = {sample.site for sample in samples if sample.labels}
    weighted = sorted(set(config["train"]["site_weights"]) - sites)
    if weighted:
        raise TrainingError(
            f"train.site_weights names {weighted}, which have no training case; the sites are {sorted(sites)}"
        )
    cases = _cases(samples, config["input"], out_dir, ctx, label_maps(data, samples, config["labels"]["label_map"]))
    sizes = measure_label_sizes([(case.site, case.labels) for case in cases])
    space = build_label_space(sizes, config["labels"]["grouping"], config["labels"]["mode"])
    return BackboneSetup(config, list(samples), cases, space, Arch.from_config(config, space.channels))


def train_backbone(data: Path | Sequence[Any], out_dir: Path, config: Mapping[str, Any] | str | Path) -> Path:
    """Train the backbone and the ``universal`` head on every site's labelled cases.

    Args:
        data: a BIDS folder (read with :func:`bids.read_bids`) or a list of :class:`bids.Sample`.
        out_dir: work folder: preprocessed cache, resumable state, log, and the checkpoint.
        config: a config dict, a name in ``training/configs`` or a JSON path (see :mod:`.config`).

    Returns:
        ``out_dir/backbone.safetensors`` (also returned, unwritten, on ranks other than 0).

    Raises:
        TrainingError: no labelled case, bad config, incompatible state file, diverging training.
    """
    config, ctx = _prepare(config)
    out_dir = Path(out_dir)
    setup_ = backbone_setup(data, config, out_dir, ctx)
    config, samples, cases, space, arch = setup_.config, setup_.samples, setup_.cases, setup_.space, setup_.arch
    spec = config["input"]
    model = UNet(arch)
    mine, targets = _shard(cases, space, ctx)
    train = config["train"]
    job = Job(
        "backbone",
        model,
        model,
        int(train["steps"]),
        float(train["lr"]),
        int(train["warmup_steps"]),
        signature={"arch": arch.to_dict(), "labels": space.site_maps, "input": spec, **_loss_signature(train)},
        lesion_channels=tuple(sorted({m["lesion"] for m in space.site_maps.values() if "lesion" in m})),
    )
    result = fit(job, mine, targets, config, ctx, out_dir, train["site_weights"])
    path = out_dir / BACKBONE_FILE
    if ctx.is_main:
        meta = {
            "kind": "backbone",
            "arch": arch.to_dict(),
            "label_space": space.to_json(),
            "input": spec,
            "config": config,
            "backbone_sha256": weights_digest(model.backbone),
            "contrasts": contrasts_of(samples),
            **_provenance(result, len(cases)),
        }
        save_checkpoint(path, model.cpu().state_dict(), meta)
        logger.info("backbone checkpoint %s (%d cases, %d sites)", path, len(cases), len(space.site_maps))
    barrier(ctx)
    return path


def _loss_signature(train: Mapping[str, Any]) -> dict[str, Any]:
    """The loss settings a state file must match to be resumed; empty for the plain loss, so state files saved
    before the blob term existed still resume."""
    signature: dict[str, Any] = {}
    if float(train["blob_weight"]) > 0:
        signature["blob_weight"] = float(train["blob_weight"])
    if float(train["lesion_weight"]) != 1.0:
        signature["lesion_weight"] = float(train["lesion_weight"])
    return signature


def _provenance(result: Result, n_cases: int) -> dict[str, Any]:
    return {
        "steps": result.steps,
        "final_loss": result.loss,
        "rank_digests": result.digests,
        "cases": n_cases,
        "seconds": round(result.seconds, 1),
        "torch": torch.__version__,
    }


def load_backbone(path: Path) -> tuple[UNet, dict[str, Any]]:
    """The U-Net (backbone + universal head) of a backbone checkpoint and its metadata.

    Raises:
        TrainingError: not a backbone checkpoint, or weights that do not fit its architecture.
    """
    state, meta, _ = load_checkpoint(path, kind="backbone")
    model = UNet(Arch.from_dict(meta["arch"]))
    try:
        model.load_state_dict(state)
    except RuntimeError as exc:
        raise TrainingError(f"{path}: weights do not fit the stored architecture ({exc}); re-train it") from exc
    return model.eval(), meta


def train_head(
    data: Path | Sequence[Any],
    backbone_ckpt: Path,
    site: str,
    strategy: str,
    out_dir: Path,
    config: Mapping[str, Any] | str | Path,
) -> Path:
    """Train one site's head on that site's cases, the backbone frozen.

    The site may be one the backbone never saw: its labels are then ranked into the backbone's channels by the
    same rule (:meth:`LabelSpace.with_site`). Preprocessing follows the backbone's input spec, not ``config``'s.

    Args:
        data: a BIDS folder or a list of samples; only samples of ``site`` are used.
        backbone_ckpt: from :func:`train_backbone`.
        site: the site's name.
        strategy: ``"finetune"``, ``"wider"`` or ``"spatial"`` (see :mod:`.heads`).
        out_dir: work folder.
        config: as for :func:`train_backbone`; the ``head`` section sets steps and learning rate.

    Returns:
        ``out_dir/head-<site>.safetensors``.

    Raises:
        TrainingError: unknown strategy, no labelled case of the site, more labels than channels, or the backbone
            changing during training.
    """
    if strategy not in STRATEGIES:
        raise TrainingError(f"unknown head strategy {strategy!r}; choose one of {list(STRATEGIES)}")
    config, ctx = _prepare(config)
    config = with_class_count(config, data)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    unet, meta = load_backbone(Path(backbone_ckpt))
    space = LabelSpace.from_json(meta["label_space"])
    spec = meta["input"]
    samples = _samples(data, config)
    chosen = [s for s in samples if s.site == site]
    if not chosen:
        sites = sorted({s.site for s in samples})
        raise TrainingError(f"no sample of site {site!r} in the data (sites: {sites}); check the site name")
    cases = _cases(chosen, spec, out_dir, ctx, label_maps(data, chosen, config["labels"]["label_map"]))
    space = space.with_site(site, measure_label_sizes([(c.site, c.labels) for c in cases])[site])
    head = build_head(strategy, unet.head, config)
    model = FrozenBackboneHead(unet.backbone, head)
    mine, targets = _shard(cases, space, ctx)
    options = config["head"]
    job = Job(
        f"head-{site}",
        model,
        head,
        int(options["steps"]),
        float(options["lr"]),
        int(options["warmup_steps"]),
        signature={
            "backbone": meta["backbone_sha256"],
            "site": site,
            "strategy": strategy,
            "head": head.describe(),
            "labels": space.label_map(site),
            **_loss_signature(config["train"]),
        },
        lesion_channels=tuple(channel for label, channel in space.label_map(site).items() if label == "lesion"),
    )
    result = fit(job, mine, targets, config, ctx, out_dir)
    if weights_digest(unet.backbone) != meta["backbone_sha256"]:
        raise TrainingError(f"the backbone changed while training head {site!r}; report this as a bug")
    path = out_dir / head_file(site)
    if ctx.is_main:
        save_checkpoint(
            path,
            head.cpu().state_dict(),
            {
                "kind": "head",
                "site": site,
                "strategy": strategy,
                "head": head.describe(),
                "labels": space.label_map(site),
                "label_sizes": space.sizes.get(site, {}),
                "backbone_sha256": meta["backbone_sha256"],
                "contrasts": contrasts_of(chosen),
                "input": spec,
                "config": config,
                **_provenance(result, len(cases)),
            },
        )
        logger.info("head %s (%s) checkpoint %s", site, strategy, path)
    barrier(ctx)
    return path


def universal_meta(meta: Mapping[str, Any]) -> dict[str, Any]:
    """Head-checkpoint-like metadata of the universal head inside a backbone checkpoint."""
    space = LabelSpace.from_json(meta["label_space"])
    return {
        "site": "universal",
        "strategy": UNIVERSAL_STRATEGY,
        "labels": space.label_map("universal"),
        "backbone_sha256": meta["backbone_sha256"],
        "contrasts": meta.get("contrasts"),  # every contrast of the backbone's cases; None before they were recorded
    }
