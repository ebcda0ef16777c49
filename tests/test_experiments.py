"""The experiment runner: its plan, label modes, data filters and summaries (fast), then `-quick` end to end."""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

import pytest

from experiments import main, report, scoring
from experiments import plan as xp
from sct_sitehead.errors import TrainingError
from sct_sitehead.training.config import load_config
from sct_sitehead.training.labels import build_label_space

SIZES = {
    "a": {"lesion": 0.001},
    "b": {"cord": 0.02, "lesion": 0.002},
    "c": {"csf": 0.05, "cord": 0.02, "lesion": 0.001},
}
GROUPING = {"lesion": ["lesion"], "cord": ["cord"], "csf": ["csf"]}


def settings(tmp_path: Path, **given) -> xp.Settings:
    values = dict(
        config="tiny",
        work=tmp_path,
        out=tmp_path / "out",
        source=tmp_path,
        sites=("montreal", "toronto", "london"),
        curve=(1, 2, 4),
    )
    values.update(given)
    return xp.Settings(**values)


def test_merged_mode_gives_every_site_label_its_own_channel() -> None:
    space = build_label_space(SIZES, GROUPING, mode="merged")
    assert space.channels == 6
    assert space.label_map("a") == {"lesion": 0}
    assert space.label_map("b") == {"cord": 1, "lesion": 2}
    assert space.label_map("c") == {"csf": 3, "cord": 4, "lesion": 5}


def test_size_mode_ignores_a_grouping_and_grouping_mode_needs_one() -> None:
    assert build_label_space(SIZES, GROUPING, mode="size").label_map("b") == {"cord": 0, "lesion": 1}
    assert build_label_space(SIZES, GROUPING).label_map("b") == {"cord": 1, "lesion": 0}  # unchanged default
    with pytest.raises(TrainingError, match="grouping"):
        build_label_space(SIZES, None, mode="grouping")


def test_config_checks_the_new_options() -> None:
    config = load_config({"labels": {"mode": "merged"}, "train": {"sites": ["a"], "subjects": None}})
    assert config["labels"]["mode"] == "merged" and config["train"]["sites"] == ["a"]
    with pytest.raises(TrainingError, match="labels.mode"):
        load_config({"labels": {"mode": "ranked"}})
    with pytest.raises(TrainingError, match="train.subjects"):
        load_config({"train": {"subjects": "sub-a"}})
    assert load_config("localiser_truth")["labels"]["derivatives"] == "derivatives/truth"
    assert load_config("localiser")["labels"]["derivatives"] == "derivatives/labels"
    for outside in ("/data/labels", "../labels", ""):
        with pytest.raises(TrainingError, match="labels.derivatives"):
            load_config({"labels": {"derivatives": outside}})


def test_every_variant_points_at_a_trained_model_and_head(tmp_path: Path) -> None:
    plan = xp.make_plan(settings(tmp_path, seeds=3), [f"sub-london{i:03d}" for i in range(1, 9)])
    heads = {m.key: {h.name for h in m.heads} | {xp.UNIVERSAL} for m in plan.models}
    for key, by_site in plan.needed().items():
        assert key in heads, key
        for wanted in by_site.values():
            assert wanted <= heads[key], (key, wanted - heads[key])
    assert {c.name: c.seeds for c in plan.comparisons} == {
        "heads": (0, 1, 2),
        "separate": (0,),
        "labels": (0,),
        "curve": (0,),
    }
    minus = plan.model("pooled-minus-london-s0")
    assert "london" not in minus.sites
    subsets = [set(h.subjects) for h in minus.heads if h.strategy == "wider"]
    assert [len(s) for s in subsets] == [1, 2, 4] and subsets[0] < subsets[1] < subsets[2]  # nested


def test_job_configs_select_sites_subjects_mode_and_seed(tmp_path: Path) -> None:
    plan = xp.make_plan(settings(tmp_path, seeds=2), ["sub-london002", "sub-london001"])
    base = load_config("tiny")
    model = plan.model("pooled-grouping-s1")
    config = model.config(base)
    assert config["train"]["seed"] == 1 and config["labels"]["mode"] == "grouping"
    assert config["labels"]["grouping"] == xp.meaning_grouping()  # tiny has none: grouped by meaning
    assert config["train"]["sites"] == ["montreal", "toronto", "london"]
    curve = plan.model("pooled-minus-london-s0")
    head = next(h for h in curve.heads if h.name == "london.wider.n01")
    head_config = curve.head_config(base, head)
    assert head_config["train"]["sites"] == ["london"] and head_config["train"]["subjects"] == ["sub-london002"]
    own = plan.model("pooled-size-s0").heads[0]
    assert plan.model("pooled-size-s0").head_config(base, own)["head"]["steps"] == 0
    load_config(head_config)  # still a valid config


