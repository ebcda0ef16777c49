"""Training configuration: JSON files in ``configs/`` merged over :data:`DEFAULTS`, then checked.

A config has five sections. ``input`` is the release's input spec (DESIGN.md, "Registry index") and is copied
verbatim into the manifest; ``model`` sizes the U-Net; ``labels`` controls label sharing; ``train`` and ``head``
drive the backbone and head training loops; ``augment`` sets augmentation probabilities and ranges.
"""

from __future__ import annotations

import copy
import json
import logging
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from sct_sitehead.errors import TrainingError

logger = logging.getLogger(__name__)

CONFIG_DIR = Path(__file__).resolve().parent / "configs"

DEFAULTS: dict[str, Any] = {
    "input": {
        "orientation": "RAS",
        "spacing": [1.0, 1.0, 1.0],
        "patch_size": [64, 64, 64],
        "divisor": 16,
        "normalization": {"method": "zscore", "clip_percentiles": [0.5, 99.5]},
    },
    "model": {
        # Features per resolution level, full resolution first; len(features) levels.
        "features": [8, 16, 32, 64, 128],
        # Decoder stages, counted from the full-resolution end, that belong to the head.
        "head_stages": 1,
        # Channels of the full-resolution decoder stage (null: features[0]); its kernel and conv count.
        "final_width": None,
        "final_kernel": 1,
        "final_convs": 1,
        "negative_slope": 0.01,
    },
    # Label sharing: null ranks each site's labels by mean relative size; a dict groups labels by meaning.
    # suffixes: label name -> BIDS derivative suffix(es) for read_bids (null: its defaults, lesion and cord).
    # mode: null (grouping when given, else size), "size", "grouping", or "merged" (one channel per (site, label)).
    # derivatives: the labels' tree in the dataset ("derivatives/truth": the simulator's truth, every subject).
    # label_map: the suffix of each image's label map under derivatives/truth (the simulator's "labelmap-truth"),
    # the source of augment.synth; None: no label map is read.
    "labels": {
        "grouping": None,
        "suffixes": None,
        "mode": None,
        "derivatives": "derivatives/labels",
        "label_map": None,
    },
    "train": {
        "patch_size": [48, 48, 48],
        "batch_size": 2,
        "steps": 1000,
        "lr": 0.003,
        "weight_decay": 3e-5,
        "schedule": "poly",
        "warmup_steps": 50,
        "lesion_fraction": 0.33,
        # Weight of the blob term (losses.blob_dice: each lesion's own Dice, averaged over lesions) added to Dice +
        # BCE on the lesion channels; 0 leaves the loss as it was.
        "blob_weight": 0.0,
        # Weight of the lesion channels' positive voxels in the BCE (its pos_weight): above 1, a missed lesion voxel
        # costs that many times a false one. 1 leaves the loss as it was.
        "lesion_weight": 1.0,
        "seed": 0,
        "amp": True,
        "device": "auto",
        "threads": None,
        "checkpoint_every": 100,
        "log_every": 10,
        "resume": True,
        # With a BIDS folder whose participants.tsv has a "split" column, train on these participants only.
        "split": "train",
        # With a BIDS folder: only these sites / participants (null: all); experiments pick data subsets with them.
        "sites": None,
        "subjects": None,
        # Sampling weight per site (absent: 1): a case of a site with weight 3 is drawn 3 times as often as a case
        # of weight 1. Empty: every case equally likely, as before the setting existed.
        "site_weights": {},
    },
    "head": {
        "steps": 200,
        "lr": 0.003,
        "warmup_steps": 10,
        # Channels added per head layer by the wider and spatial strategies, and the spatial branch's width.
        "extra": 2,
        "map_width": 4,
    },
    "augment": {
        "flip": 0.5,
        "affine": 0.3,
        "rotate_degrees": 15.0,
        "scale": [0.85, 1.15],
        "gamma": 0.3,
        "gamma_range": [0.7, 1.5],
        "noise": 0.15,
        "noise_std": 0.1,
        # Probability that the noise is Rician (a magnitude image's) instead of Gaussian. 0 draws nothing.
        "rician": 0.0,
        # Probability of Gibbs ringing along one random axis: k-space cut to a central fraction in gibbs_keep.
        "gibbs": 0.0,
        "gibbs_keep": [0.3, 0.8],
        # Probability of motion-like ghosts along one random axis: every n-th k-space line (n in ghosting_count)
        # scaled down by a fraction in ghosting_intensity.
        "ghosting": 0.0,
        "ghosting_count": [2, 6],
        "ghosting_intensity": [0.1, 0.5],
        "bias": 0.3,
        "bias_strength": 0.3,
        "resolution": 0.25,
        "resolution_factor": [1.5, 4.0],
        # Probability of negating the (z-scored) image: T1w-like contrast from T2w and back. 0 draws nothing, so
        # configs without it train exactly as before.
        "invert": 0.0,
        # Probability of a random increasing intensity curve (tissue contrasts change, their order does not).
        "curve": 0.0,
        "curve_points": 3,
        # Probability of scaling (log-uniform in brightness_scale) then shifting (uniform +-brightness_shift) the
        # z-scored image: the z-scores of cord and lesion move with the anatomy and field of view.
        "brightness": 0.0,
        "brightness_scale": [0.7, 1.4],
        "brightness_shift": 0.5,
        # Probability of replacing a patch's image by one synthesised from its label map (labels.label_map;
        # training/synth.py): a random intensity per tissue class (synth_classes: the simulator's label map), the
        # lesion at +-lesion_contrast from the white matter, grey matter within +-grey_matter_contrast of it, a
        # texture of up to synth_texture, a blur of synth_blur voxels. 0 draws nothing. synth_classes.count null:
        # the number of classes in the dataset's label map table (simulation.json), so data simulated before the
        # vertebra and disc classes draw as they always did. lesion_csf_gap: the CSF's mean is drawn again until it
        # is at least this far from the lesion's, so a lesion on the cord's rim never blends into the CSF beside it;
        # 0 draws nothing more. synth_lesions_as_labelled: the synthesised image draws its lesions where the patch's
        # lesion target marks one (training/synth.py draw_lesions_as_labelled), not where the simulator placed one
        # that the site's grid or protocol left unannotated; false draws the label map's lesions as they are.
        "synth": 0.0,
        "synth_lesions_as_labelled": False,
        "synth_classes": {"count": None, "white_matter": 7, "grey_matter": 8, "lesion": 9, "csf": 6},
        "lesion_contrast": [0.12, 0.9],
        "lesion_csf_gap": 0.0,
        "grey_matter_contrast": 0.3,
        "synth_texture": 0.08,
        "synth_blur": [0.0, 1.2],
    },
}

