"""Cohorts: the BIDS App on real scans (participant, group, skip, -force, a corrupt scan), the QC report that
grows under a lock (real processes, a real headless browser), ``-i`` folders, and Dask (a real LocalCluster)."""

from __future__ import annotations

import json
import multiprocessing
import os
import re
import shutil
import signal
import subprocess
import threading
import time
from pathlib import Path

import numpy as np
import pytest
from conftest import blob_image, run_deepseg

from sct_sitehead.cli.admin import main as admin
from sct_sitehead.cohort.plan import RECORDS
from sct_sitehead.cohort.scans import expand_inputs, find_bids_scans, is_own_output
from sct_sitehead.deploy.qc import add_qc_entries, read_qc_entries

#: Small real scans (0.4-0.7 s each on 2 cores with the embedded release).
SUBJECTS = ["sub-ms01", "sub-unf02", "sub-unf03"]
CHROMIUM = Path("/usr/bin/chromium")


def dump_dom(page: Path) -> str:
    """The DOM of ``page`` after headless Chromium ran its scripts."""
    return subprocess.run(
        [str(CHROMIUM), "--headless", "--no-sandbox", "--disable-gpu", "--dump-dom", page.as_uri()],
        capture_output=True,
        text=True,
        timeout=120,
    ).stdout


def make_cohort(source: Path, root: Path, subjects: list[str] = SUBJECTS) -> Path:
    """A BIDS dataset of symlinks to the shared real scans (never copied into the repository)."""
    root.mkdir(parents=True)
    shutil.copy(source / "participants.tsv", root / "participants.tsv")
    (root / "dataset_description.json").write_text('{"Name": "t", "BIDSVersion": "1.8.0"}')
    for subject in subjects:
        anat = root / subject / "anat"
        anat.mkdir(parents=True)
        for path in (source / subject / "anat").iterdir():
            (anat / path.name).symlink_to(path)
    return root


def bids(*argv: object) -> int:
    return admin(["bids", *(str(a) for a in argv)])


def test_scans_are_found_but_never_outputs_or_derivatives(tmp_path):
    anat = tmp_path / "sub-01" / "ses-2" / "anat"
    anat.mkdir(parents=True)
    for name in [
        "sub-01_ses-2_acq-ax_run-1_T2w.nii.gz",
        "sub-01_ses-2_T2w_lesionseg.nii.gz",
        "sub-01_ses-2_dwi.nii.gz",
    ]:
        (anat / name).write_bytes(b"")
    (tmp_path / "derivatives" / "sub-01" / "anat").mkdir(parents=True)
    (tmp_path / "derivatives" / "sub-01" / "anat" / "sub-01_T2w.nii.gz").write_bytes(b"")
    scans = find_bids_scans(tmp_path)
    assert [s.image.name for s in scans] == ["sub-01_ses-2_acq-ax_run-1_T2w.nii.gz"]
    assert scans[0].session == "ses-2" and scans[0].entities == {"acq": "ax", "run": "1"}
    assert scans[0].folder == Path("sub-01/ses-2/anat")
    assert find_bids_scans(tmp_path, sessions=["1"]) == []
    for name in ["x_lesionseg.nii.gz", "x_lesionseg_montreal_soft.nii.gz", "x_cordseg.nii", "x_seg.nii.gz"]:
        assert is_own_output(Path(name)), name
    assert not is_own_output(Path("sub-01_T2w.nii.gz"))


