"""Site heads: the universal head and the three ways of adapting it to one site.

- ``finetune``: a copy of the universal head, every weight then trained on the site.
- ``wider``: fine-tuning with increased capacity (Liu et al. 2021, after Wang et al. CVPR 2017 "Growing a
  brain"): ``extra`` channels added in parallel to every head convolution, old weights copied, weights out of
  the new channels zero, new and old activations normalised and scaled apart (:class:`layers.ConvBlock`).
- ``spatial``: ``wider`` plus a small 1x1x1 convolutional branch ending in a sigmoid; its voxel-wise map in
  [0, 1] weights the added channels' contribution to the logits.

At initialisation ``wider`` and ``spatial`` compute exactly the universal head's output. All heads take the same
named inputs and return ``probabilities``, so they export to one ONNX interface.
"""

from __future__ import annotations

import copy
from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor, nn

from sct_sitehead.errors import TrainingError
from sct_sitehead.training.arch import Arch
from sct_sitehead.training.layers import DecoderStage, WideConv

STRATEGIES = ("finetune", "wider", "spatial")
#: Manifest ``strategy`` of the head trained with the backbone on every site's data.
UNIVERSAL_STRATEGY = "pooled"
#: Parameter name fragments that only widened heads have (see :func:`widen`).
_NEW_PARAMETERS = ("weight_from_new", "weight_new", "bias_new", "norm_new.", "scale", "gate.")


class Head(nn.Module):
    """Decoder stages ``head_stages - 1 ... 0``, the output convolution and the sigmoid.

    Args:
        arch: the network's architecture (features, head_stages, channels...).
        extra: channels added to each head layer (0: the plain universal head).
        spatial: add the gating branch (needs ``extra > 0``).
        map_width: hidden channels of the gating branch.
    """

    def __init__(self, arch: Arch, *, extra: int = 0, spatial: bool = False, map_width: int = 4) -> None:
        super().__init__()
        if spatial and extra < 1:
            raise TrainingError(f"a spatial head needs extra >= 1 added channels, got {extra}; set head.extra")
        self.arch, self.extra, self.spatial, self.map_width = arch, int(extra), bool(spatial), int(map_width)
        self.input_names = arch.outputs
        f = arch.features
        self.levels = list(range(arch.head_stages - 1, -1, -1))
        stages = []
        for k, level in enumerate(self.levels):
            final = level == 0
            stages.append(
                DecoderStage(
                    f[level + 1],
                    f[level],
                    arch.final_width if final else f[level],
                    kernel=arch.final_kernel if final else 3,
                    convs=arch.final_convs if final else 2,
                    in_new=self.extra if k > 0 else 0,
                    out_new=self.extra,
                    slope=arch.slope,
                )
            )
        self.stages = nn.ModuleList(stages)
        self.out = WideConv(arch.final_width, arch.channels, 1, in_new=self.extra, slope=arch.slope)
        if self.spatial:
            width = arch.final_width + self.extra
            self.gate = nn.Sequential(
                nn.Conv3d(width, self.map_width, 1), nn.LeakyReLU(arch.slope), nn.Conv3d(self.map_width, 1, 1)
            )

    def describe(self) -> dict[str, Any]:
        """JSON-serialisable description that :meth:`from_description` rebuilds the module from."""
        return {"arch": self.arch.to_dict(), "extra": self.extra, "spatial": self.spatial, "map_width": self.map_width}

    @classmethod
    def from_description(cls, data: Mapping[str, Any]) -> Head:
        """A new (randomly initialised) head of the described shape; load its weights next."""
        return cls(
            Arch.from_dict(data["arch"]),
            extra=int(data["extra"]),
            spatial=bool(data["spatial"]),
            map_width=int(data["map_width"]),
        )

    def final_features(self, features: Mapping[str, Tensor]) -> Tensor:
        """Named backbone outputs -> (N, final_width + extra, X, Y, Z) input of the output convolution."""
        missing = [name for name in self.input_names if name not in features]
        if missing:
            raise TrainingError(
                f"head needs backbone outputs {self.input_names}, missing {missing}; the backbone and head must come "
                "from the same architecture (model.head_stages)"
            )
        x = features[f"dec{self.arch.head_stages}"]
        for stage, level in zip(self.stages, self.levels):
            x = stage(x, features[f"skip{level}"])
        return x

    def gate_map(self, x: Tensor) -> Tensor:
        """(N, final_width + extra, X, Y, Z) -> (N, 1, X, Y, Z) weights in [0, 1] of the added channels."""
        return torch.sigmoid(self.gate(x))

    def logits(self, features: Mapping[str, Tensor]) -> Tensor:
        """Named backbone outputs -> (N, K, X, Y, Z) logits."""
        x = self.final_features(features)
        old, from_new, _ = self.out.terms(x)
        if from_new is None:
            return old
        if self.spatial:
            return old + self.gate_map(x) * from_new
        return old + from_new

    def forward(self, features: Mapping[str, Tensor]) -> Tensor:
        """Named backbone outputs -> (N, K, X, Y, Z) probabilities."""
        return torch.sigmoid(self.logits(features))


def widen(universal: Head, *, extra: int, spatial: bool = False, map_width: int = 4) -> Head:
    """A head with ``extra`` added channels per layer whose output equals ``universal``'s until trained.

    Raises:
        TrainingError: ``universal`` is already widened, or the weights do not fit (a bug, not a user error).
    """
    if universal.extra:
        raise TrainingError("only a universal (not yet widened) head can be widened; start from the backbone's head")
    head = Head(universal.arch, extra=extra, spatial=spatial, map_width=map_width)
    result = head.load_state_dict(universal.state_dict(), strict=False)
    stray = [k for k in result.missing_keys if not any(part in k for part in _NEW_PARAMETERS)]
    if result.unexpected_keys or stray:
        raise TrainingError(
            f"universal head weights do not fit the widened head (unexpected {result.unexpected_keys}, missing "
            f"{stray}); report this as a bug"
        )
    return head


def build_head(strategy: str, universal: Head, config: Mapping[str, Any]) -> Head:
    """The starting point of a site head for ``strategy`` (see the module docstring).

    Raises:
        TrainingError: unknown strategy.
    """
    options = config["head"]
    if strategy == "finetune":
        return copy.deepcopy(universal)
    if strategy in ("wider", "spatial"):
        return widen(
            universal, extra=int(options["extra"]), spatial=strategy == "spatial", map_width=int(options["map_width"])
        )
    raise TrainingError(f"unknown head strategy {strategy!r}; choose one of {list(STRATEGIES)}")