_SCHEDULES = ("poly", "cosine")
#: ``labels.mode`` values; see :func:`.labels.build_label_space`.
LABEL_MODES = (None, "size", "grouping", "merged")


def load_config(source: str | Path | Mapping[str, Any], _chain: tuple[str, ...] = ()) -> dict[str, Any]:
    """Read a config by name (``"tiny"`` -> ``configs/tiny.json``), by path, or take a dict, then complete it.

    A config with ``"extends": NAME`` is completed over config NAME (itself completed over :data:`DEFAULTS`)
    instead of over the defaults, so a variant lists only what it changes.

    Returns:
        A new dict with every section and key of :data:`DEFAULTS`, the given values taking precedence.

    Raises:
        TrainingError: unknown name, unreadable file, unknown key, invalid value or a config extending itself.
    """
    if isinstance(source, Mapping):
        given: Any = copy.deepcopy(dict(source))
        where = "config dict"
    else:
        path = Path(source)
        if not path.suffix and not path.exists():
            path = CONFIG_DIR / f"{source}.json"
        if not path.is_file():
            names = sorted(p.stem for p in CONFIG_DIR.glob("*.json"))
            raise TrainingError(f"training config {source!r} not found; give a JSON file or one of {names}")
        try:
            given = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError) as exc:
            raise TrainingError(f"training config {path} cannot be read as JSON ({exc}); fix the file") from exc
        where = str(path)
    if not isinstance(given, dict):
        raise TrainingError(f"{where}: a training config must be a JSON object, got {type(given).__name__}")
    parent = given.pop("extends", None)
    if parent is not None:
        if str(parent) in _chain:
            raise TrainingError(f"{where}: extends {parent!r}, which extends it back ({' -> '.join(_chain)})")
        config = _merge(load_config(parent, (*_chain, str(parent))), given, where, "")
    else:
        config = _merge(DEFAULTS, given, where, "")
    check_config(config)
    return config


def _merge(base: Mapping[str, Any], given: Mapping[str, Any], where: str, prefix: str) -> dict[str, Any]:
    out = copy.deepcopy(dict(base))
    for key, value in given.items():
        if key not in base:
            raise TrainingError(
                f"{where}: unknown key '{prefix}{key}'; known keys here are {sorted(base)}; check the spelling"
            )
        # Only sections merge; values that are themselves dicts (normalization, grouping) are replaced whole.
        if isinstance(base[key], dict) and isinstance(value, dict) and prefix == "" and key != "input":
            out[key] = _merge(base[key], value, where, f"{key}.")
        else:
            out[key] = copy.deepcopy(value)
    return out


