"""Label sharing (Anand et al. 2024): ranking by mean relative size, grouping, universal map, targets."""

from __future__ import annotations

import json

import numpy as np
import pytest

from sct_sitehead.errors import TrainingError
from sct_sitehead.training.labels import LabelSpace, build_label_space, measure_label_sizes

#: The worked example of build_label_space's docstring: mean relative sizes per site.
SIZES = {
    "siteA": {"lesion": 0.001},
    "siteB": {"cord": 0.02, "lesion": 0.002},
    "siteC": {"csf": 0.05, "cord": 0.02, "lesion": 0.001},
}


def test_kth_largest_label_of_each_site_goes_to_channel_k() -> None:
    space = build_label_space(SIZES)
    assert space.channels == 3  # n* = the largest label count of any site
    assert space.label_map("siteA") == {"lesion": 0}
    assert space.label_map("siteB") == {"cord": 0, "lesion": 1}
    assert space.label_map("siteC") == {"csf": 0, "cord": 1, "lesion": 2}


def test_ranking_uses_sizes_not_names_and_breaks_ties_by_name() -> None:
    space = build_label_space({"x": {"lesion": 0.3, "cord": 0.1}, "y": {"b": 0.5, "a": 0.5}})
    assert space.label_map("x") == {"lesion": 0, "cord": 1}  # a site whose lesions outsize its cord mask
    assert space.label_map("y") == {"a": 0, "b": 1}


def test_explicit_grouping_by_meaning_overrides_the_ranking() -> None:
    grouping = {"lesion": ["lesion", "lesion-core"], "cord": ["cord"], "csf": ["csf"]}
    space = build_label_space({**SIZES, "siteD": {"lesion-core": 0.0005}}, grouping)
    assert space.channels == 3
    assert space.label_map("siteA") == {"lesion": 0}
    assert space.label_map("siteC") == {"csf": 2, "cord": 1, "lesion": 0}
    assert space.label_map("siteD") == {"lesion-core": 0}
    with pytest.raises(TrainingError, match=r"labels \['csf'\] are in no group"):
        build_label_space(SIZES, {"lesion": ["lesion"], "cord": ["cord"]})
    with pytest.raises(TrainingError, match="in two groups"):
        build_label_space(SIZES, {"a": ["lesion"], "b": ["lesion", "cord", "csf"]})


def test_universal_head_follows_the_most_common_label_set() -> None:
    sizes = {**SIZES, "siteE": {"lesion": 0.003, "cord": 0.03}}
    space = build_label_space(sizes)
    assert space.universal_site == "siteB"  # {lesion, cord} is annotated by two sites
    assert space.label_map("universal") == {"cord": 0, "lesion": 1}
    # A tie between label sets goes to the larger set.
    assert build_label_space(SIZES).universal_site == "siteC"
    assert build_label_space({"b": {"lesion": 0.1}, "a": {"lesion": 0.2}}).universal_site == "a"


def test_manifest_labels_are_json_in_channel_order() -> None:
    space = build_label_space(SIZES)
    labels = space.manifest_labels("siteC")
    assert labels == [
        {"name": "csf", "value": 1, "channel": 0},
        {"name": "cord", "value": 1, "channel": 1},
        {"name": "lesion", "value": 1, "channel": 2},
    ]
    assert LabelSpace.from_json(json.loads(json.dumps(space.to_json()))) == space


def test_targets_stack_masks_into_shared_channels_with_a_channel_mask() -> None:
    space = build_label_space(SIZES)
    lesion = np.zeros((4, 4, 4), np.uint8)
    lesion[1, 1, 1] = 1
    cord = np.zeros((4, 4, 4), np.uint8)
    cord[:, 1:3, 1:3] = 2  # any non-zero value counts
    targets, mask = space.targets("siteB", {"lesion": lesion, "cord": cord})
    assert targets.shape == (3, 4, 4, 4) and targets.dtype == np.uint8
    assert mask.tolist() == [True, True, False]
    assert targets[0].sum() == 16 and targets[1].sum() == 1 and targets[2].sum() == 0
    # A case lacking one of its site's labels trains only the channels it has.
    targets, mask = space.targets("siteB", {"lesion": lesion})
    assert mask.tolist() == [False, True, False] and targets[1].sum() == 1


