"""Batch augmentation in torch, on the training device: spatial, intensity, resolution and artefacts
(Gibbs ringing, motion-like ghosting, Rician noise).

Every random number comes from one ``torch.Generator`` on the CPU, so a seed gives the same augmentation on any
device. Images and targets go through the same spatial transform; targets are resampled linearly and
re-thresholded at 0.5. Intensity changes act on the image only; the resolution change (downsample then upsample
along one axis, like a thick-slice acquisition) too, since the annotation describes the true anatomy.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from sct_sitehead.training.synth import draw_lesions_as_labelled, has_classes, synthesize


def _uniform(generator: torch.Generator, low: float, high: float, size: int = 1) -> Tensor:
    return low + (high - low) * torch.rand(size, generator=generator, dtype=torch.float64)


def _happens(generator: torch.Generator, probability: float) -> bool:
    return float(torch.rand(1, generator=generator)) < probability


def _optional_happens(generator: torch.Generator, options: Mapping[str, Any], key: str) -> bool:
    """``_happens`` for an augmentation added after the first releases: at probability 0 (or absent) it draws no
    random number, so configs without it train exactly as before."""
    probability = float(options.get(key, 0.0))
    return probability > 0 and _happens(generator, probability)


def _rotation(angles: Tensor) -> Tensor:
    """(3,) angles (radians) about the three axes -> (3, 3) rotation matrix."""
    matrix = torch.eye(3, dtype=torch.float64)
    for axis, angle in enumerate(angles.tolist()):
        c, s = math.cos(angle), math.sin(angle)
        i, j = [a for a in range(3) if a != axis]
        rot = torch.eye(3, dtype=torch.float64)
        rot[i, i], rot[i, j], rot[j, i], rot[j, j] = c, -s, s, c
        matrix = rot @ matrix
    return matrix


def _affine(stack: Tensor, generator: torch.Generator, options: Mapping[str, Any]) -> Tensor:
    """(C, X, Y, Z) -> the same, rotated by small angles and scaled about the centre."""
    limit = math.radians(float(options["rotate_degrees"]))
    matrix = _rotation(_uniform(generator, -limit, limit, 3))
    low, high = options["scale"]
    matrix = matrix @ torch.diag(_uniform(generator, float(low), float(high), 3))
    theta = torch.zeros(1, 3, 4, dtype=stack.dtype, device=stack.device)
    # affine_grid orders the output coordinates (z, y, x) for a (N, C, X, Y, Z) tensor, i.e. last axis first.
    flip = torch.tensor([[0, 0, 1], [0, 1, 0], [1, 0, 0]], dtype=torch.float64)
    theta[0, :, :3] = (flip @ matrix @ flip).to(stack)
    grid = F.affine_grid(theta, [1, *stack.shape], align_corners=False)
    return F.grid_sample(stack[None], grid, mode="bilinear", padding_mode="border", align_corners=False)[0]


def _low_resolution(image: Tensor, generator: torch.Generator, options: Mapping[str, Any]) -> Tensor:
    """(1, X, Y, Z) -> the same, downsampled along one random axis by a random factor then upsampled back."""
    axis = int(torch.randint(3, (1,), generator=generator))
    low, high = options["resolution_factor"]
    factor = float(_uniform(generator, float(low), float(high)))
    shape = list(image.shape[1:])
    small = list(shape)
    small[axis] = max(1, int(round(shape[axis] / factor)))
    down = F.interpolate(image[None], size=small, mode="trilinear", align_corners=False, antialias=False)
    return F.interpolate(down, size=shape, mode="trilinear", align_corners=False)[0]


def _gibbs(image: Tensor, generator: torch.Generator, options: Mapping[str, Any]) -> Tensor:
    """(1, X, Y, Z) -> the same with Gibbs ringing along one random axis: k-space cut to a random central fraction
    (``gibbs_keep``) of that axis, as an acquisition with fewer phase or readout lines."""
    axis = int(torch.randint(3, (1,), generator=generator)) + 1
    low, high = options["gibbs_keep"]
    keep = float(_uniform(generator, float(low), float(high)))
    n = image.shape[axis]
    spectrum = torch.fft.fftshift(torch.fft.fft(image, dim=axis), dim=axis)
    half = max(1, int(round(keep * n / 2)))
    window = torch.zeros(n, dtype=image.dtype, device=image.device)
    window[max(0, n // 2 - half) : n // 2 + half] = 1.0
    shape = [1, 1, 1, 1]
    shape[axis] = n
    spectrum = spectrum * window.reshape(shape)
    return torch.fft.ifft(torch.fft.ifftshift(spectrum, dim=axis), dim=axis).real.to(image.dtype)


def _ghosting(image: Tensor, generator: torch.Generator, options: Mapping[str, Any]) -> Tensor:
    """(1, X, Y, Z) -> the same with motion-like ghosts along one random (phase-encoding) axis: every
    ``count``-th k-space line of that axis scaled by ``1 - intensity``, which repeats the anatomy ``count`` times
    across the field of view at a fraction of its signal."""
    axis = int(torch.randint(3, (1,), generator=generator)) + 1
    low_n, high_n = options["ghosting_count"]
    count = int(torch.randint(int(low_n), int(high_n) + 1, (1,), generator=generator))
    low, high = options["ghosting_intensity"]
    intensity = float(_uniform(generator, float(low), float(high)))
    n = image.shape[axis]
    floor = image.min()
    spectrum = torch.fft.fftshift(torch.fft.fft(image - floor, dim=axis), dim=axis)
    lines = torch.ones(n, dtype=image.dtype, device=image.device)
    lines[::count] = 1.0 - intensity
    lines[n // 2] = 1.0  # the centre line (the mean signal) is kept
    shape = [1, 1, 1, 1]
    shape[axis] = n
    spectrum = spectrum * lines.reshape(shape)
    return torch.fft.ifft(torch.fft.ifftshift(spectrum, dim=axis), dim=axis).abs().to(image.dtype) + floor


def _gamma(image: Tensor, generator: torch.Generator, options: Mapping[str, Any]) -> Tensor:
    low_g, high_g = options["gamma_range"]
    gamma = float(_uniform(generator, float(low_g), float(high_g)))
    low, high = image.min(), image.max()
    span = (high - low).clamp_min(1e-6)
    return ((image - low) / span).pow(gamma) * span + low


def _bias_field(image: Tensor, generator: torch.Generator, options: Mapping[str, Any]) -> Tensor:
    """Multiply the intensities above the minimum by a smooth random field exp(strength * r)."""
    coarse = torch.randn((1, 1, 4, 4, 4), generator=generator).to(image)
    field = F.interpolate(coarse, size=list(image.shape[1:]), mode="trilinear", align_corners=True)[0]
    low = image.min()
    return (image - low) * torch.exp(float(options["bias_strength"]) * field) + low


def _noise(image: Tensor, generator: torch.Generator, options: Mapping[str, Any]) -> Tensor:
    """Gaussian noise of a random standard deviation up to ``noise_std``; with probability ``rician`` Rician
    instead (a magnitude image's noise: the modulus of the signal above the minimum plus complex Gaussian noise)."""
    std = float(options["noise_std"]) * float(torch.rand(1, generator=generator))
    if _optional_happens(generator, options, "rician"):
        low = image.min()
        real = image - low + std * torch.randn(image.shape, generator=generator).to(image)
        imaginary = std * torch.randn(image.shape, generator=generator).to(image)
        return torch.sqrt(real**2 + imaginary**2) + low
    return image + std * torch.randn(image.shape, generator=generator).to(image)


def _brightness(image: Tensor, generator: torch.Generator, options: Mapping[str, Any]) -> Tensor:
    """Scale the (z-scored) intensities by a log-uniform factor, then shift them by a uniform offset.

    Another anatomy, field of view or coil moves the z-scores of cord and lesion by up to about one standard
    deviation against the training images; this makes those moves part of training.
    """
    low, high = options["brightness_scale"]
    scale = math.exp(float(_uniform(generator, math.log(float(low)), math.log(float(high)))))
    limit = float(options["brightness_shift"])
    return image * scale + float(_uniform(generator, -limit, limit))


def _curve(image: Tensor, generator: torch.Generator, options: Mapping[str, Any]) -> Tensor:
    """Map the intensities through a random increasing piecewise-linear curve from the minimum to the maximum.

    ``curve_points`` inner knots at random positions and random sorted heights: the contrast between tissues
    changes, their order does not (a lesion brighter than the cord stays brighter).
    """
    points = int(options["curve_points"])
    knots_x = torch.cat([torch.zeros(1), torch.rand(points, generator=generator).sort().values, torch.ones(1)])
    knots_y = torch.cat([torch.zeros(1), torch.rand(points, generator=generator).sort().values, torch.ones(1)])
    low, high = image.min(), image.max()
    span = (high - low).clamp_min(1e-6)
    x = ((image - low) / span).clamp(0.0, 1.0)
    knots_x, knots_y = knots_x.to(image), knots_y.to(image)
    right = torch.bucketize(x, knots_x[1:-1], right=True) + 1
    x0, x1, y0, y1 = knots_x[right - 1], knots_x[right], knots_y[right - 1], knots_y[right]
    y = y0 + (x - x0) * (y1 - y0) / (x1 - x0).clamp_min(1e-6)
    return y * span + low


def augment_batch(
    images: Tensor,
    targets: Tensor,
    generator: torch.Generator,
    options: Mapping[str, Any],
    classes: Tensor | None = None,
    lesions: Sequence[Tensor | None] | None = None,
) -> tuple[Tensor, Tensor]:
    """Augment each sample of a batch independently.

    Args:
        images: (B, 1, X, Y, Z) float images.
        targets: (B, K, X, Y, Z) binary targets.
        generator: CPU generator, the only randomness used.
        options: the config's ``augment`` section (probabilities and ranges).
        classes: optional (B, 1, X, Y, Z) label maps: with probability ``synth`` a sample whose label map is real
            gets an image synthesised from it (:func:`.synth.synthesize`) before the other augmentations.
        lesions: optional, per sample, its (1, X, Y, Z) lesion target or None (no lesion label): with
            ``synth_lesions_as_labelled``, a synthesised image draws its lesions there
            (:func:`.synth.draw_lesions_as_labelled`).

    Returns:
        Augmented (B, 1, X, Y, Z) float32 images and (B, K, X, Y, Z) float32 binary targets.
    """
    out_images, out_targets = [], []
    channels = images.shape[1]
    for number, (image, target) in enumerate(zip(images.float(), targets.float())):
        if classes is not None and has_classes(classes[number]) and _optional_happens(generator, options, "synth"):
            drawn = classes[number]
            lesion = lesions[number] if lesions is not None else None
            if lesion is not None and options.get("synth_lesions_as_labelled", False):
                drawn = draw_lesions_as_labelled(drawn, lesion, options)
            image = synthesize(drawn, generator, options)
        flips = [axis + 1 for axis in range(3) if _happens(generator, float(options["flip"]))]
        if flips:
            image, target = image.flip(flips), target.flip(flips)
        if _happens(generator, float(options["affine"])):
            moved = _affine(torch.cat([image, target]), generator, options)
            image, target = moved[:channels], (moved[channels:] >= 0.5).float()
        if _happens(generator, float(options["resolution"])):
            image = _low_resolution(image, generator, options)
        if _optional_happens(generator, options, "gibbs"):
            image = _gibbs(image, generator, options)
        if _optional_happens(generator, options, "ghosting"):
            image = _ghosting(image, generator, options)
        if _happens(generator, float(options["gamma"])):
            image = _gamma(image, generator, options)
        if _happens(generator, float(options["bias"])):
            image = _bias_field(image, generator, options)
        if _happens(generator, float(options["noise"])):
            image = _noise(image, generator, options)
        if _optional_happens(generator, options, "curve"):
            image = _curve(image, generator, options)
        if _optional_happens(generator, options, "brightness"):
            image = _brightness(image, generator, options)
        if _optional_happens(generator, options, "invert"):
            image = -image
        out_images.append(image)
        out_targets.append(target)
    return torch.stack(out_images), torch.stack(out_targets)