def _row(model: str, head: str, site: str, subject: str, dice: float) -> dict:
    # One reference lesion and no predicted lesion in counts: pooled precision is undefined (nothing predicted).
    counts = {
        f"{k}_{r}": float(k in ("n_ref", "fn")) for k in ("n_ref", "n_pred", "tp", "fp", "fn") for r in ("any", "10pct")
    }
    return {
        "model": model,
        "head": head,
        "site": site,
        "subject": subject,
        "dice": dice,
        "f1_any": dice,
        "f1_10pct": dice,
        "sensitivity_any": 1.0,
        "precision_any": math.nan,
        "avd_mm3": 10.0,
        "volume_ref_mm3": 20.0,
        **counts,
    }


def test_summaries_average_seeds_per_case_then_pair_against_the_baseline(tmp_path: Path) -> None:
    comparison = next(
        c
        for c in xp.make_plan(
            settings(tmp_path, seeds=2, sites=("montreal", "london")), ["sub-london001"] * 4
        ).comparisons
        if c.name == "heads"
    )
    rows = []
    for seed, shift in ((0, 0.0), (1, 0.2)):
        for subject, site in (("sub-m1", "montreal"), ("sub-m2", "montreal"), ("sub-l1", "london")):
            rows.append(_row(f"pooled-grouping-s{seed}", "universal", site, subject, 0.2 + shift))
            for strategy in xp.HEAD_STRATEGIES:
                rows.append(_row(f"pooled-grouping-s{seed}", f"{site}.{strategy}", site, subject, 0.5 + shift))
    subjects = {"montreal": ["sub-m1", "sub-m2"], "london": ["sub-l1"]}
    entries = scoring.summarize_comparison(comparison, scoring.index_rows(rows), subjects)
    pooled = {e["variant"]: e for e in entries if e["site"] == "pooled"}
    assert pooled["universal"]["n"] == 3 and pooled["universal"]["seeds"] == 2
    assert pooled["universal"]["dice"] == pytest.approx(0.3)  # mean of 0.2 and 0.4 per case
    assert pooled["wider"]["delta_dice"] == pytest.approx(0.3)
    assert pooled["wider"]["dice_seed_sd"] == pytest.approx(0.2 / math.sqrt(2))
    assert math.isnan(pooled["wider"]["precision_any"])  # undefined everywhere stays undefined
    table = report.comparison_table(comparison, entries)
    assert "| pooled | wider | 3 | 0.600" in table and "0.300 [0.300, 0.300]" in table
    assert report.plot_bars(comparison, entries, tmp_path / "bars.png").read_bytes()[:4] == b"\x89PNG"


def test_costs_count_a_shared_backbone_once_and_what_each_site_adds(tmp_path: Path) -> None:
    plan = xp.make_plan(settings(tmp_path, seeds=1, sites=("montreal", "london")), ["sub-london001"] * 4)
    timing = {"backbone": {"wall_s": 600.0, "cpu_s": 1000.0}}
    costs = {
        m.key: {
            "timing": {**timing, **{h.name: {"wall_s": 60.0, "cpu_s": 100.0, "steps": h.steps} for h in m.heads}},
            "parameters": {"backbone": 1000, "universal": 10, **{h.name: 20 for h in m.heads}},
        }
        for m in plan.models
    }
    rows = {
        (r["comparison"], r["variant"]): r
        for c in plan.comparisons
        if c.name != "curve"
        for r in [report.variant_cost(c, v, costs) for v in c.variants]
    }
    assert rows[("heads", "universal")] == pytest.approx(
        {**rows[("heads", "universal")], "wall_s": 600.0, "parameters": 1010, "added_parameters": 0}
    )
    assert rows[("heads", "wider")]["wall_s"] == 720.0 and rows[("heads", "wider")]["parameters"] == 1040
    separate = rows[("separate", "separate")]
    assert separate["parameters"] == 2020 and separate["added_wall_s"] == 600
    assert rows[("labels", "size-ranked")]["added_parameters"] == 0  # own channels: an untrained copy


