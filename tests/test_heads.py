"""Head strategies: finetune copies, wider and spatial start equal to the universal head and can learn."""

from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")

from sct_sitehead.errors import TrainingError  # noqa: E402
from sct_sitehead.training.arch import Arch  # noqa: E402
from sct_sitehead.training.config import load_config  # noqa: E402
from sct_sitehead.training.fuse import FoldedStage, fuse_head  # noqa: E402
from sct_sitehead.training.heads import Head, build_head, widen  # noqa: E402
from sct_sitehead.training.losses import masked_dice_bce  # noqa: E402
from sct_sitehead.training.unet import UNet  # noqa: E402

pytestmark = [pytest.mark.train, pytest.mark.usefixtures("seeded_torch")]


def _trained_like(head_stages: int = 1, channels: int = 2, final: tuple[int, int] = (1, 1)) -> tuple[UNet, dict]:
    """A U-Net whose universal head has non-trivial weights, and its features on a random image.

    ``final``: (kernel, convolutions) of the last decoder stage; (1, 1) is the release's.
    """
    arch = Arch(
        features=(4, 8, 16), channels=channels, head_stages=head_stages, final_kernel=final[0], final_convs=final[1]
    )
    model = UNet(arch).eval()
    with torch.no_grad():
        for parameter in model.head.parameters():
            parameter.add_(0.2 * torch.randn_like(parameter))
        features = model.backbone(torch.randn(2, 1, 16, 16, 8))
    return model, features


@pytest.mark.parametrize("head_stages", [1, 2])
@pytest.mark.parametrize("spatial", [False, True])
def test_widened_head_equals_universal_at_init_bit_for_bit(head_stages: int, spatial: bool) -> None:
    model, features = _trained_like(head_stages)
    wide = widen(model.head, extra=3, spatial=spatial).eval()
    with torch.no_grad():
        assert torch.equal(wide(features), model.head(features))
        assert torch.equal(wide.logits(features), model.head.logits(features))
    names = dict(wide.named_parameters())
    assert any("weight_new" in n for n in names) and any("norm_new" in n for n in names)
    assert all(not p.detach().any() for n, p in names.items() if "weight_from_new" in n)
    assert ("gate.0.weight" in names) == spatial


def test_spatial_map_is_a_voxelwise_weight_in_unit_interval() -> None:
    model, features = _trained_like()
    head = widen(model.head, extra=2, spatial=True).eval()
    with torch.no_grad():
        head.gate[2].bias.fill_(8.0)  # push the map towards 1, still strictly bounded
        weights = head.gate_map(head.final_features(features))
    assert weights.shape == (2, 1, 16, 16, 8)
    assert float(weights.min()) >= 0.0 and float(weights.max()) <= 1.0


def test_spatial_map_gates_the_added_channels() -> None:
    model, features = _trained_like()
    head = widen(model.head, extra=2, spatial=True).eval()
    with torch.no_grad():
        head.out.weight_from_new.normal_()
        head.gate[2].weight.zero_()
        head.gate[2].bias.fill_(-1e4)  # map == 0: the added channels are shut off
        closed = head(features)
        head.gate[2].bias.fill_(1e4)  # map == 1: the spatial head is the wider head
        opened = head(features)
        wider = widen(model.head, extra=2).eval()
        wider.load_state_dict({k: v for k, v in head.state_dict().items() if not k.startswith("gate.")})
        assert torch.allclose(closed, model.head(features))
        assert torch.allclose(opened, wider(features))
        assert not torch.allclose(opened, closed)


@pytest.mark.parametrize("strategy", ["wider", "spatial"])
def test_new_units_get_gradients_and_learn(strategy: str) -> None:
    model, features = _trained_like()
    head = build_head(strategy, model.head, load_config("tiny"))
    target = (torch.rand(2, 2, 16, 16, 8) > 0.8).float()
    optimizer = torch.optim.AdamW(head.parameters(), lr=0.05)
    before = {n: p.detach().clone() for n, p in head.named_parameters()}
    for _ in range(3):
        loss = masked_dice_bce(head.logits(features), target, torch.ones(2, 2, dtype=torch.bool))
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    for name, parameter in head.named_parameters():
        if any(part in name for part in ("weight_new", "weight_from_new", "scale_new")):
            assert not torch.equal(parameter, before[name]), f"{name} did not move"
    with torch.no_grad():
        assert not torch.allclose(head(features), model.head(features))


def test_finetune_is_an_independent_copy() -> None:
    model, features = _trained_like()
    head = build_head("finetune", model.head, load_config("tiny"))
    with torch.no_grad():
        assert torch.equal(head(features), model.head(features))
        next(head.parameters()).add_(1.0)
        assert not torch.equal(head(features), model.head(features))


def test_unknown_strategy_and_double_widening_are_refused() -> None:
    model, _ = _trained_like()
    with pytest.raises(TrainingError, match="unknown head strategy 'deeper'"):
        build_head("deeper", model.head, load_config("tiny"))
    with pytest.raises(TrainingError, match="only a universal"):
        widen(widen(model.head, extra=2), extra=2)
    with pytest.raises(TrainingError, match="extra >= 1"):
        Head(model.arch, spatial=True)


@pytest.mark.parametrize("final", [(3, 2), (1, 1)])
@pytest.mark.parametrize("head_stages", [1, 2])
@pytest.mark.parametrize("strategy", ["finetune", "wider", "spatial"])
def test_fused_export_copy_computes_the_same_head(head_stages: int, strategy: str, final: tuple[int, int]) -> None:
    model, features = _trained_like(head_stages, channels=3, final=final)
    head = build_head(strategy, model.head, load_config("tiny")).eval()
    with torch.no_grad():
        for parameter in head.parameters():  # so zero-initialised blocks cannot hide a wrong layout
            parameter.add_(0.1 * torch.randn_like(parameter))
        fused = fuse_head(head)
        assert torch.allclose(fused(features), head(features), atol=1e-6)
    assert len(list(fused.modules())) < len(list(head.modules())) or strategy == "finetune"
    # A final stage of one 1x1x1 convolution has its upsampling folded in: no upsampled tensor, no concatenation.
    assert isinstance(fused.stages[-1], FoldedStage) == (final == (1, 1))


def test_head_rebuilds_from_its_description() -> None:
    model, features = _trained_like()
    head = widen(model.head, extra=2, spatial=True, map_width=3).eval()
    copy = Head.from_description(head.describe()).eval()
    copy.load_state_dict(head.state_dict())
    with torch.no_grad():
        assert torch.equal(copy(features), head(features))


def test_head_names_missing_backbone_outputs() -> None:
    model, features = _trained_like()
    with pytest.raises(TrainingError, match=r"missing \['dec1'\]"):
        model.head({"skip0": features["skip0"]})
