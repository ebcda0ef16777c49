"""The training path feeds the deploy path: simulate, train, export, publish, then segment and evaluate.

Runs through the command-line tools in-process on the tiny config (seconds), so each side is tested against
the other's real interface: what `export` and `publish` write is what `sct_deepseg_lesion` reads.
"""

from __future__ import annotations

import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

pytest.importorskip("torch")

from sct_sitehead.cli import admin as admin_cli
from sct_sitehead.cli import deepseg_lesion as cli
from sct_sitehead.errors import RegistryError
from sct_sitehead.evaluation.thresholds import MIN_LESIONS_MM3
from sct_sitehead.registry.cache import Cache
from sct_sitehead.registry.index import Registry
from sct_sitehead.registry.specs import LOCALISER_WINDOWS, WindowSpec

pytestmark = [pytest.mark.train, pytest.mark.slow]


def sitehead(*argv) -> None:
    assert admin_cli.main([str(a) for a in argv]) == 0


@pytest.fixture(scope="module")
def published(tmp_path_factory, bids_dir: Path) -> dict[str, Path]:
    import torch

    torch.set_num_threads(1)
    root = tmp_path_factory.mktemp("e2e")
    sim = root / "sim"
    sitehead("simulate", bids_dir, sim, "-n", 4, "-seed", 3, "-sites", "montreal,toronto", "-holdout", "sub-unf01")
    sitehead("train-backbone", sim, root / "backbone", "-config", "tiny")
    backbone = root / "backbone" / "backbone.safetensors"
    sitehead(
        "train-head",
        sim,
        root / "heads",
        "-backbone",
        backbone,
        "-site",
        "montreal",
        "-strategy",
        "wider",
        "-config",
        "tiny",
    )
    sitehead(
        "train-head",
        sim,
        root / "heads",
        "-backbone",
        backbone,
        "-site",
        "toronto",
        "-strategy",
        "spatial",
        "-config",
        "tiny",
    )
    heads = [root / "heads" / f"head-{site}.safetensors" for site in ("montreal", "toronto")]
    sitehead("export", root / "export", "-backbone", backbone, *[x for h in heads for x in ("-head", h)])
    localiser = root / "localiser.json"
    localiser.write_text(
        json.dumps(
            {
                "input": {
                    "orientation": "RAS",
                    "spacing": [4.0, 4.0, 4.0],
                    "patch_size": [16, 16, 16],
                    "divisor": 2,
                    "normalization": {"method": "zscore", "clip_percentiles": [0.5, 99.5]},
                },
                "model": {"features": [4, 8]},
                "labels": {"grouping": {"cord": ["cord"]}, "suffixes": {"cord": ["seg-manual", "seg"]}},
                "train": {
                    "patch_size": [16, 16, 16],
                    "batch_size": 2,
                    "steps": 10,
                    "lr": 0.01,
                    "warmup_steps": 2,
                    "device": "cpu",
                    "checkpoint_every": 10,
                    "log_every": 5,
                },
            }
        )
    )
    sitehead("train-backbone", sim, root / "localiser", "-config", localiser)
    sitehead("export", root / "localiser-export", "-backbone", root / "localiser" / "backbone.safetensors")
    sitehead(
        "publish",
        root / "export",
        root / "registry",
        "-model",
        "lesion",
        "-version",
        "0.1.0",
        "-default",
        "-localiser",
        root / "localiser-export",
        "-margin",
        15,
    )
    return {"root": root, "sim": sim, "registry": root / "registry" / "registry.json"}


def test_published_index_lists_every_head_with_its_strategy(published):
    index = json.loads(published["registry"].read_text())
    release = index["models"]["lesion"]["releases"]["0.1.0"]
    assert {site: head["strategy"] for site, head in release["heads"].items()} == {
        "universal": "pooled",
        "montreal": "wider",
        "toronto": "spatial",
    }
    assert index["serial"] == 1 and index["default_model"] == "lesion"
    localiser = release["localiser"]
    assert localiser["input"]["spacing"] == [4.0, 4.0, 4.0] and localiser["margin_mm"] == 15
    assert (published["registry"].parent / localiser["head"]["url"]).is_file()
    assert release["windows"]["localiser"] == LOCALISER_WINDOWS.as_dict()


