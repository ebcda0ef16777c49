"""sct_sitehead administration commands: models, cache, registry (serve, keygen, sign), publish, phantom."""

from __future__ import annotations

import hashlib
import json
import shutil
import threading
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from conftest import sha256_of, write_registry

from sct_sitehead import env
from sct_sitehead.cli import admin as admin_cli
from sct_sitehead.cli import deepseg_lesion as cli
from sct_sitehead.registry.publish import publish


def sitehead(argv, capsys) -> tuple[int, str, str]:
    code = admin_cli.main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


@pytest.fixture
def mirror(tmp_path: Path):
    """The tiny registry served by `registry serve`'s server on 127.0.0.1, counting requests per path."""
    from sct_sitehead.registry.server import RangeRequestHandler, make_server

    folder = tmp_path / "mirror"
    write_registry(folder)
    hits: dict[str, int] = {}

    class Counting(RangeRequestHandler):
        def do_GET(self):
            hits[self.path] = hits.get(self.path, 0) + 1
            super().do_GET()

        def log_message(self, *args):  # keep the test output clean
            pass

    server = make_server(folder, port=0, handler=Counting)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}/registry.json", hits
    server.shutdown()
    server.server_close()


def test_models_install_then_offline_run_makes_no_request(mirror, tmp_path, capsys):
    url, hits = mirror
    code, out, err = sitehead(
        ["models", "install", "tiny@1.0.0", "-site", "montreal", "-registry", url, "-allow-unsigned"], capsys
    )
    assert code == 0, err
    assert "montreal" in out and "universal" not in out
    assert hits["/tiny/1.0.0/backbone.onnx"] == 1 and hits["/tiny/1.0.0/heads/montreal.onnx"] == 1
    before = dict(hits)
    image = tmp_path / "t2.nii.gz"
    data = np.random.default_rng(0).normal(100, 5, (24, 24, 16))
    data[8:16, 8:16, 4:12] = 400
    nib.save(nib.Nifti1Image(data.astype(np.float32), np.eye(4)), image)
    code = cli.main(["-i", str(image), "-site", "montreal", "-registry", url, "-offline", "-allow-unsigned"])
    assert code == 0, capsys.readouterr().err
    assert hits == before, "offline must not touch the network"
    code = cli.main(
        ["-i", str(image), "-site", "toronto", "-registry", url, "-offline", "-allow-unsigned", "-overwrite"]
    )
    assert code == 8  # toronto's head was never installed
    assert "models install" in capsys.readouterr().err


def test_cache_list_verify_clean(mirror, capsys):
    url, _ = mirror
    assert sitehead(["models", "install", "-registry", url, "-allow-unsigned"], capsys)[0] == 0
    code, out, _ = sitehead(["cache", "list"], capsys)
    assert code == 0 and out.strip().endswith("bytes") and "4 asset(s)" in out
    code, out, _ = sitehead(["cache", "verify"], capsys)
    assert code == 0 and "verified" in out
    code, out, _ = sitehead(["cache", "list"], capsys)
    path = Path(out.splitlines()[0].split()[2])
    path.chmod(0o644)
    path.write_bytes(b"corrupt")
    code, out, _ = sitehead(["cache", "verify"], capsys)
    assert code == 7 and "1 corrupt asset(s) removed" in out and not path.exists()
    code, out, _ = sitehead(["cache", "clean"], capsys)
    assert code == 0 and "freed" in out
    assert "0 asset(s)" in sitehead(["cache", "list"], capsys)[1]


def test_cache_list_names_each_file_from_the_known_indexes(mirror, tmp_path, capsys):
    url, _ = mirror
    assert sitehead(["models", "install", "-registry", url, "-allow-unsigned"], capsys)[0] == 0
    stray = b"a file no index lists"
    digest = hashlib.sha256(stray).hexdigest()
    (env.cache_dir() / "assets" / "sha256" / digest[:2]).mkdir(parents=True)
    (env.cache_dir() / "assets" / "sha256" / digest[:2] / digest).write_bytes(stray)
    code, out, _ = sitehead(["cache", "list"], capsys)
    assert code == 0 and "5 asset(s)" in out
    described = {line.split()[0]: line.split("  ")[-1] for line in out.splitlines()[:-1]}
    index = json.loads((tmp_path / "mirror" / "registry.json").read_text())
    release = index["models"]["tiny"]["releases"]["1.0.0"]
    assert described[release["backbone"]["sha256"]] == "backbone of tiny@1.0.0"
    for site, head in release["heads"].items():
        assert described[head["sha256"]] == f"{site} head of tiny@1.0.0"
    assert described[digest] == "not named by any known index"