@pytest.mark.train
@pytest.mark.slow
def test_quick_run_writes_the_whole_report_and_resumes(tmp_path: Path, bids_dir: Path) -> None:
    pytest.importorskip("torch")
    work, out = tmp_path / "work", tmp_path / "report"
    argv = ["-quick", "-work", str(work), "-out", str(out), "-source", str(bids_dir), "-threads", "1", "-v", "0"]
    assert main(argv) == 0
    for name in (
        "report.md",
        "heads.tsv",
        "separate.tsv",
        "labels.tsv",
        "curve.tsv",
        "cost.tsv",
        "cases.tsv",
        "configs_used.json",
        "dice_heads.png",
        "learning_curve.png",
    ):
        assert (out / name).is_file(), name
    text = (out / "report.md").read_text()
    for title in ("Site heads", "Separate full per-site", "Label-space", "New site london", "## Cost"):
        assert title in text
    used = json.loads((out / "configs_used.json").read_text())
    assert used["seeds"]["heads"] == [0, 1] and "commit" in used["git"]
    assert used["jobs"]["pooled-merged-s0/backbone"]["labels"]["mode"] == "merged"
    settings_ = xp.make_settings(quick=True, work=work, out=out, seeds=None, source=bids_dir)
    n = xp.subjects_per_site(settings_)
    assert xp.predicted_splits(settings_, n) == xp.read_splits(work / "sim")  # the planner agrees with simulate
    backbone = work / "models" / "pooled-grouping-s0" / "backbone" / "backbone.safetensors"
    before = backbone.stat().st_mtime_ns
    assert main(argv) == 0  # every step found done
    assert backbone.stat().st_mtime_ns == before
    assert main([*argv[:-4], "-config", "smoke", "-v", "0"]) == 2  # another config in the same work folder


def test_a_dataset_with_the_frozen_split_is_scored_on_val(tmp_path: Path) -> None:
    """The release's frozen test split (``simulate -splits``) is scored once per shipped release, never by the
    experiment: its arms are scored on val; a dataset of the experiment's own holdout keeps its test split."""
    assert xp.scored_split(tmp_path) == "test"  # no simulation.json
    (tmp_path / "simulation.json").write_text(json.dumps({"splits": None, "seed": 0}))
    assert xp.scored_split(tmp_path) == "test"
    (tmp_path / "simulation.json").write_text(json.dumps({"splits": {"persons": {"test": ["ms01"], "val": ["x"]}}}))
    assert xp.scored_split(tmp_path) == "val"
    settings = xp.make_settings(quick=True, work=tmp_path, out=tmp_path / "out", seeds=None, source=tmp_path)
    table = {"montreal": {"sub-a": "val", "sub-b": "test", "sub-c": "train"}}
    assert xp.short_of(table, settings, "val") == xp.short_of(table, settings, "test")  # one of each
    assert "montreal: 0 val subjects" in xp.short_of({"montreal": {"sub-b": "test"}}, settings, "val")[0]


def test_git_version_ignores_the_report_folder_being_written(tmp_path: Path) -> None:
    import shutil
    import subprocess

    from experiments.runner import version_of_git

    if shutil.which("git") is None:
        pytest.skip("git is not installed")
    repo = tmp_path / "repo"
    (repo / "src").mkdir(parents=True)
    (repo / "src" / "a.py").write_text("x = 1\n")
    env = {"GIT_AUTHOR_NAME": "t", "GIT_AUTHOR_EMAIL": "t@t", "GIT_COMMITTER_NAME": "t", "GIT_COMMITTER_EMAIL": "t@t"}
    for args in (["init", "-q"], ["add", "."], ["commit", "-qm", "c"]):
        subprocess.run(["git", "-C", str(repo), *args], check=True, env={**os.environ, **env})
    out = repo / "reports" / "experiment"
    out.mkdir(parents=True)
    (out / "report.md").write_text("new\n")
    assert version_of_git(repo, out)["dirty"] is False and version_of_git(repo)["dirty"] is True
    assert len(version_of_git(repo, out)["commit"]) == 40
    (repo / "src" / "a.py").write_text("x = 2\n")
    assert version_of_git(repo, out)["dirty"] is True