def test_grouped_labels_merge_into_one_channel() -> None:
    space = build_label_space({"s": {"lesion": 0.01, "lesion-core": 0.001}}, {"lesion": ["lesion", "lesion-core"]})
    a, b = np.zeros((2, 2, 2), np.uint8), np.zeros((2, 2, 2), np.uint8)
    a[0, 0, 0] = b[1, 1, 1] = 1
    targets, mask = space.targets("s", {"lesion": a, "lesion-core": b})
    assert space.channels == 1 and mask.tolist() == [True] and targets[0].sum() == 2


def test_targets_refuse_unknown_labels_and_sites() -> None:
    space = build_label_space(SIZES)
    with pytest.raises(TrainingError, match="site's labels are"):
        space.targets("siteA", {"cord": np.zeros((2, 2, 2))})
    with pytest.raises(TrainingError, match="not in the label space"):
        space.targets("siteZ", {"lesion": np.zeros((2, 2, 2))})


def test_a_new_site_is_ranked_into_the_existing_channels() -> None:
    space = build_label_space(SIZES)
    grown = space.with_site("siteF", {"lesion": 0.001, "cord": 0.01})
    assert grown.label_map("siteF") == {"cord": 0, "lesion": 1}
    assert grown.channels == space.channels
    assert all(grown.label_map(s) == space.label_map(s) for s in space.sites)
    with pytest.raises(TrainingError, match="has 4 labels"):
        space.with_site("siteG", {"a": 0.1, "b": 0.2, "c": 0.3, "d": 0.4})


def test_measured_size_is_the_mean_fraction_of_voxels_per_site() -> None:
    small, large = np.zeros((10, 10, 10)), np.zeros((10, 10, 10))
    small[:1, :1, :10] = 1  # 1 %
    large[:3, :10, :10] = 1  # 30 %
    sizes = measure_label_sizes([("A", {"lesion": small}), ("A", {"lesion": large}), ("B", {"cord": large})])
    assert sizes == {"A": {"lesion": pytest.approx(0.155)}, "B": {"cord": pytest.approx(0.3)}}


def test_no_sites_or_empty_label_sets_are_refused() -> None:
    with pytest.raises(TrainingError, match="no site"):
        build_label_space({})
    with pytest.raises(TrainingError, match=r"\['x'\] have no labels"):
        build_label_space({"x": {}})


def test_a_site_added_later_follows_the_grouping_by_meaning():
    """Under a grouping, a new site's labels go to their groups' channels, not to size ranks."""
    space = build_label_space(
        {"a": {"lesion": 0.001, "cord": 0.02}, "b": {"lesion": 0.002}},
        grouping={"lesion": ["lesion"], "cord": ["cord"]},
    )
    grown = LabelSpace.from_json(space.to_json()).with_site("new", {"cord": 0.03, "lesion": 0.001})
    assert grown.label_map("new") == {"lesion": 0, "cord": 1}
    ranked = build_label_space({"a": {"lesion": 0.001, "cord": 0.02}}).with_site("new", {"cord": 0.03, "lesion": 0.001})
    assert ranked.label_map("new") == {"cord": 0, "lesion": 1}


def test_a_site_added_to_a_saved_backbone_keeps_each_group_on_its_channel(tmp_path):
    """A backbone checkpoint stores the label space as JSON with sorted keys; read back, a site added later must
    still put its lesions on the lesion channel, not on the channel of the group whose name sorts there."""
    import torch

    from sct_sitehead.training.checkpoint import load_checkpoint, save_checkpoint

    space = build_label_space(
        {"a": {"lesion": 0.001, "cord": 0.02, "csf": 0.03}, "b": {"lesion": 0.002, "cord": 0.02}},
        grouping={"lesion": ["lesion"], "cord": ["cord"], "csf": ["csf"]},
    )
    assert space.label_map("a") == {"lesion": 0, "cord": 1, "csf": 2}
    path = save_checkpoint(tmp_path / "backbone.safetensors", {"w": torch.zeros(1)}, {"label_space": space.to_json()})
    _, meta, _ = load_checkpoint(path)
    restored = LabelSpace.from_json(meta["label_space"])
    assert list(restored.groups) == ["lesion", "cord", "csf"]
    assert restored.with_site("new", {"lesion": 0.001}).label_map("new") == {"lesion": 0}
    assert restored.with_site("new", {"csf": 0.03, "cord": 0.02}).label_map("new") == {"csf": 2, "cord": 1}