def test_cached_files_are_named_from_the_embedded_index_and_index_copies(tmp_path):
    from sct_sitehead.registry.asset_names import name_cached_assets
    from sct_sitehead.registry.local import embedded_registry_path

    embedded = json.loads(embedded_registry_path().read_text())
    model = embedded["default_model"]
    version, release = next(iter(embedded["models"][model]["releases"].items()))
    spec = f"{model}@{version}"
    (tmp_path / "indexes").mkdir()
    (tmp_path / "indexes" / "broken.json").write_text("{not json")
    copy = {
        "models": {
            "other": {
                "releases": {"0.9": {"backbone": release["backbone"], "heads": {"x\x1b": release["heads"]["montreal"]}}}
            }
        }
    }
    (tmp_path / "indexes" / "copy.json").write_text(json.dumps(copy))
    wanted = [
        release["backbone"]["sha256"],
        release["heads"]["montreal"]["sha256"],
        release["localiser"]["head"]["sha256"],
        "0" * 64,
    ]
    names = name_cached_assets(tmp_path, wanted)
    assert names[wanted[0]] == f"backbone of {spec}, other@0.9"
    assert names[wanted[1]] == f"montreal head of {spec}"
    # A file several releases share is named by each of them (2.0.0 ships 1.1.3's localiser).
    sharing = [
        f"{model}@{v}"
        for v, r in embedded["models"][model]["releases"].items()
        if r.get("localiser", {}).get("head", {}).get("sha256") == wanted[2]
    ]
    assert spec in sharing
    assert names[wanted[2]] == "localiser head of " + ", ".join(sharing)
    assert names["0" * 64] == "not named by any known index"


def test_unsigned_remote_index_is_refused_by_default(mirror, capsys):
    url, _ = mirror
    code, _, err = sitehead(["models", "list", "-registry", url], capsys)
    assert code == 5 and "unsigned" in err.lower()


def test_keygen_sign_and_trust(mirror, tmp_path, capsys):
    url, _ = mirror
    private, public = tmp_path / "keys" / "site.pem", tmp_path / "keys" / "site.pub"
    code, out, err = sitehead(["registry", "keygen", private, public], capsys)
    assert code == 0, err
    index = tmp_path / "mirror" / "registry.json"
    assert sitehead(["registry", "sign", index, "-key", private], capsys)[0] == 0
    code, out, err = sitehead(["models", "list", "-registry", url, "-trust", public], capsys)
    assert code == 0, err
    assert out.startswith("tiny@1.0.0 (default)")
    code, _, err = sitehead(["models", "list", "-registry", url], capsys)  # signed by a key nobody trusts
    assert code == 5 and "key" in err.lower()


def export_folder(tmp_path: Path) -> Path:
    """An export folder as `sct_sitehead export` writes it, from the tiny ONNX release (no torch)."""
    from onnx_factory import write_tiny_release

    folder = tmp_path / "export"
    tiny = write_tiny_release(folder)

    def entry(path: Path) -> dict:
        return {"file": path.relative_to(folder).as_posix(), "sha256": sha256_of(path), "size": path.stat().st_size}

    manifest = {
        "input": {
            "orientation": "RAS",
            "spacing": [1.0, 1.0, 1.0],
            "patch_size": [32, 32, 32],
            "divisor": tiny["divisor"],
            "normalization": {"method": "zscore", "clip_percentiles": [0.5, 99.5]},
        },
        "channels": tiny["channels"],
        "backbone": {**entry(tiny["backbone"]), "outputs": tiny["backbone_outputs"]},
        "heads": {
            site: {**entry(path), "strategy": "finetune", "labels": tiny["labels"][site]}
            for site, path in tiny["heads"].items()
        },
    }
    (folder / "export.json").write_text(json.dumps(manifest))
    return folder


