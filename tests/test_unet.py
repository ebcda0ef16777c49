"""The U-Net, its backbone/head split along the ONNX contract, and the training configs."""

from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")

from sct_sitehead.errors import TrainingError  # noqa: E402
from sct_sitehead.training.arch import Arch, feature_names  # noqa: E402
from sct_sitehead.training.config import DEFAULTS, load_config  # noqa: E402
from sct_sitehead.training.layers import count_parameters  # noqa: E402
from sct_sitehead.training.unet import UNet  # noqa: E402

pytestmark = [pytest.mark.train, pytest.mark.usefixtures("seeded_torch")]


@pytest.mark.parametrize("head_stages", [1, 2])
def test_backbone_outputs_are_the_named_features_of_the_contract(head_stages: int) -> None:
    arch = Arch(features=(4, 8, 16), channels=3, head_stages=head_stages)
    model = UNet(arch).eval()
    image = torch.randn(2, 1, 16, 8, 12)
    with torch.no_grad():
        features = model.backbone(image)
        probabilities = model.head(features)
    assert list(features) == feature_names(head_stages) == arch.outputs
    for level in range(head_stages):
        assert features[f"skip{level}"].shape == (2, arch.features[level], 16 >> level, 8 >> level, 12 >> level)
    h = head_stages
    assert features[f"dec{h}"].shape == (2, arch.features[h], 16 >> h, 8 >> h, 12 >> h)
    assert probabilities.shape == (2, 3, 16, 8, 12)
    assert float(probabilities.min()) >= 0.0 and float(probabilities.max()) <= 1.0


@pytest.mark.parametrize("head_stages", [1, 2, 3])
def test_backbone_then_head_equals_the_whole_unet(head_stages: int) -> None:
    model = UNet(Arch(features=(4, 8, 8, 16), channels=2, head_stages=head_stages)).eval()
    image = torch.randn(1, 1, 16, 16, 8)
    with torch.no_grad():
        split = model.head.logits(model.backbone(image))
        whole = model(image)
    assert torch.equal(split, whole)
    assert torch.equal(model.probabilities(image), torch.sigmoid(whole))


def test_every_parameter_belongs_to_backbone_or_head() -> None:
    model = UNet(Arch(features=(4, 8, 16), channels=2))
    assert count_parameters(model) == count_parameters(model.backbone) + count_parameters(model.head)


@pytest.mark.parametrize("source", [DEFAULTS, "release"])
def test_default_and_release_heads_are_at_most_a_tenth_of_the_backbone(source: object) -> None:
    config = load_config(source)
    arch = Arch.from_config(config, channels=2)
    model = UNet(arch)
    backbone, head = count_parameters(model.backbone), count_parameters(model.head)
    assert arch.levels >= 4
    assert arch.features[0] >= 8
    assert backbone > 1_000_000, "the backbone should have real capacity"
    assert head <= 0.10 * backbone, f"head {head} vs backbone {backbone}"


def test_arch_round_trips_through_json_and_checks_itself() -> None:
    arch = Arch(features=(4, 8, 16, 32), channels=3, head_stages=2, final_width=6)
    assert Arch.from_dict(arch.to_dict()) == arch
    assert arch.divisor == 8
    assert Arch(features=(4, 8), channels=1).final_width == 4
    with pytest.raises(TrainingError, match="head_stages"):
        Arch(features=(4, 8), channels=1, head_stages=2)


def test_config_rejects_unknown_keys_and_bad_divisors() -> None:
    with pytest.raises(TrainingError, match="unknown key 'train.stpes'"):
        load_config({"train": {"stpes": 3}})
    with pytest.raises(TrainingError, match="divisor"):
        load_config({"model": {"features": [4, 8, 16]}, "input": {**DEFAULTS["input"], "divisor": 2}})
    with pytest.raises(TrainingError, match="not found"):
        load_config("no-such-config")


@pytest.mark.parametrize("name", ["tiny", "smoke", "release", "localiser", "localiser_smoke"])
def test_shipped_configs_load(name: str) -> None:
    config = load_config(name)
    assert config["input"]["normalization"] == {"method": "zscore", "clip_percentiles": [0.5, 99.5]}
    assert config["input"]["orientation"] == "RAS"
