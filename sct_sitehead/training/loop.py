"""The optimisation loop shared by backbone and head training: sampling, augmentation, AdamW, schedule,
mixed precision, DistributedDataParallel, periodic resumable state, and a final check that all ranks agree.

Randomness is a function of ``(seed, step, rank)`` only, so an interrupted run resumed from its state file draws
the same batches and ends with the same weights as an uninterrupted one.
"""

from __future__ import annotations

import json
import logging
import math
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from sct_sitehead.errors import TrainingError
from sct_sitehead.training.augment import augment_batch
from sct_sitehead.training.checkpoint import load_checkpoint, save_checkpoint, weights_digest
from sct_sitehead.training.data import Case, case_weights, sample_batch
from sct_sitehead.training.distributed import Context, barrier, gather, mean_over_ranks
from sct_sitehead.training.losses import blob_dice, masked_dice_bce

logger = logging.getLogger(__name__)


@dataclass
class Job:
    """One training run.

    Attributes:
        name: file stem of its state and log files (``"backbone"``, ``"head-siteA"``).
        module: maps (N, 1, X, Y, Z) images to (N, K, X, Y, Z) logits.
        trainable: the sub-module whose parameters are optimised and saved (the whole ``module`` or the head).
        steps, lr, warmup_steps: the optimisation length, peak learning rate and linear warm-up.
        signature: what a state file must match to be resumed (architecture, labels, strategy...).
        lesion_channels: the output channels that carry a site's ``lesion`` label (the blob term's).
    """

    name: str
    module: nn.Module
    trainable: nn.Module
    steps: int
    lr: float
    warmup_steps: int
    signature: dict[str, Any] = field(default_factory=dict)
    lesion_channels: tuple[int, ...] = ()


@dataclass
class Result:
    """What a finished run reports: steps done, last logged loss, and each rank's weights digest."""

    steps: int
    loss: float | None
    digests: list[str]
    seconds: float


def learning_rate(step: int, steps: int, peak: float, warmup: int, schedule: str) -> float:
    """Linear warm-up over ``warmup`` steps, then ``poly`` ((1 - t)^0.9, nnU-Net) or ``cosine`` decay to 0."""
    if warmup > 0 and step < warmup:
        return peak * (step + 1) / warmup
    span = max(1, steps - warmup)
    progress = min(1.0, (step - warmup) / span)
    if schedule == "cosine":
        return peak * 0.5 * (1.0 + math.cos(math.pi * progress))
    return peak * (1.0 - progress) ** 0.9


def _resume(job: Job, optimizer: torch.optim.Optimizer, path: Path) -> int:
    model, meta, optim = load_checkpoint(path, kind="state")
    if meta.get("signature") != json.loads(json.dumps(job.signature)):
        raise TrainingError(
            f"{path} was saved by a different run ({meta.get('signature')} vs {job.signature}); delete it or set "
            "train.resume to false to start again"
        )
    job.trainable.load_state_dict(model)
    if optim is not None:
        optimizer.load_state_dict(optim)
    logger.info("resumed %s at step %d from %s", job.name, meta["step"], path)
    return int(meta["step"])


def _save_state(job: Job, optimizer: torch.optim.Optimizer, path: Path, step: int) -> None:
    meta = {"kind": "state", "name": job.name, "step": step, "signature": job.signature}
    save_checkpoint(path, job.trainable.state_dict(), meta, optimizer.state_dict())


def lesion_positive_weight(lesion_channels: Sequence[int], channels: int, weight: float) -> torch.Tensor | None:
    """The BCE's positive weight per output channel: ``weight`` on the lesion channels, 1 elsewhere; None when
    ``weight`` is 1 or there is no lesion channel (the plain loss)."""
    if weight == 1.0 or not lesion_channels:
        return None
    weights = torch.ones(channels)
    weights[list(lesion_channels)] = weight
    return weights


def lesion_targets(
    labels: np.ndarray, masks: np.ndarray, lesion_channels: Sequence[int], device: torch.device
) -> list[torch.Tensor | None]:
    """Per sample of a batch, its (1, X, Y, Z) lesion target (the union of the lesion channels its case labels), or
    None where its case has no lesion label. ``labels``: (B, K, X, Y, Z); ``masks``: (B, K)."""
    out: list[torch.Tensor | None] = []
    for label, mask in zip(labels, masks):
        known = [channel for channel in lesion_channels if mask[channel] > 0]
        out.append(torch.from_numpy(label[known].max(axis=0, keepdims=True)).to(device) if known else None)
    return out