def test_publish_creates_then_extends_a_registry(tmp_path, capsys):
    folder = export_folder(tmp_path)
    registry = tmp_path / "registry"
    code, _, err = sitehead(["publish", folder, registry, "-model", "tiny", "-version", "1.0.0", "-default"], capsys)
    assert code == 0, err
    code, _, err = sitehead(
        ["publish", folder, registry, "-model", "tiny", "-version", "1.1.0", "-site", "montreal"], capsys
    )
    assert code == 0, err
    index = json.loads((registry / "registry.json").read_text())
    assert index["serial"] == 2
    assert index["models"]["tiny"]["latest"] == "1.1.0"
    assert set(index["models"]["tiny"]["releases"]["1.1.0"]["heads"]) == {"montreal", "universal"}
    code, out, _ = sitehead(["models", "list", "-registry", registry / "registry.json"], capsys)
    assert code == 0 and "tiny@1.1.0" in out and "tiny@1.0.0" in out


def test_publish_refuses_to_change_a_published_version(tmp_path):
    folder = export_folder(tmp_path)
    registry = tmp_path / "registry"
    publish(folder, registry, model="tiny", version="1.0.0")
    other = tmp_path / "other"
    shutil.copytree(folder, other)
    manifest = json.loads((other / "export.json").read_text())
    head = other / manifest["heads"]["montreal"]["file"]
    head.write_bytes(head.read_bytes() + b"\0")
    manifest["heads"]["montreal"].update(sha256=sha256_of(head), size=head.stat().st_size)
    (other / "export.json").write_text(json.dumps(manifest))
    from sct_sitehead.errors import RegistryError

    with pytest.raises(RegistryError, match="already published"):
        publish(other, registry, model="tiny", version="1.0.0")


def test_phantom_command_writes_image_and_truth(tmp_path, capsys):
    out = tmp_path / "ph_T2w.nii.gz"
    code, _, err = sitehead(["phantom", "-o", out, "-shape", 32, 32, 48, "-orientation", "LPI", "-lesions", 2], capsys)
    assert code == 0, err
    image = nib.load(out)
    assert image.shape == (32, 32, 48) and nib.aff2axcodes(image.affine) == ("L", "P", "I")
    assert (tmp_path / "ph_T2w_lesion-truth.nii.gz").is_file()


def test_phantom_quiet_prints_nothing(tmp_path, capsys):
    out = tmp_path / "q_T2w.nii.gz"
    assert sitehead(["phantom", "-o", out, "-shape", 32, 32, 48, "-v", 0], capsys) == (0, "", "")
    assert (tmp_path / "q_T2w_lesion-truth.nii.gz").is_file()
    code, printed, err = sitehead(["phantom", "-v", 1, "-o", out, "-shape", 32, 32, 48], capsys)
    assert code == 0 and not err
    assert [line.split(":")[0] for line in printed.splitlines()] == ["image", "cord", "lesion", "csf"]


def test_default_phantom_truth_holds_two_connected_lesions(tmp_path, capsys):
    """The README's quick start says so: three lesions are placed, and two of them touch."""
    from scipy import ndimage

    out = tmp_path / "t2.nii.gz"
    assert sitehead(["phantom", "-o", out, "-v", 0], capsys)[0] == 0
    truth = np.asarray(nib.load(tmp_path / "t2_lesion-truth.nii.gz").dataobj) > 0
    assert ndimage.label(truth, structure=np.ones((3, 3, 3)))[1] == 2


@pytest.mark.parametrize("flag", ["-h", "-help", "--help"])
def test_both_tools_answer_every_help_spelling(flag, capsys):
    code, out, err = sitehead([flag], capsys)
    assert code == 0 and out.startswith("Usage: sct_sitehead") and not err
    code, out, err = sitehead(["cache", "list", flag], capsys)
    assert code == 0 and out.startswith("Usage: sct_sitehead cache list") and not err
    with pytest.raises(SystemExit) as exited:
        cli.main([flag])
    out, err = capsys.readouterr()
    assert exited.value.code == 0 and out.startswith("usage: sct_deepseg_lesion") and not err


def test_usage_errors_exit_2(capsys):
    code, _, err = sitehead(["models", "install", "-bogus"], capsys)
    assert code == 2 and err.count("\n") == 1