def test_the_localiser_runs_the_windows_its_release_names(published, tmp_path):
    """``windows.localiser`` of the index reaches the localiser's spec; absent, the settings of older releases;
    out of range, the index is refused."""
    index = json.loads(published["registry"].read_text())
    release = index["models"]["lesion"]["releases"]["0.1.0"]

    def parsed(windows):
        if windows is None:
            release.pop("windows", None)
        else:
            release["windows"] = {"localiser": windows}
        path = tmp_path / "registry.json"
        path.write_text(json.dumps(index))
        return Registry.load(str(path), cache=Cache(tmp_path / "cache"), offline=True).release().localiser.windows

    chosen = {**LOCALISER_WINDOWS.as_dict(), "overlap": 0.5, "batch_size": 1, "max_patches": 3}
    assert parsed(chosen) == WindowSpec(0.5, 1, 3, True, False)
    assert parsed(None) == LOCALISER_WINDOWS
    with pytest.raises(RegistryError):
        parsed({**chosen, "overlap": 1.5})


def test_deploy_cli_runs_the_published_release(published, tmp_path, capsys):
    image = next(published["sim"].glob("sub-montreal*/anat/*.nii.gz"))
    out = tmp_path / "out"
    code = cli.main(
        ["-i", str(image), "-site", "montreal,toronto", "-ofolder", str(out), "-registry", str(published["registry"])]
    )
    assert code == 0, capsys.readouterr().err
    source = nib.load(image)
    for site in ("montreal", "toronto"):
        mask = nib.load(next(out.glob(f"*_lesionseg_{site}.nii.gz")))
        assert mask.shape == source.shape and np.allclose(mask.affine, source.affine)
    assert list(out.glob("*_cordseg_montreal.nii.gz")), "montreal annotates the cord: its head writes it too"
    assert not list(out.glob("*_cordseg_toronto.nii.gz")), "toronto annotates lesions only"
    sidecar = json.loads(next(out.glob("*_lesionseg_montreal.json")).read_text())
    # The localiser ran (10 training steps: it may or may not find the cord); a box, when found, is in the image.
    assert sidecar["CordCrop"] is None or all(
        0 <= a < b <= n for (a, b), n in zip(sidecar["CordCrop"]["Bbox"], source.shape)
    )


def test_evaluate_writes_tables_and_plot(published, tmp_path):
    report = tmp_path / "report"
    sitehead("evaluate", published["sim"], "-o", report, "-registry", published["registry"], "-threads", 1)
    summary = (report / "summary.tsv").read_text().splitlines()
    header = summary[0].split("\t")
    assert {"site", "head", "dice", "f1_any", "f1_10pct", "dice_low", "dice_high"} <= set(header)
    sites = {line.split("\t")[0] for line in summary[1:]}
    assert {"montreal", "toronto", "pooled"} <= sites
    assert (report / "dice.png").read_bytes()[:4] == b"\x89PNG"
    assert "| montreal | montreal |" in (report / "report.md").read_text()
    lesions = (report / "lesions.tsv").read_text().splitlines()
    assert len(lesions) > 1 and "shell_contrast" in lesions[0].split("\t")
    # The simulated data carry every subject's cord (derivatives/truth): each lesion gets its contrast to it.
    column = lesions[0].split("\t").index("cord_contrast")
    measured = [line.split("\t")[column] for line in lesions[1:]]
    assert sum(value not in ("", "nan") for value in measured) > len(measured) / 2
    assert "contrast to the cord" in (report / "report.md").read_text()


def test_tuned_thresholds_are_published(published, tmp_path):
    """tune-thresholds picks each head's threshold on the val split; publish -thresholds puts them in the index."""
    tuned = tmp_path / "thresholds.json"
    # The tiny dataset has few val subjects; any split but test will do here.
    sitehead(
        "tune-thresholds",
        published["sim"],
        "-o",
        tuned,
        "-split",
        "train",
        "-registry",
        published["registry"],
        "-threads",
        1,
        "-loo",
    )
    heads = json.loads(tuned.read_text())["heads"]
    assert set(heads) == {"universal", "montreal", "toronto"}
    assert all(0 < row["threshold"] < 1 and row["dice"] >= row["dice_at_0.5"] for row in heads.values())
    assert all(row["threshold"] == 0.5 for row in heads.values() if not row["holds"])
    assert all(
        row["min_lesion_mm3"] in MIN_LESIONS_MM3 and row["f1"] >= row["f1_all_lesions"] for row in heads.values()
    )
    registry = tmp_path / "registry"
    root = published["root"]
    sitehead("publish", root / "export", registry, "-model", "lesion", "-version", "0.1.0", "-thresholds", tuned)
    release = json.loads((registry / "registry.json").read_text())["models"]["lesion"]["releases"]["0.1.0"]
    assert {site: head["threshold"] for site, head in release["heads"].items()} == {
        head: row["threshold"] for head, row in heads.items()
    }
    assert {site: head.get("min_lesion_mm3", 0.0) for site, head in release["heads"].items()} == {
        head: row["min_lesion_mm3"] for head, row in heads.items()
    }
    assert (
        admin_cli.main(
            [
                "tune-thresholds",
                str(published["sim"]),
                "-o",
                str(tuned),
                "-split",
                "test",
                "-registry",
                str(published["registry"]),
            ]
        )
        == 2
    )


