"""The network's architecture as data: levels, channels and the backbone/head split, stored in every checkpoint.

The backbone (:mod:`unet`) and the heads (:mod:`heads`) are both built from an :class:`Arch`; it lives apart from
both so that neither imports the other for it (and it needs no torch).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import asdict, dataclass
from typing import Any

from sct_sitehead.errors import TrainingError


def feature_names(head_stages: int) -> list[str]:
    """Names of the backbone outputs (= head inputs) for ``head_stages``, e.g. ``["skip0", "dec1"]``."""
    return [f"skip{i}" for i in range(head_stages)] + [f"dec{head_stages}"]


@dataclass(frozen=True)
class Arch:
    """Everything needed to rebuild the network's modules; stored in every checkpoint.

    Attributes:
        features: channels per level, full resolution first.
        channels: output channels K (n* under label sharing).
        head_stages: decoder stages in the head.
        final_width: channels of the full-resolution decoder stage.
        final_kernel: its convolution kernel (1 or 3).
        final_convs: its number of convolutions.
        slope: leaky ReLU negative slope.
    """

    features: tuple[int, ...]
    channels: int
    head_stages: int = 1
    final_width: int = 0
    final_kernel: int = 1
    final_convs: int = 1
    slope: float = 0.01

    def __post_init__(self) -> None:
        object.__setattr__(self, "features", tuple(int(f) for f in self.features))
        if not self.final_width:
            object.__setattr__(self, "final_width", self.features[0])
        if not 1 <= self.head_stages < len(self.features) or self.channels < 1:
            raise TrainingError(
                f"architecture {self} is invalid: need 1 <= head_stages < {len(self.features)} levels and channels "
                ">= 1; fix model.head_stages or the label space"
            )

    @classmethod
    def from_config(cls, config: Mapping[str, Any], channels: int) -> Arch:
        """Architecture of ``config["model"]`` with ``channels`` outputs."""
        model = config["model"]
        return cls(
            features=tuple(model["features"]),
            channels=int(channels),
            head_stages=int(model["head_stages"]),
            final_width=int(model["final_width"] or 0),
            final_kernel=int(model["final_kernel"]),
            final_convs=int(model["final_convs"]),
            slope=float(model["negative_slope"]),
        )

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Arch:
        """Inverse of :meth:`to_dict`."""
        return cls(**{**data, "features": tuple(data["features"])})

    def to_dict(self) -> dict[str, Any]:
        """JSON-serialisable form, stored in checkpoints."""
        return {**asdict(self), "features": list(self.features)}

    @property
    def levels(self) -> int:
        return len(self.features)

    @property
    def divisor(self) -> int:
        """Every spatial size must be a multiple of this."""
        return 2 ** (self.levels - 1)

    @property
    def outputs(self) -> list[str]:
        """Backbone output names."""
        return feature_names(self.head_stages)

    def feature_channels(self, name: str) -> int:
        """Channels of backbone output ``name``."""
        level = int(name.removeprefix("skip").removeprefix("dec"))
        return self.features[level]