@pytest.mark.slow
def test_bids_app_participant_group_skip_force_and_a_corrupt_scan(bids_dir, tmp_path, capsys):
    root = make_cohort(bids_dir, tmp_path / "bids")
    bad = root / "sub-bad01" / "anat"
    bad.mkdir(parents=True)
    (bad / "sub-bad01_T2w.nii.gz").write_bytes((bids_dir / "sub-ms01/anat/sub-ms01_T2w.nii.gz").read_bytes()[:5000])
    out = tmp_path / "out"

    assert bids(root, out, "participant", "-site", "montreal") == 3  # the corrupt image's exit code
    captured = capsys.readouterr()
    assert "3 scan(s) done, 1 failed, 0 skipped" in captured.out
    assert "sub-bad01_T2w.nii.gz" in captured.err  # the failure names its file
    description = json.loads((out / "dataset_description.json").read_text())
    assert description["DatasetType"] == "derivative" and description["GeneratedBy"][0]["Name"] == "sct_sitehead"
    masks = sorted(p.relative_to(out).as_posix() for p in out.glob("sub-*/anat/*_lesionseg.nii.gz"))
    assert masks == [
        f"{s}/anat/{n}_lesionseg.nii.gz"
        for s, n in [("sub-ms01", "sub-ms01_T2w"), ("sub-unf02", "sub-unf02_T2star"), ("sub-unf03", "sub-unf03_T2star")]
    ]
    assert all(
        p.with_name(p.name.replace(".nii.gz", ".json")).is_file() for p in out.glob("sub-*/anat/*_lesionseg.nii.gz")
    )

    assert bids(root, out, "group") == 0
    table = (out / "cohort.tsv").read_text().splitlines()
    header, rows = table[0].split("\t"), [dict(zip(table[0].split("\t"), r.split("\t"))) for r in table[1:]]
    assert {
        "subject",
        "session",
        "contrast",
        "site",
        "lesion_count",
        "lesion_volume_mm3",
        "lesion_volumes_mm3",
        "cord_volume_mm3",
        "seconds",
        "exit_code",
        "error",
    } <= set(header)
    by_subject = {row["subject"]: row for row in rows}
    assert by_subject["sub-bad01"]["status"] == "failed" and by_subject["sub-bad01"]["exit_code"] == "3"
    assert "sub-bad01_T2w.nii.gz" in by_subject["sub-bad01"]["error"]
    assert by_subject["sub-ms01"]["status"] == "done" and float(by_subject["sub-ms01"]["cord_volume_mm3"]) > 1000
    assert by_subject["sub-unf02"]["contrast"] == "T2star" and by_subject["sub-unf02"]["site"] == "unf"
    assert (out / "cohort_lesion_load.png").read_bytes()[:4] == b"\x89PNG"
    qc_rows = read_qc_entries(out / "qc")
    assert sorted(r["subject"] for r in qc_rows) == SUBJECTS

    shutil.rmtree(root / "sub-bad01")
    stamps = {p: p.stat().st_mtime_ns for p in out.glob("sub-*/anat/*")}
    capsys.readouterr()
    assert bids(root, out, "participant", "-site", "montreal") == 0
    assert "0 scan(s) done, 0 failed, 3 skipped" in capsys.readouterr().out
    assert stamps == {p: p.stat().st_mtime_ns for p in out.glob("sub-*/anat/*")}
    labels = ["-participant-label", "ms01,sub-unf02", "-participant-label", "unf03"]  # commas, repeats, sub-
    assert bids(root, out, "participant", "-site", "montreal", *labels) == 0
    assert "0 scan(s) done, 0 failed, 3 skipped" in capsys.readouterr().out

    assert bids(root, out, "participant", "-site", "montreal", "-participant-label", "ms01", "-force") == 0
    assert "1 scan(s) done, 0 failed, 0 skipped" in capsys.readouterr().out
    redone = {p for p, t in stamps.items() if p.stat().st_mtime_ns != t}
    assert redone and all(p.parent.parent.name == "sub-ms01" for p in redone)


def test_group_plot_gives_each_site_its_own_colour(tmp_path):
    from PIL import Image

    from sct_sitehead.cohort.table import PALETTE, plot_lesion_load

    rows = [
        {"status": "done", "site": f"site{n}", "subject": f"sub-{n}", "image": f"{n}.nii.gz", "head": "montreal"}
        | {"lesion_volume_mm3": 10.0 + n}
        for n in range(10)
    ]
    picture = np.asarray(Image.open(plot_lesion_load(rows, tmp_path / "load.png")).convert("RGB"))
    colours = {tuple(int(v) for v in pixel) for pixel in picture.reshape(-1, 3)}
    assert len(colours & set(PALETTE)) == 10  # ten sites, ten colours (bars and legend)


