"""The 3D U-Net, split into a backbone and a universal head along the ONNX contract of DESIGN.md.

Levels are numbered from 0 (full resolution) to ``L - 1`` (coarsest). The encoder stage of level ``i`` has
``features[i]`` channels (a stride-2 convolution, then a second convolution, each with instance norm and leaky
ReLU). Decoder stage ``i`` upsamples level ``i + 1`` and merges skip ``i``. With ``head_stages = h``, the head is
decoder stages ``h - 1 ... 0`` plus the output convolution and the backbone is everything else; the backbone
returns ``skip0 ... skip{h-1}`` (encoder outputs) and ``dec{h}`` (the output of decoder stage ``h``, or of the
deepest encoder stage when ``h = L - 1``).

The full-resolution decoder stage is deliberately light (by default one 1x1x1 convolution over
``features[0]`` channels): it is the only stage computed once per site, so its cost sets how cheaply many site
heads share one backbone pass.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from sct_sitehead.training.arch import Arch
from sct_sitehead.training.heads import Head
from sct_sitehead.training.layers import ConvBlock, DecoderStage


class EncoderStage(nn.Module):
    """Level ``i``: (stride-2 when ``i > 0``) conv block, then a second conv block."""

    def __init__(self, in_ch: int, out_ch: int, *, downsample: bool, slope: float) -> None:
        super().__init__()
        self.blocks = nn.Sequential(
            ConvBlock(in_ch, out_ch, 3, stride=2 if downsample else 1, slope=slope),
            ConvBlock(out_ch, out_ch, 3, slope=slope),
        )

    def forward(self, x: Tensor) -> Tensor:
        """(N, Cin, X, Y, Z) -> (N, Cout, X/2, Y/2, Z/2) (same size at level 0)."""
        return self.blocks(x)


class Backbone(nn.Module):
    """Encoder and all decoder stages but the head's.

    Attributes:
        output_names: names of the returned features, as in the ONNX ``backbone.outputs``.
    """

    def __init__(self, arch: Arch) -> None:
        super().__init__()
        f, slope = arch.features, arch.slope
        self.arch = arch
        self.output_names = arch.outputs
        self.encoder = nn.ModuleList(
            EncoderStage(1 if i == 0 else f[i - 1], f[i], downsample=i > 0, slope=slope) for i in range(arch.levels)
        )
        # Deepest first: decoder stage i merges level i + 1 into skip i.
        self.decoder_levels = list(range(arch.levels - 2, arch.head_stages - 1, -1))
        self.decoder = nn.ModuleList(DecoderStage(f[i + 1], f[i], f[i], slope=slope) for i in self.decoder_levels)

    def encode(self, image: Tensor) -> list[Tensor]:
        """(N, 1, X, Y, Z) -> the encoder output of every level, level ``i`` at (N, f_i, X/2^i, Y/2^i, Z/2^i)."""
        skips = []
        x = image
        for stage in self.encoder:
            x = stage(x)
            skips.append(x)
        return skips

    def forward(self, image: Tensor) -> dict[str, Tensor]:
        """(N, 1, X, Y, Z), sizes multiples of ``arch.divisor`` -> ``{name: features}`` for ``output_names``."""
        skips = self.encode(image)
        x = skips[-1]
        for stage, level in zip(self.decoder, self.decoder_levels):
            x = stage(x, skips[level])
        h = self.arch.head_stages
        out = {f"skip{i}": skips[i] for i in range(h)}
        out[f"dec{h}"] = x
        return out


class UNet(nn.Module):
    """Backbone plus the universal head; ``forward`` runs the plain U-Net path and returns logits."""

    def __init__(self, arch: Arch) -> None:
        super().__init__()
        self.arch = arch
        self.backbone = Backbone(arch)
        self.head = Head(arch)

    def forward(self, image: Tensor) -> Tensor:
        """(N, 1, X, Y, Z) -> (N, K, X, Y, Z) logits, through every stage in order (not the split path)."""
        skips = self.backbone.encode(image)
        x = skips[-1]
        stages = [*self.backbone.decoder, *self.head.stages]
        levels = range(self.arch.levels - 2, -1, -1)
        for stage, level in zip(stages, levels, strict=True):
            x = stage(x, skips[level])
        return self.head.out(x)

    def probabilities(self, image: Tensor) -> Tensor:
        """(N, 1, X, Y, Z) -> (N, K, X, Y, Z) sigmoid probabilities."""
        return torch.sigmoid(self(image))