def check_config(config: Mapping[str, Any]) -> None:
    """Reject values that would fail later, deep in training or export.

    Raises:
        TrainingError: naming the key, its value and what is allowed.
    """
    model, train, spec = config["model"], config["train"], config["input"]
    features = model["features"]
    if not isinstance(features, list) or len(features) < 2 or not all(isinstance(f, int) and f > 0 for f in features):
        raise TrainingError(f"model.features must list >= 2 positive channel counts, got {features!r}")
    levels = len(features)
    if not 1 <= int(model["head_stages"]) <= levels - 1:
        raise TrainingError(
            f"model.head_stages must be 1 to {levels - 1} for {levels} levels, got {model['head_stages']!r}"
        )
    if int(model["final_kernel"]) not in (1, 3) or int(model["final_convs"]) < 1:
        raise TrainingError(
            f"model.final_kernel must be 1 or 3 and final_convs >= 1, got {model['final_kernel']!r}, "
            f"{model['final_convs']!r}"
        )
    need = 2 ** (levels - 1)
    divisor = int(spec["divisor"])
    if divisor % need:
        raise TrainingError(f"input.divisor {divisor} must be a multiple of {need} (2^(levels-1) for {levels} levels)")
    for name, patch in (("input.patch_size", spec["patch_size"]), ("train.patch_size", train["patch_size"])):
        if len(patch) != 3 or any(int(p) <= 0 or int(p) % divisor for p in patch):
            raise TrainingError(f"{name} {patch!r} must be 3 positive multiples of input.divisor {divisor}")
    if spec["normalization"].get("method") != "zscore":
        raise TrainingError(f"input.normalization.method {spec['normalization'].get('method')!r}: only 'zscore' exists")
    if train["schedule"] not in _SCHEDULES:
        raise TrainingError(f"train.schedule {train['schedule']!r} is not one of {list(_SCHEDULES)}")
    for key in ("steps", "batch_size"):
        if int(train[key]) < 1:
            raise TrainingError(f"train.{key} must be >= 1, got {train[key]!r}")
    if not 0.0 <= float(train["lesion_fraction"]) <= 1.0:
        raise TrainingError(f"train.lesion_fraction must be in [0, 1], got {train['lesion_fraction']!r}")
    if not float(train["blob_weight"]) >= 0.0:
        raise TrainingError(f"train.blob_weight must be >= 0, got {train['blob_weight']!r}")
    if not float(train["lesion_weight"]) > 0.0:
        raise TrainingError(f"train.lesion_weight must be > 0, got {train['lesion_weight']!r}")
    labels = config["labels"]
    if labels["mode"] not in LABEL_MODES:
        raise TrainingError(f"labels.mode {labels['mode']!r} is not one of {list(LABEL_MODES)}")
    if labels["mode"] == "grouping" and not labels["grouping"]:
        raise TrainingError("labels.mode is 'grouping' but labels.grouping is empty; give the groups or another mode")
    derivatives = labels["derivatives"]
    inside = isinstance(derivatives, str) and derivatives and not Path(derivatives).is_absolute()
    if not inside or ".." in Path(derivatives).parts:
        raise TrainingError(
            f"labels.derivatives must be a folder inside the dataset such as 'derivatives/labels', got {derivatives!r}"
        )
    for key in ("sites", "subjects"):
        chosen = train[key]
        if chosen is not None and (not isinstance(chosen, list) or not all(isinstance(x, str) for x in chosen)):
            raise TrainingError(f"train.{key} must be null or a list of names, got {chosen!r}")
    weights = train["site_weights"]
    if not isinstance(weights, dict) or not all(
        isinstance(site, str) and isinstance(w, (int, float)) and not isinstance(w, bool) and w > 0
        for site, w in weights.items()
    ):
        raise TrainingError(f"train.site_weights must map site names to numbers > 0, got {weights!r}")
    if int(config["head"]["extra"]) < 1 or int(config["head"]["map_width"]) < 1:
        raise TrainingError(f"head.extra and head.map_width must be >= 1, got {config['head']!r}")
    augment = config["augment"]
    for key in ("flip", "affine", "gamma", "noise", "bias", "resolution", "invert", "curve", "brightness"):
        if not 0.0 <= float(augment[key]) <= 1.0:
            raise TrainingError(f"augment.{key} is a probability in [0, 1], got {augment[key]!r}")
    low, high = augment["brightness_scale"]
    if not 0 < float(low) <= float(high) or float(augment["brightness_shift"]) < 0 or int(augment["curve_points"]) < 1:
        raise TrainingError(
            "augment.brightness_scale must be [low, high] with 0 < low <= high, brightness_shift >= 0 and "
            f"curve_points >= 1, got {augment['brightness_scale']!r}, {augment['brightness_shift']!r}, "
            f"{augment['curve_points']!r}"
        )