def test_a_worker_opens_its_segmenter_once_whatever_its_threads(monkeypatch):
    """A Dask worker with several threads starts several scans at once: the models are still loaded once."""
    from sct_sitehead.cohort import work
    from sct_sitehead.deploy.options import Options
    from sct_sitehead.settings import ModelSource

    opened: list[object] = []

    def slow_open(*args: object, **kwargs: object) -> object:
        time.sleep(0.2)
        opened.append(object())
        return opened[-1]

    monkeypatch.setattr(work, "open_segmenter", slow_open)
    monkeypatch.setattr(work, "_OPEN", {})
    spec = work.SegmenterSpec(("montreal",), None, Options(), ModelSource.resolve(None))
    got: list[object] = []
    threads = [threading.Thread(target=lambda: got.append(work.segmenter_for(spec))) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert len(opened) == 1 and got == opened * 4


def _add_rows(qc_dir: str, worker: int) -> None:
    for row in range(5):
        add_qc_entries(
            Path(qc_dir),
            [
                {
                    "subject": f"sub-{worker}",
                    "image": f"i{row}.nii.gz",
                    "site": "s",
                    "release": "r@1",
                    "png": "x.png",
                    "lesions": row,
                    "volume_mm3": 1.5 * row,
                }
            ],
        )


def test_qc_report_grows_under_a_lock_from_concurrent_processes(tmp_path):
    qc = tmp_path / "qc"
    context = multiprocessing.get_context("spawn")
    workers = [context.Process(target=_add_rows, args=(str(qc), n)) for n in range(4)]
    for process in workers:
        process.start()
    for process in workers:
        process.join(60)
        assert process.exitcode == 0
    assert len(read_qc_entries(qc)) == 20
    page = (qc / "index.html").read_text()
    assert page.count("<tr><td>sub-") == 20 and "(20 segmentations)" in page
    _add_rows(str(qc), 0)  # the same rows again replace, never duplicate
    assert len(read_qc_entries(qc)) == 20


@pytest.mark.slow
@pytest.mark.skipif(not CHROMIUM.exists(), reason="needs Debian's chromium (/usr/bin/chromium; CI installs it)")
def test_qc_page_in_a_headless_browser(tmp_path):
    from PIL import Image

    qc = tmp_path / "qc"
    qc.mkdir()
    Image.new("RGB", (300, 200), (255, 0, 0)).save(qc / "a.png")
    rows = [
        {
            "subject": f"sub-{n}",
            "image": f"sub-{n}_T2w.nii.gz",
            "site": "montreal",
            "release": "lesion@1",
            "png": "a.png",
            "lesions": {1: 2, 2: 3, 3: 1}[n],  # neither the rows' order nor its reverse
            "volume_mm3": 10.0 * n,
        }
        for n in (3, 1, 2)
    ]
    index = add_qc_entries(qc, rows)
    shot = tmp_path / "shot.png"
    dom = dump_dom(index)
    assert dom.count("<tr><td>sub-") == 3
    subprocess.run(
        [
            str(CHROMIUM),
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            f"--screenshot={shot}",
            "--window-size=1400,900",
            index.as_uri(),
        ],
        capture_output=True,
        timeout=120,
        check=True,
    )
    picture = np.asarray(Image.open(shot).convert("RGB")).astype(int)
    red = (picture[..., 0] > 200) & (picture[..., 1] < 60) & (picture[..., 2] < 60)
    assert red.sum() > 300 * 200  # the pictures loaded (a broken image shows no red)

    # Sortable: a module script run after the page's own clicks the "lesions" header, once then twice.
    for clicks, order in [(1, ["sub-3", "sub-1", "sub-2"]), (2, ["sub-2", "sub-1", "sub-3"])]:
        click = 'const th = document.querySelectorAll("th")[4];' + " th.click();" * clicks
        clicked = qc / f"clicked{clicks}.html"
        clicked.write_text(index.read_text().replace("</body>", f'<script type="module">{click}</script></body>'))
        dom = dump_dom(clicked)
        assert re.findall(r"<tr><td>(sub-\d)</td>", dom) == order, clicks


def test_deepseg_takes_folders_skips_its_masks_and_names_bad_files(tiny_registry, tmp_path, capsys):
    folder = tmp_path / "anat"
    folder.mkdir()
    image = blob_image(folder / "sub-07_T2w.nii.gz")
    code, _, err = run_deepseg(
        [
            "-i",
            folder,
            "-site",
            "montreal",
            "-registry",
            tiny_registry,
            "-qc",
            tmp_path / "qc",
            "-qc-subject",
            "patient7",
        ],
        capsys,
    )
    assert code == 0, err
    assert (folder / "sub-07_T2w_lesionseg.nii.gz").is_file()
    assert expand_inputs([folder]) == [image]  # its own mask is never an input the second time
    assert [r["subject"] for r in read_qc_entries(tmp_path / "qc")] == ["patient7"]
    code, _, err = run_deepseg(
        ["-i", folder, "-site", "montreal", "-registry", tiny_registry, "-qc", tmp_path / "qc", "-overwrite"], capsys
    )
    assert code == 0, err
    assert sorted(r["subject"] for r in read_qc_entries(tmp_path / "qc")) == ["patient7", "sub-07"]  # grows
    broken = folder / "sub-08_T2w.nii.gz"
    broken.write_bytes(image.read_bytes()[:300])
    code, _, err = run_deepseg(["-i", folder, "-site", "montreal", "-registry", tiny_registry, "-overwrite"], capsys)
    assert code == 3 and str(broken) in err


# --- Dask -----------------------------------------------------------------------------------------------------
def _dask_cohort(bids_dir: Path, root: Path, copies: int) -> Path:
    """``copies`` subjects, each a symlink to sub-ms01's T2w."""
    root.mkdir(parents=True)
    (root / "participants.tsv").write_text("participant_id\tsite\n")
    for n in range(copies):
        anat = root / f"sub-c{n:02d}" / "anat"
        anat.mkdir(parents=True)
        (anat / f"sub-c{n:02d}_T2w.nii.gz").symlink_to(bids_dir / "sub-ms01/anat/sub-ms01_T2w.nii.gz")
    return root


@pytest.mark.slow
def test_dask_local_cluster_matches_one_process_and_survives_a_killed_worker(bids_dir, tmp_path, capsys):
    distributed = pytest.importorskip("distributed")
    import nibabel as nib

    root = _dask_cohort(bids_dir, tmp_path / "bids", 6)
    plain, dask_out = tmp_path / "plain", tmp_path / "dask"
    assert bids(root, plain, "participant", "-site", "montreal", "-threads", "1") == 0
    assert bids(root, dask_out, "participant", "-site", "montreal", "-jobs", "2") == 0
    assert "6 scan(s) done, 0 failed, 0 skipped" in capsys.readouterr().out
    for mask in plain.glob("sub-*/anat/*.nii.gz"):
        twin = dask_out / mask.relative_to(plain)
        assert np.array_equal(np.asarray(nib.load(mask).dataobj), np.asarray(nib.load(twin).dataobj)), mask

    killed = tmp_path / "killed"
    import psutil

    def kill_one_worker() -> None:
        # The cluster's workers are this process's spawned children; one client only (the command's) talks to it.
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and not list((killed / RECORDS).glob("*.json")):
            time.sleep(0.05)
        workers = [c for c in psutil.Process().children() if "spawn_main" in " ".join(c.cmdline())]
        os.kill(workers[0].pid, signal.SIGKILL)
        victims.append(workers[0].pid)

    victims: list[int] = []
    with distributed.LocalCluster(n_workers=2, threads_per_worker=1, processes=True, dashboard_address=None) as cluster:
        killer = threading.Thread(target=kill_one_worker)
        killer.start()
        code = bids(
            root, killed, "participant", "-site", "montreal", "-threads", "1", "-scheduler", cluster.scheduler_address
        )
        killer.join()
    assert victims  # a worker was killed mid-cohort
    assert code == 0
    assert "6 scan(s) done, 0 failed, 0 skipped" in capsys.readouterr().out
    records = [json.loads(p.read_text()) for p in (killed / RECORDS).glob("*.json")]
    assert len(records) == 6 and all(r["Status"] == "done" for r in records)
    assert not [p for p in killed.rglob(".*") if p.is_file() and ".tmp" in p.name]  # no half-written file
    for mask in plain.glob("sub-*/anat/*.nii.gz"):
        twin = killed / mask.relative_to(plain)
        assert np.array_equal(np.asarray(nib.load(mask).dataobj), np.asarray(nib.load(twin).dataobj)), mask


def test_a_dask_run_waits_for_a_recomputed_scan_before_clearing_temps():
    """A worker that dies after finishing a scan has it recomputed: that copy must end before temps are cleared."""
    from sct_sitehead.cohort.execute import _wait_for_stragglers

    class Client:
        calls = 0

        def processing(self) -> dict[str, list[str]]:
            self.calls += 1
            return {"tcp://w1": ["scan-sub-c01_T2w", "other-cohort"]} if self.calls < 4 else {"tcp://w1": []}

    client = Client()
    _wait_for_stragglers(client, {"scan-sub-c01_T2w"})
    assert client.calls == 4
    started = time.monotonic()
    _wait_for_stragglers(Client(), {"scan-sub-c01_T2w"}, wait_s=0.0)  # bounded: gives up, with a warning
    assert time.monotonic() - started < 5
