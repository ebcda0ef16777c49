"""Images synthesised from label maps during training (after SynthSeg, Billot et al., Medical Image Analysis 2023).

A patch whose case has a label map (:attr:`~sct_sitehead.training.data.Case.classes`, written by the simulator) may
have its image replaced: every tissue class gets a random mean intensity and texture, then the image is blurred and
z-scored. The network then meets the same anatomy under a new contrast every time, so it has to find the cord, its
grey matter and its lesions by shape and context: a lesion may be darker than the cord or brighter than the CSF, grey
matter may stand out or not. The usual augmentations (resolution, bias, gamma, noise, flips, affine) follow.

It costs a table look-up and one separable blur per patch, so it runs beside the training on the same cores.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from sct_sitehead.errors import TrainingError
from sct_sitehead.training.data import NO_CLASSES

#: Draws of the CSF's mean before it is put at the far end of the range from the lesion (``lesion_csf_gap``).
CSF_REDRAWS = 16


def _uniform(generator: torch.Generator, low: float, high: float) -> float:
    return low + (high - low) * float(torch.rand(1, generator=generator, dtype=torch.float64))


def class_means(generator: torch.Generator, options: Mapping[str, Any]) -> Tensor:
    """(count,) mean intensity per class in [0, 1], the lesion kept at least ``lesion_contrast[0]`` from the cord.

    The lesion's mean is the white matter's plus or minus (either sign) a uniform draw in ``lesion_contrast``, so
    lesions darker than the cord and brighter than anything else both occur; grey matter is the white matter's plus
    a uniform draw in +-``grey_matter_contrast`` (invisible to clearly visible). With ``lesion_csf_gap`` above 0 the
    CSF's mean is kept at least that far from the lesion's.
    """
    classes = options["synth_classes"]
    means = torch.rand(int(classes["count"]), generator=generator)
    white, grey, lesion = int(classes["white_matter"]), int(classes["grey_matter"]), int(classes["lesion"])
    low, high = options["lesion_contrast"]
    sign = 1.0 if float(torch.rand(1, generator=generator)) < 0.5 else -1.0
    means[lesion] = means[white] + sign * _uniform(generator, float(low), float(high))
    limit = float(options["grey_matter_contrast"])
    means[grey] = means[white] + _uniform(generator, -limit, limit)
    gap = float(options.get("lesion_csf_gap", 0.0))
    if gap > 0:
        csf = int(classes["csf"])
        for _ in range(CSF_REDRAWS):
            if abs(float(means[csf] - means[lesion])) >= gap:
                break
            means[csf] = torch.rand(1, generator=generator)[0]
        else:
            # Every draw fell near the lesion: put the CSF at the far end of [0, 1] from it.
            means[csf] = 0.0 if float(means[lesion]) > 0.5 else 1.0
    return means


def synthesize(classes: Tensor, generator: torch.Generator, options: Mapping[str, Any]) -> Tensor:
    """An image drawn from a label map.

    Args:
        classes: (1, X, Y, Z) integer tissue classes (values below ``synth_classes.count``).
        generator: CPU generator, the only randomness used.
        options: the config's ``augment`` section (``synth_classes``, ``lesion_contrast``, ``grey_matter_contrast``,
            ``synth_texture``, ``synth_blur``).

    Returns:
        (1, X, Y, Z) float32 image, z-scored over the patch.

    Raises:
        TrainingError: a class of the label map has no intensity (``synth_classes.count`` too small or unset).
    """
    count = options["synth_classes"]["count"]
    top = int(classes.max())
    if count is None or top >= int(count):
        raise TrainingError(
            f"a label map has class {top} but augment.synth_classes.count is {count}; set it to the number of classes "
            "of the simulator's label map table (simulation.json)"
        )
    index = classes.long()
    means = class_means(generator, options).to(classes.device)
    texture = float(options["synth_texture"]) * torch.rand(count, generator=generator).to(classes.device)
    noise = torch.randn(classes.shape, generator=generator).to(classes.device)
    image = means[index] + texture[index] * noise
    sigma = _uniform(generator, *(float(v) for v in options["synth_blur"]))
    if sigma > 0.05:
        image = _blur(image, sigma)
    return (image - image.mean()) / image.std().clamp_min(1e-6)


def _blur(image: Tensor, sigma: float) -> Tensor:
    """(1, X, Y, Z) -> the same, Gaussian-blurred (``sigma`` voxels) along each axis, edges replicated."""
    radius = max(1, math.ceil(2.5 * sigma))
    offsets = torch.arange(-radius, radius + 1, dtype=image.dtype, device=image.device)
    kernel = torch.exp(-0.5 * (offsets / sigma) ** 2)
    kernel /= kernel.sum()
    out = image[None]
    for axis in range(3):
        shape = [1, 1, 1, 1, 1]
        shape[2 + axis] = kernel.numel()
        pad = [0, 0, 0, 0, 0, 0]
        pad[2 * (2 - axis)] = pad[2 * (2 - axis) + 1] = radius
        out = F.conv3d(F.pad(out, pad, mode="replicate"), kernel.reshape(shape))
    return out[0]


def draw_lesions_as_labelled(classes: Tensor, lesion: Tensor, options: Mapping[str, Any]) -> Tensor:
    """A label map whose lesion class is where the training target marks a lesion, and nowhere else.

    The simulator's label map keeps every lesion it placed, on the working grid; the site's annotation keeps those
    that survive the site's grid and protocol (partial-volume threshold, smallest volume, dilation). A synthesised
    image draws the label map's lesions at a clearly visible contrast, so a placed lesion the annotation left out
    would be a visible blob labelled "no lesion". Here such voxels become white matter, and every voxel the target
    marks becomes lesion: the synthesised image shows exactly the lesions the network is asked to find.

    Args:
        classes: (1, X, Y, Z) tissue classes.
        lesion: (1, X, Y, Z) the patch's lesion target (nonzero: lesion).
        options: the config's ``augment`` section (``synth_classes``).

    Returns:
        (1, X, Y, Z) tissue classes, a new tensor.
    """
    names = options["synth_classes"]
    white, mark = int(names["white_matter"]), int(names["lesion"])
    marked = lesion > 0
    out = torch.where((classes == mark) & ~marked, torch.full_like(classes, white), classes)
    return torch.where(marked, torch.full_like(classes, mark), out)


def has_classes(classes: Tensor) -> bool:
    """Whether a patch's label map is real (its case has one)."""
    return bool((classes != NO_CLASSES).all())