def fit(
    job: Job,
    cases: Sequence[Case],
    targets: Sequence[tuple[np.ndarray, np.ndarray]],
    config: Mapping[str, Any],
    ctx: Context,
    out_dir: Path,
    site_weights: Mapping[str, float] | None = None,
) -> Result:
    """Train ``job.trainable`` on this rank's ``cases``; rank 0 writes ``<name>.state.safetensors`` and
    ``<name>.log.jsonl`` in ``out_dir``. ``site_weights`` (``train.site_weights``) weights the cases' draws.

    Raises:
        TrainingError: a non-finite loss, an incompatible state file, or ranks ending with different weights.
    """
    train = config["train"]
    module = job.module.to(ctx.device)
    params = [p for p in job.trainable.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=job.lr, weight_decay=float(train["weight_decay"]))
    state_path = out_dir / f"{job.name}.state.safetensors"
    start = _resume(job, optimizer, state_path) if train["resume"] and state_path.is_file() else 0
    runner: nn.Module = module
    if ctx.distributed:
        runner = DistributedDataParallel(module, device_ids=[ctx.device.index] if ctx.device.type == "cuda" else None)
    use_amp = bool(train["amp"]) and ctx.device.type == "cuda"
    scaler = torch.amp.GradScaler("cuda", enabled=use_amp)
    log_path = out_dir / f"{job.name}.log.jsonl"
    seed, every, save_every = int(train["seed"]), int(train["log_every"]), int(train["checkpoint_every"])
    weights = case_weights(cases, site_weights or {})
    blob_weight = float(train["blob_weight"])
    # Every case's channel mask has one entry per output channel: the weights are built once, not per step.
    channels = int(targets[0][1].shape[0]) if targets else 0
    positive_weight = lesion_positive_weight(job.lesion_channels, channels, float(train["lesion_weight"]))
    if positive_weight is not None:
        positive_weight = positive_weight.to(ctx.device)
    synth = float(config["augment"].get("synth", 0.0)) > 0 and any(case.classes is not None for case in cases)
    drawn_as_labelled = synth and bool(config["augment"].get("synth_lesions_as_labelled", False))
    window: list[float] = []
    last_loss = None
    started = time.perf_counter()
    runner.train()
    for step in range(start, job.steps):
        rng = np.random.default_rng([seed, step, ctx.rank])
        crops: list[np.ndarray] | None = [] if synth else None
        images, labels, masks = sample_batch(
            cases,
            targets,
            train["patch_size"],
            int(train["batch_size"]),
            rng,
            float(train["lesion_fraction"]),
            weights,
            crops,
        )
        generator = torch.Generator().manual_seed(int(rng.integers(2**62)))
        image_t, label_t = augment_batch(
            torch.from_numpy(images).to(ctx.device),
            torch.from_numpy(labels).to(ctx.device),
            generator,
            config["augment"],
            torch.from_numpy(np.stack(crops)).to(ctx.device) if crops else None,
            lesion_targets(labels, masks, job.lesion_channels, ctx.device) if crops and drawn_as_labelled else None,
        )
        mask_t = torch.from_numpy(masks).to(ctx.device)
        for group in optimizer.param_groups:
            group["lr"] = learning_rate(step, job.steps, job.lr, job.warmup_steps, train["schedule"])
        with torch.autocast(ctx.device.type, dtype=torch.float16, enabled=use_amp):
            logits = runner(image_t)
        loss = masked_dice_bce(logits, label_t, mask_t, positive_weight=positive_weight)
        if blob_weight > 0:
            loss = loss + blob_weight * blob_dice(logits, label_t, mask_t, job.lesion_channels)
        if not torch.isfinite(loss):
            raise TrainingError(
                f"{job.name}: loss is {loss.item()} at step {step}; lower the learning rate ({job.lr}) or check the "
                "images for extreme values"
            )
        optimizer.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        scaler.step(optimizer)
        scaler.update()
        window.append(float(loss.detach()))
        done = step + 1
        if done % every == 0 or done == job.steps:
            last_loss = mean_over_ranks(float(np.mean(window)), ctx)
            window = []
            if ctx.is_main:
                entry = {
                    "step": done,
                    "loss": last_loss,
                    "lr": optimizer.param_groups[0]["lr"],
                    "seconds": round(time.perf_counter() - started, 3),
                }
                with log_path.open("a", encoding="utf-8") as handle:
                    handle.write(json.dumps(entry) + "\n")
                logger.info("%s step %d/%d loss %.4f lr %.2e", job.name, done, job.steps, last_loss, entry["lr"])
        if ctx.is_main and (done % save_every == 0 or done == job.steps):
            _save_state(job, optimizer, state_path, done)
    barrier(ctx)
    digests = gather(weights_digest(job.trainable), ctx)
    if len(set(digests)) != 1:
        raise TrainingError(f"{job.name}: ranks ended with different weights {digests}; report this as a bug")
    return Result(job.steps, last_loss, digests, time.perf_counter() - started)
