"""Export-time fusion of a head into plain convolutions, so a widened head costs what its width costs.

During training a widened layer runs separate convolutions for its old and new channels (that is what keeps it
bit-identical to the universal head at initialisation). For deployment those blocks are assembled into one
weight per layer, the per-group scales folded into the instance-norm affine, and the ``[upsampled old, skip,
upsampled new]`` concatenation replaced by ``[upsampled, skip]`` with the next weight's input channels permuted.
The result computes the same function up to float rounding (checked at export against the unfused head).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import cast

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from sct_sitehead.training.heads import Head
from sct_sitehead.training.layers import ConvBlock, DecoderStage, WideConv


def full_weight(conv: WideConv) -> tuple[Tensor, Tensor]:
    """The one weight and bias equivalent to a :class:`WideConv`, channels laid out ``[old..., new...]``."""
    # Output channels are dim 0 of a convolution weight but dim 1 of a transposed one; inputs the other.
    out_dim, in_dim = (1, 0) if conv.transpose else (0, 1)
    weight: Tensor = conv.weight
    if conv.in_new:
        weight = torch.cat([weight, conv.weight_from_new], dim=in_dim)
    bias: Tensor = conv.bias
    if conv.out_new:
        weight = torch.cat([weight, conv.weight_new], dim=out_dim)
        bias = torch.cat([bias, conv.bias_new])
    return weight.detach().clone(), bias.detach().clone()


def bias_of(layer: nn.Conv3d | nn.ConvTranspose3d) -> Tensor:
    """The bias of a convolution built with one (torch types every convolution's bias as optional)."""
    if layer.bias is None:
        raise ValueError(f"{layer} has no bias; the fused layers are all built with one")
    return layer.bias


def load_layer(layer: nn.Conv3d | nn.ConvTranspose3d, weight: Tensor, bias: Tensor) -> None:
    """Copy ``weight`` and ``bias`` into a freshly built convolution of the same shapes."""
    layer.weight.data.copy_(weight)
    bias_of(layer).data.copy_(bias)


def conv_blocks(stage: DecoderStage) -> list[ConvBlock]:
    """The conv blocks of ``stage`` (an ``nn.ModuleList`` types its items as plain modules)."""
    return [cast(ConvBlock, block) for block in stage.blocks]


class FusedBlock(nn.Module):
    """A :class:`ConvBlock` as one convolution, one instance norm and the activation."""

    def __init__(self, block: ConvBlock, input_order: list[int] | None = None) -> None:
        super().__init__()
        wide = block.conv
        weight, bias = full_weight(wide)
        if input_order is not None:
            weight = weight[:, input_order]
        self.conv = nn.Conv3d(
            weight.shape[1], weight.shape[0], weight.shape[2], stride=wide.stride, padding=wide.padding
        )
        load_layer(self.conv, weight, bias)
        gamma, beta = block.norm.weight.detach(), block.norm.bias.detach()
        if wide.out_new:
            # (norm(x) * g + b) * s == norm(x) * (g * s) + b * s: the group scales fold into the affine.
            s_old, s_new = block.scale.detach(), block.scale_new.detach()
            gamma = torch.cat([gamma * s_old, block.norm_new.weight.detach() * s_new])
            beta = torch.cat([beta * s_old, block.norm_new.bias.detach() * s_new])
        self.norm = nn.InstanceNorm3d(len(gamma), affine=True)
        self.norm.weight.data.copy_(gamma)
        self.norm.bias.data.copy_(beta)
        self.slope = block.slope

    def forward(self, x: Tensor) -> Tensor:
        return F.leaky_relu(self.norm(self.conv(x)), self.slope)


class FusedStage(nn.Module):
    """A :class:`DecoderStage` whose skip is concatenated after all upsampled channels."""

    def __init__(self, stage: DecoderStage) -> None:
        super().__init__()
        up = stage.up
        weight, bias = full_weight(up)
        self.up = nn.ConvTranspose3d(weight.shape[0], weight.shape[1], 2, stride=2)
        load_layer(self.up, weight, bias)
        old, new = up.out_old, up.out_new
        first, *rest = conv_blocks(stage)
        skip = first.conv.in_old - old
        # Fused input [up old, up new, skip] read from the trained layout [up old, skip, up new].
        order = [*range(old), *range(old + skip, old + skip + new), *range(old, old + skip)]
        blocks = [FusedBlock(first, order if new else None)]
        blocks += [FusedBlock(block) for block in rest]
        self.blocks = nn.ModuleList(blocks)

    def forward(self, coarse: Tensor, skip: Tensor) -> Tensor:
        x = torch.cat([self.up(coarse), skip], dim=1)
        for block in self.blocks:
            x = block(x)
        return x


class FoldedStage(nn.Module):
    """A :class:`FusedStage` whose one convolution is 1x1x1, with the upsampling folded into it.

    ``conv([up(c), s]) = conv_up(up(c)) + conv_skip(s)``, and ``conv_up`` after the transposed convolution ``up``
    is itself one transposed convolution, so the upsampled tensor and the concatenation are never made. ONNX
    Runtime's kernel profile (CPU, a 64x64x144 window): 47.6 -> 38.1 ms per head; in whole runs the gain is within
    the noise (docs/PERFORMANCE.md, v7), the memory saving is not.
    """

    def __init__(self, stage: FusedStage) -> None:
        super().__init__()
        up, block = stage.up, cast(FusedBlock, stage.blocks[0])
        n_up = up.out_channels
        weight = block.conv.weight.detach().double()[:, :, 0, 0, 0]
        to_out, from_skip = weight[:, :n_up], weight[:, n_up:]
        self.up = nn.ConvTranspose3d(up.in_channels, weight.shape[0], 2, stride=2)
        self.up.weight.data.copy_(torch.einsum("ikabc,ok->ioabc", up.weight.detach().double(), to_out))
        bias_of(self.up).data.copy_(to_out @ bias_of(up).detach().double() + bias_of(block.conv).detach().double())
        self.skip = nn.Conv3d(from_skip.shape[1], weight.shape[0], 1, bias=False)
        self.skip.weight.data.copy_(from_skip[:, :, None, None, None])
        self.norm = block.norm
        self.slope = block.slope

    @staticmethod
    def applies(stage: FusedStage) -> bool:
        """One convolution, 1x1x1, stride 1: the release's final stage (``final_kernel`` 1, ``final_convs`` 1)."""
        conv = cast(FusedBlock, stage.blocks[0]).conv
        return len(stage.blocks) == 1 and conv.kernel_size == (1, 1, 1) and conv.stride == (1, 1, 1)

    def forward(self, coarse: Tensor, skip: Tensor) -> Tensor:
        return F.leaky_relu(self.norm(self.up(coarse) + self.skip(skip)), self.slope)


def fused_stage(stage: DecoderStage) -> nn.Module:
    """The deployment form of a decoder stage: :class:`FoldedStage` where it applies, else :class:`FusedStage`."""
    fused = FusedStage(stage)
    return FoldedStage(fused) if FoldedStage.applies(fused) else fused


class FusedHead(nn.Module):
    """Same inputs, output and function as the :class:`Head` it was made from, in plain layers."""

    def __init__(self, head: Head) -> None:
        super().__init__()
        self.input_names = head.input_names
        self.levels = head.levels
        self.head_stages = head.arch.head_stages
        self.channels = head.arch.channels
        self.spatial = head.spatial
        self.stages = nn.ModuleList(fused_stage(cast(DecoderStage, stage)) for stage in head.stages)
        out = head.out
        weight, bias = full_weight(out)
        if self.spatial:
            # One convolution gives [old logits, added-channel logits]; the gate weighs the second half.
            old = torch.cat([out.weight.detach(), torch.zeros_like(out.weight_from_new)], dim=1)
            new = torch.cat([torch.zeros_like(out.weight), out.weight_from_new.detach()], dim=1)
            weight, bias = torch.cat([old, new]), torch.cat([bias, torch.zeros_like(bias)])
            self.gate = head.gate
        self.out = nn.Conv3d(weight.shape[1], weight.shape[0], 1)
        load_layer(self.out, weight, bias)

    def forward(self, features: Mapping[str, Tensor]) -> Tensor:
        """Named backbone outputs -> (N, K, X, Y, Z) probabilities."""
        x = features[f"dec{self.head_stages}"]
        for stage, level in zip(self.stages, self.levels):
            x = stage(x, features[f"skip{level}"])
        logits = self.out(x)
        if self.spatial:
            k = self.channels
            logits = logits[:, :k] + torch.sigmoid(self.gate(x)) * logits[:, k:]
        return torch.sigmoid(logits)


def fuse_head(head: Head) -> FusedHead:
    """A deployment copy of ``head`` in plain layers (eval mode); ``head`` itself is untouched."""
    return FusedHead(head).eval()