def test_tuning_with_controls_scores_only_the_split_persons_healthy_scans(published, bids_dir, tmp_path):
    """-controls: the healthy scans of the tuned split's persons are scored (errsm11 is a train person, errsm23 a
    test person: only errsm11's scan counts), the file says which, and a split without such scans is refused."""
    controls = tmp_path / "controls"
    rows = ["participant_id\tpathology"]
    for subject in ("sub-errsm11", "sub-errsm23"):
        (controls / subject / "anat").mkdir(parents=True)
        source = bids_dir / subject / "anat" / f"{subject}_T2w.nii.gz"
        (controls / subject / "anat" / source.name).symlink_to(source)
        rows.append(f"{subject}\tHC")
    (controls / "participants.tsv").write_text("\n".join(rows) + "\n")
    tuned = tmp_path / "thresholds.json"
    common = ["-registry", published["registry"], "-threads", 1, "-controls", controls]
    sitehead("tune-thresholds", published["sim"], "-o", tuned, "-split", "train", *common, "-max-flagged", 0.0)
    document = json.loads(tuned.read_text())
    assert document["controls"] == {"images": ["sub-errsm11_T2w.nii.gz"], "max_flagged": 0.0}
    for row in document["heads"].values():
        assert row["controls"] == 1 and row["controls_met"] in (True, False)
        assert row["controls_flagged"] == (0 if row["controls_met"] else 1)
    refused = admin_cli.main(
        ["tune-thresholds", str(published["sim"]), "-o", str(tmp_path / "val.json"), "-split", "val"]
        + [str(a) for a in common]
    )
    assert refused == 2 and not (tmp_path / "val.json").exists()


def test_adding_a_site_changes_no_other_head(published, tmp_path):
    """Publishing a release with one more site keeps the backbone and every other head byte for byte."""
    root = published["root"]
    backbone = root / "backbone" / "backbone.safetensors"
    admin_cli.main(
        [
            "train-head",
            str(published["sim"]),
            str(root / "heads2"),
            "-backbone",
            str(backbone),
            "-site",
            "toronto",
            "-strategy",
            "finetune",
            "-config",
            "tiny",
        ]
    )
    heads = [root / "heads" / "head-montreal.safetensors", root / "heads2" / "head-toronto.safetensors"]
    sitehead("export", tmp_path / "export", "-backbone", backbone, *[x for h in heads for x in ("-head", h)])
    before = json.loads((root / "export" / "export.json").read_text())
    after = json.loads((tmp_path / "export" / "export.json").read_text())
    assert after["backbone"]["sha256"] == before["backbone"]["sha256"]
    assert after["heads"]["montreal"]["sha256"] == before["heads"]["montreal"]["sha256"]
    assert after["heads"]["universal"]["sha256"] == before["heads"]["universal"]["sha256"]
    assert after["heads"]["toronto"]["sha256"] != before["heads"]["toronto"]["sha256"]


def test_check_localiser_reports_where_the_cord_rule_keeps_lesions(published):
    """bin/check_localiser runs on a published release with a localiser and counts every reference lesion."""
    import subprocess
    import sys

    script = Path(__file__).resolve().parents[1] / "bin" / "check_localiser"
    done = subprocess.run(
        [
            sys.executable,
            str(script),
            str(published["sim"]),
            "-registry",
            str(published["registry"]),
            "-split",
            "train",
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr
    last = done.stdout.strip().splitlines()[-1]
    assert last.startswith("all: ") and "lesions in the cord rule's region (lesion@0.1.0, train)" in last
    kept, total = (int(n) for n in last.split()[1].split("/"))
    assert 0 <= kept <= total and total > 0
