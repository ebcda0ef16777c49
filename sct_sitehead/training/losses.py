"""Dice + binary cross-entropy over independent sigmoid channels, masked per sample and channel, and the
lesion-wise blob term.

A partially labelled site annotates only some shared channels; its samples must neither reward nor punish the
network on the others, so every term is weighted by the (N, K) channel mask and masked entries get exactly zero
gradient.

A Dice over the whole batch is dominated by its largest lesions: a small or faint lesion missed costs little. The
blob term (Kofler et al., "blob loss", IPMI 2023) scores each reference lesion on its own: its Dice computed with
the other lesions' voxels left out, averaged over lesions, so every lesion weighs the same.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from sct_sitehead.deploy.lesions import label_lesions
from sct_sitehead.errors import TrainingError

#: Added to the Dice numerator and denominator; 1 voxel's worth, so a patch with no lesion and no prediction
#: scores close to 1 instead of a noisy 0/0.
DICE_SMOOTH = 1.0


def masked_dice_bce(
    logits: Tensor,
    targets: Tensor,
    channel_mask: Tensor,
    *,
    dice_weight: float = 1.0,
    bce_weight: float = 1.0,
    smooth: float = DICE_SMOOTH,
    positive_weight: Tensor | None = None,
) -> Tensor:
    """Soft Dice (over the batch, per channel) plus voxel-wise BCE, on annotated channels only.

    Args:
        logits: (N, K, X, Y, Z) raw scores (any float dtype; computed in float32).
        targets: (N, K, X, Y, Z) binary targets.
        channel_mask: (N, K) bool, True where sample n annotates channel k.
        dice_weight: weight of ``1 - mean Dice`` over channels annotated by at least one sample.
        bce_weight: weight of the BCE averaged over annotated (sample, channel) pairs.
        smooth: Dice smoothing term.
        positive_weight: (K,) weight of each channel's positive voxels in the BCE (its ``pos_weight``); above 1 a
            missed voxel of that channel costs more than a false one. None: 1 for every channel.

    Returns:
        Scalar loss; 0 (still attached to ``logits``) when nothing in the batch is annotated.

    Raises:
        TrainingError: shapes do not match.
    """
    if positive_weight is not None and positive_weight.shape != logits.shape[1:2]:
        raise TrainingError(
            f"positive weights {tuple(positive_weight.shape)} do not match the logits' {logits.shape[1]} channels"
        )
    if logits.shape != targets.shape or channel_mask.shape != logits.shape[:2]:
        raise TrainingError(
            f"loss inputs do not match: logits {tuple(logits.shape)}, targets {tuple(targets.shape)}, channel mask "
            f"{tuple(channel_mask.shape)} (expected (N, K) of the logits)"
        )
    logits = logits.float().flatten(2)
    targets = targets.float().flatten(2)
    weight = channel_mask.float()
    annotated = weight.sum()
    if annotated == 0:
        return logits.sum() * 0.0
    pos_weight = None if positive_weight is None else positive_weight.float().to(logits.device)[:, None]
    bce = F.binary_cross_entropy_with_logits(logits, targets, reduction="none", pos_weight=pos_weight).mean(dim=2)
    bce_loss = (bce * weight).sum() / annotated
    probs = torch.sigmoid(logits)
    intersection = ((probs * targets).sum(dim=2) * weight).sum(dim=0)
    denominator = ((probs + targets).sum(dim=2) * weight).sum(dim=0)
    dice = (2.0 * intersection + smooth) / (denominator + smooth)
    used = weight.sum(dim=0) > 0
    dice_loss = 1.0 - dice[used].mean()
    return bce_weight * bce_loss + dice_weight * dice_loss


def blob_dice(
    logits: Tensor,
    targets: Tensor,
    channel_mask: Tensor,
    channels: Sequence[int],
    *,
    smooth: float = DICE_SMOOTH,
) -> Tensor:
    """``1 -`` the mean Dice of each reference lesion (26-connected component) scored on its own.

    For lesion ``c`` of sample ``n`` and channel ``k`` the Dice is ``2 |P ∩ c| / (|P| + |c|)`` over the voxels that
    belong to no other lesion: the prediction on another lesion neither helps nor hurts ``c``, a prediction in
    the background hurts every lesion of the patch.

    Args:
        logits, targets, channel_mask: as for :func:`masked_dice_bce`.
        channels: the channels scored (the lesion channels); a masked (sample, channel) pair is skipped.
        smooth: Dice smoothing term.

    Returns:
        Scalar; 0 (still attached to ``logits``) when no scored pair holds a lesion.
    """
    logits = logits.float()
    losses = []
    marks = targets.detach().cpu().numpy() > 0.5
    for n in range(logits.shape[0]):
        for k in channels:
            if not bool(channel_mask[n, k]) or not marks[n, k].any():
                continue
            labels, count = label_lesions(marks[n, k])
            index = torch.from_numpy(labels.astype(np.int64)).to(logits.device).flatten()
            probs = torch.sigmoid(logits[n, k]).flatten()
            inside = torch.zeros(count + 1, device=logits.device).scatter_add(0, index, probs)
            sizes = torch.bincount(index, minlength=count + 1).float()
            dice = (2.0 * inside[1:] + smooth) / (inside[0] + inside[1:] + sizes[1:] + smooth)
            losses.append(1.0 - dice)
    if not losses:
        return logits.sum() * 0.0
    return torch.cat(losses).mean()
