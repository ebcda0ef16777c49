"""Convolution blocks whose channels can grow: the pieces shared by the U-Net and every head strategy.

Every tensor here lays its channels out as ``[old..., new...]``: *old* channels are those of the universal head,
*new* ones are added by the ``wider`` and ``spatial`` strategies (Wang et al. 2017, "Growing a brain"; Liu et al.
2021). Weights from new inputs into old outputs start at zero and old and new outputs are computed by separate
convolutions, so a widened layer reproduces the universal one bit for bit until training moves those weights.
With no new channels each class is an ordinary convolution, instance norm or decoder stage.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn


class WideConv(nn.Module):
    """A 3D convolution (or stride-2 transposed convolution) with optional added input and output channels.

    Parameters: ``weight``/``bias`` (old inputs -> old outputs, the universal layer), ``weight_from_new``
    (new inputs -> old outputs, zero at init), ``weight_new``/``bias_new`` (all inputs -> new outputs, random).
    """

    def __init__(
        self,
        in_old: int,
        out_old: int,
        kernel: int,
        *,
        in_new: int = 0,
        out_new: int = 0,
        stride: int = 1,
        transpose: bool = False,
        slope: float = 0.01,
    ) -> None:
        super().__init__()
        self.in_old, self.in_new, self.out_old, self.out_new = in_old, in_new, out_old, out_new
        self.stride, self.transpose = stride, transpose
        self.padding = 0 if transpose else kernel // 2
        self.weight = nn.Parameter(self._init(out_old, in_old, kernel, slope))
        self.bias = nn.Parameter(torch.zeros(out_old))
        if in_new:
            self.weight_from_new = nn.Parameter(torch.zeros(self._shape(out_old, in_new, kernel)))
        else:
            self.register_parameter("weight_from_new", None)
        if out_new:
            self.weight_new = nn.Parameter(self._init(out_new, in_old + in_new, kernel, slope))
            self.bias_new = nn.Parameter(torch.zeros(out_new))
        else:
            self.register_parameter("weight_new", None)
            self.register_parameter("bias_new", None)

    def _shape(self, out_ch: int, in_ch: int, kernel: int) -> tuple[int, ...]:
        # torch stores transposed-convolution weights as (in, out, k, k, k).
        pair = (in_ch, out_ch) if self.transpose else (out_ch, in_ch)
        return (*pair, kernel, kernel, kernel)

    def _init(self, out_ch: int, in_ch: int, kernel: int, slope: float) -> Tensor:
        weight = torch.empty(self._shape(out_ch, in_ch, kernel))
        # He init for leaky ReLU, fan-in taken from the real input channels whatever torch's storage order.
        std = (2.0 / ((1 + slope**2) * in_ch * kernel**3)) ** 0.5
        return nn.init.normal_(weight, 0.0, std)

    def _conv(self, x: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
        if self.transpose:
            return F.conv_transpose3d(x, weight, bias, stride=self.stride)
        return F.conv3d(x, weight, bias, stride=self.stride, padding=self.padding)

    def terms(self, x: Tensor) -> tuple[Tensor, Tensor | None, Tensor | None]:
        """The three blocks of the output.

        Args:
            x: (N, in_old + in_new, X, Y, Z) input.

        Returns:
            (N, out_old, ...) old-from-old, (N, out_old, ...) old-from-new or None, (N, out_new, ...) new or None.
        """
        x_old = x[:, : self.in_old] if self.in_new else x
        old = self._conv(x_old, self.weight, self.bias)
        from_new = self._conv(x[:, self.in_old :], self.weight_from_new, None) if self.in_new else None
        new = self._conv(x, self.weight_new, self.bias_new) if self.out_new else None
        return old, from_new, new

    def parts(self, x: Tensor) -> tuple[Tensor, Tensor | None]:
        """(N, out_old, ...) old outputs and (N, out_new, ...) new outputs (None without new channels)."""
        old, from_new, new = self.terms(x)
        return (old if from_new is None else old + from_new), new

    def forward(self, x: Tensor) -> Tensor:
        """(N, in_old + in_new, X, Y, Z) -> (N, out_old + out_new, X', Y', Z')."""
        old, new = self.parts(x)
        return old if new is None else torch.cat([old, new], dim=1)


class ConvBlock(nn.Module):
    """Convolution, instance norm, leaky ReLU.

    Added channels get their own norm layer and each group a learnable scale (``scale``, ``scale_new``), so new
    units are normalised and scaled apart from the old ones and their size can grow to matter (Liu et al. 2021).
    """

    def __init__(
        self,
        in_old: int,
        out_old: int,
        kernel: int = 3,
        *,
        in_new: int = 0,
        out_new: int = 0,
        stride: int = 1,
        slope: float = 0.01,
    ) -> None:
        super().__init__()
        self.slope = slope
        self.conv = WideConv(in_old, out_old, kernel, in_new=in_new, out_new=out_new, stride=stride, slope=slope)
        self.norm = nn.InstanceNorm3d(out_old, affine=True)
        if out_new:
            self.norm_new = nn.InstanceNorm3d(out_new, affine=True)
            self.scale = nn.Parameter(torch.ones(1))
            self.scale_new = nn.Parameter(torch.ones(1))

    def forward(self, x: Tensor) -> Tensor:
        """(N, in_old + in_new, X, Y, Z) -> (N, out_old + out_new, X', Y', Z')."""
        old, new = self.conv.parts(x)
        if new is None:
            return F.leaky_relu(self.norm(old), self.slope)
        out = torch.cat([self.norm(old) * self.scale, self.norm_new(new) * self.scale_new], dim=1)
        return F.leaky_relu(out, self.slope)


class DecoderStage(nn.Module):
    """Upsample the coarser features x2, concatenate the skip connection, then ``convs`` conv blocks.

    The concatenation keeps the ``[old..., new...]`` layout: ``[upsampled old, skip, upsampled new]``.
    """

    def __init__(
        self,
        in_old: int,
        skip: int,
        out_old: int,
        *,
        kernel: int = 3,
        convs: int = 2,
        in_new: int = 0,
        out_new: int = 0,
        slope: float = 0.01,
    ) -> None:
        super().__init__()
        self.up = WideConv(in_old, out_old, 2, in_new=in_new, out_new=out_new, stride=2, transpose=True, slope=slope)
        blocks = [ConvBlock(out_old + skip, out_old, kernel, in_new=out_new, out_new=out_new, slope=slope)]
        blocks += [
            ConvBlock(out_old, out_old, kernel, in_new=out_new, out_new=out_new, slope=slope) for _ in range(convs - 1)
        ]
        self.blocks = nn.ModuleList(blocks)

    def forward(self, coarse: Tensor, skip: Tensor) -> Tensor:
        """(N, Cin, X/2, Y/2, Z/2) and (N, Cskip, X, Y, Z) -> (N, Cout, X, Y, Z)."""
        old, new = self.up.parts(coarse)
        x = torch.cat([old, skip] if new is None else [old, skip, new], dim=1)
        for block in self.blocks:
            x = block(x)
        return x


def count_parameters(module: nn.Module) -> int:
    """Number of scalar parameters of ``module``."""
    return sum(p.numel() for p in module.parameters())
