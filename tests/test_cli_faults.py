"""sct_deepseg_lesion itself under faults: many real processes on one cold cache over HTTP (one of them SIGKILLed
mid-download), Ctrl-C mid-inference, a full disk and unwritable output folders while writing, a read-only
pre-filled cache.

Each case ends in success or in one line on stderr with the documented exit code (9: an output or the cache cannot
be written; 130: interrupted); no output folder is left with a half-written file, a temp file, or a new mask beside
an old sidecar, and the cache holds only verified assets.
"""

from __future__ import annotations

import errno
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
import urllib.parse
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from conftest import blob_image, default_sigint, sha256_of, write_registry
from test_faults import assert_cache_sound, holder_of, inject_read_only

import sct_sitehead
import sct_sitehead.deploy.outputs
from sct_sitehead.cli.deepseg_lesion import main
from sct_sitehead.errors import EXIT_INTERRUPTED, OutputError
from sct_sitehead.registry.server import RangeRequestHandler, make_server

PROG = "sct_deepseg_lesion"
PYTHONPATH = str(Path(sct_sitehead.__file__).resolve().parents[1])
BACKBONE = "/tiny/1.0.0/backbone.onnx"
MONTREAL = "/tiny/1.0.0/heads/montreal.onnx"
PROCESSES = 8


# --- a registry served over HTTP, counting requests -------------------------------------------------------------
class CountingServer:
    """server.py's handler in a thread, recording every GET as (path, Range header).

    ``throttle[path] = (bytes, seconds)`` slows that file's body down; with ``gather = n`` the first ``n`` requests
    for the index wait for each other, so ``n`` processes begin fetching the assets at the same moment.
    """

    def __init__(self, directory: Path, gather: int = 0) -> None:
        self.requests: list[tuple[str, str | None]] = []
        self.throttle: dict[str, tuple[int, float]] = {}
        self._lock = threading.Lock()
        self._gate = threading.Barrier(gather, timeout=120) if gather else None
        owner = self

        class Handler(RangeRequestHandler):
            def do_GET(self) -> None:
                path = urllib.parse.urlsplit(self.path).path
                with owner._lock:
                    owner.requests.append((path, self.headers.get("Range")))
                    index_requests = sum(1 for p, _ in owner.requests if p == "/registry.json")
                if path == "/registry.json" and owner._gate is not None and index_requests <= owner._gate.parties:
                    owner._gate.wait()
                super().do_GET()

            def copyfile(self, source, outputfile) -> None:
                pace = owner.throttle.get(urllib.parse.urlsplit(self.path).path)
                if pace is None:
                    super().copyfile(source, outputfile)
                    return
                size, pause = pace
                while chunk := source.read(size):
                    outputfile.write(chunk)
                    outputfile.flush()
                    time.sleep(pause)

            def log_message(self, format, *args) -> None:
                pass

        self.server = make_server(directory, 0, "127.0.0.1", handler=Handler)
        self.server.handle_error = lambda request, address: None  # a killed client hangs up mid-body
        self.thread = threading.Thread(target=self.server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
        self.thread.start()

    def url(self, path: str) -> str:
        host, port = self.server.server_address[:2]
        return f"http://{host}:{port}/{path.lstrip('/')}"

    def ranges(self, path: str) -> list[str | None]:
        with self._lock:
            return [header for requested, header in self.requests if requested == path]

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


#: Voxels of 0.9 x 0.9 x 1.5 mm: the tiny model's 1 mm grid is a resampling away.
AFFINE = np.diag([0.9, 0.9, 1.5, 1.0])


def child_environment(cache: Path) -> dict[str, str]:
    environment = {k: v for k, v in os.environ.items() if "proxy" not in k.lower()}
    environment.update(SCT_SITEHEAD_CACHE=str(cache), NO_PROXY="127.0.0.1,localhost", PYTHONPATH=PYTHONPATH)
    return environment


def truth(www: Path) -> dict[str, bytes]:
    files = [www / BACKBONE.lstrip("/"), www / MONTREAL.lstrip("/")]
    return {sha256_of(path): path.read_bytes() for path in files}


def mask_data(path: Path) -> np.ndarray:
    return np.asanyarray(nib.load(path).dataobj)


# --- 8 processes on one cold cache -------------------------------------------------------------------------------
@pytest.mark.slow
@pytest.mark.skipif(not Path("/proc/self/fd").is_dir(), reason="finds the downloading process through /proc")
@pytest.mark.parametrize("kill_one", [False, True], ids=["8-processes", "8-processes-one-killed"])
def test_processes_share_one_cold_cache_over_http(signed_site, tmp_path: Path, kill_one: bool) -> None:
    www, public = signed_site
    server = CountingServer(www, gather=PROCESSES)
    # About 1.6 s for the 1 MiB backbone: every process reaches its lock while the first is downloading.
    server.throttle[BACKBONE] = (32 * 1024, 0.05)
    image = blob_image(tmp_path / "sub-01_T2w.nii.gz", affine=AFFINE)
    cache, out = tmp_path / "cache", tmp_path / "out"
    out.mkdir()
    command = [
        sys.executable,
        "-m",
        "sct_sitehead.cli.deepseg_lesion",
        "-i",
        str(image),
        "-site",
        "montreal",
        "-registry",
        server.url("registry.json"),
        "-trust",
        str(public),
    ]
    workers = [
        subprocess.Popen(
            [*command, "-o", str(out / f"mask{n}.nii.gz")],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=child_environment(cache),
        )
        for n in range(PROCESSES)
    ]
    victim = None
    try:
        if kill_one:
            part = cache / "tmp" / f"{sha256_of(www / BACKBONE.lstrip('/'))}.part"
            deadline = time.monotonic() + 120
            while victim is None or not part.exists() or part.stat().st_size < 256 * 1024:
                assert time.monotonic() < deadline, "no download to interrupt"
                finished = [w.communicate() for w in workers if w.poll() is not None]
                assert not finished, f"a process ended before the download could be interrupted: {finished}"
                victim = victim or holder_of(part, workers)
                time.sleep(0.005)
            victim.send_signal(signal.SIGKILL)
        results = {worker.pid: worker.communicate(timeout=180) for worker in workers}
    finally:
        for worker in workers:
            if worker.poll() is None:
                worker.kill()
                worker.wait()
        server.close()
    survivors = [(n, w) for n, w in enumerate(workers) if w is not victim]
    for _, worker in survivors:
        assert worker.returncode == 0, results[worker.pid][1]
    masks = [mask_data(out / f"mask{n}.nii.gz") for n, _ in survivors]
    assert masks[0].sum() > 0 and all(np.array_equal(mask, masks[0]) for mask in masks)
    # They did overlap: others waited on the lock of the first one's download.
    assert any("waiting for another process" in results[w.pid][1] for _, w in survivors)
    assert server.ranges(MONTREAL) == [None]  # the head: one download for all
    if kill_one:
        assert victim.returncode == -signal.SIGKILL
        first, resumed = server.ranges(BACKBONE)  # one download, then one resume of the killed process's part
        assert first is None and resumed is not None and int(resumed.split("=")[1].rstrip("-")) > 0
        victim_number = workers.index(victim)
        assert not (out / f"mask{victim_number}.nii.gz").exists()
    else:
        assert server.ranges(BACKBONE) == [None]
    assert len(server.ranges("/registry.json")) == PROCESSES
    expected = {f"mask{n}.nii.gz" for n, _ in survivors} | {f"mask{n}.json" for n, _ in survivors}
    assert {p.name for p in out.iterdir()} == expected  # no temp file left, even by the killed one
    assert_cache_sound(cache, truth(www))
    assert list((cache / "tmp").iterdir()) == []


# --- Ctrl-C mid-inference ----------------------------------------------------------------------------------------
@pytest.mark.slow
def test_sigint_mid_inference_exits_130_and_leaves_nothing(tmp_path: Path) -> None:
    # 8^3 patches over 128 x 128 x 64 voxels: about 16,000 patches, a few seconds of sliding window.
    registry = write_registry(tmp_path / "www", patch_size=(8, 8, 8))
    image = blob_image(tmp_path / "big.nii.gz", affine=AFFINE, shape=(128, 128, 64))
    out = tmp_path / "out"
    out.mkdir()
    command = [
        sys.executable,
        "-m",
        "sct_sitehead.cli.deepseg_lesion",
        "-i",
        str(image),
        "-site",
        "montreal",
        "-registry",
        str(registry),
        "-o",
        str(out / "mask.nii.gz"),
    ]
    environment = child_environment(tmp_path / "cache")
    worker = subprocess.Popen(
        [*command, "-v", "2", "-threads", "1"],
        stderr=subprocess.PIPE,
        text=True,
        env=environment,
        preexec_fn=default_sigint,
    )
    lines: list[str] = []
    started = None
    try:
        for line in worker.stderr:  # -v 2 logs "sliding window: N patches" as inference begins
            lines.append(line)
            if "sliding window:" in line:
                worker.send_signal(signal.SIGINT)
                started = time.monotonic()
                break
        rest = worker.stderr.read()
        worker.wait(timeout=60)
    finally:
        if worker.poll() is None:
            worker.kill()
            worker.wait()
    assert started is not None, "".join(lines) + rest
    took = time.monotonic() - started
    assert worker.returncode == EXIT_INTERRUPTED, "".join(lines) + rest
    assert rest.splitlines() == [f"{PROG}: interrupted; no partial output was left"], rest
    assert "Traceback" not in "".join(lines) + rest
    assert list(out.iterdir()) == []
    assert took < 10, f"{took:.1f} s to stop"
    done = subprocess.run(command, capture_output=True, text=True, env=environment, timeout=300)
    assert done.returncode == 0, done.stderr
    assert sorted(p.name for p in out.iterdir()) == ["mask.json", "mask.nii.gz"]
    assert mask_data(out / "mask.nii.gz").sum() > 0


# --- writing outputs: full disk, Ctrl-C, read-only or impossible folders ---------------------------------------
def run_cli(argv: list[str], capfd) -> tuple[int, list[str]]:
    code = main([str(a) for a in argv])
    return code, capfd.readouterr().err.splitlines()


@pytest.fixture
def image(tmp_path: Path) -> Path:
    return blob_image(tmp_path / "sub-01_T2w.nii.gz", affine=AFFINE)


def universal(image: Path, registry: Path, out: Path) -> list[str | Path]:
    """The universal head writes a lesion mask, a soft map, a cord mask and a sidecar: four files to stage (over an
    earlier run's: -overwrite)."""
    return ["-i", image, "-site", "universal", "-soft", "-registry", registry, "-ofolder", out, "-v", "0", "-overwrite"]


OUTPUTS = [
    "sub-01_T2w_lesionseg.nii.gz",
    "sub-01_T2w_lesionseg_soft.nii.gz",
    "sub-01_T2w_cordseg.nii.gz",
    "sub-01_T2w_lesionseg.json",
]


@pytest.mark.parametrize("failure", ["ENOSPC", "KeyboardInterrupt"])
@pytest.mark.parametrize("at", [1, 2, 3, "sidecar"])
@pytest.mark.parametrize("previous", [False, True], ids=["fresh", "over-previous"])
def test_failure_while_writing_leaves_the_previous_outputs(
    tiny_registry, image, tmp_path, capfd, monkeypatch, failure, at, previous
) -> None:
    """The n-th NIfTI (or the sidecar) fails half-written: exit 9 (full disk) or 130 (Ctrl-C), one line, no temp
    file, and the folder holds exactly what it held before: nothing, or the previous run's files, byte for byte."""
    out = tmp_path / "out"
    if previous:
        code, lines = run_cli(universal(image, tiny_registry, out), capfd)
        assert code == 0, lines
        assert sorted(p.name for p in out.iterdir()) == sorted(OUTPUTS)
    before = {p.name: p.read_bytes() for p in out.iterdir()} if out.exists() else {}
    error = OSError(errno.ENOSPC, os.strerror(errno.ENOSPC)) if failure == "ENOSPC" else KeyboardInterrupt()
    # Every NIfTI output goes through outputs._save (nibabel, or ISA-L's gzip for .nii.gz).
    real_save, real_write_text = sct_sitehead.deploy.outputs._save, Path.write_text
    saves = []

    def failing_save(img, filename):
        saves.append(filename)
        if len(saves) == at:
            Path(filename).write_bytes(b"\x1f\x8b half a file")
            raise error
        return real_save(img, filename)

    def failing_write_text(self, data, *args, **kwargs):
        if at == "sidecar" and self.name.endswith(".json"):
            real_write_text(self, data[: len(data) // 2], *args, **kwargs)
            raise error
        return real_write_text(self, data, *args, **kwargs)

    monkeypatch.setattr(sct_sitehead.deploy.outputs, "_save", failing_save)
    monkeypatch.setattr(Path, "write_text", failing_write_text)
    code, lines = run_cli(universal(image, tiny_registry, out), capfd)
    monkeypatch.undo()
    if failure == "ENOSPC":
        assert code == OutputError.exit_code
        assert len(lines) == 1 and "No space left on device" in lines[0] and "free disk space" in lines[0], lines
    else:
        assert code == EXIT_INTERRUPTED
        assert lines == [f"{PROG}: interrupted; no partial output was left"]
    after = {p.name: p.read_bytes() for p in out.iterdir()} if out.exists() else {}
    assert after == before  # nothing half-written, no temp file, no new file beside old ones
    code, lines = run_cli(universal(image, tiny_registry, out), capfd)  # the fault gone, the next run succeeds
    assert code == 0, lines
    assert sorted(p.name for p in out.iterdir()) == sorted(OUTPUTS)


def test_output_folder_under_a_regular_file(tiny_registry, image, tmp_path, capfd) -> None:
    blocker = tmp_path / "results.txt"
    blocker.write_text("not a folder")
    for option in (["-o", blocker / "mask.nii.gz"], ["-ofolder", blocker / "sub"], ["-qc", blocker / "qc"]):
        code, lines = run_cli(["-i", image, "-site", "montreal", "-registry", tiny_registry, "-v", "0", *option], capfd)
        assert code == OutputError.exit_code, (option, lines)
        assert len(lines) == 1 and str(blocker) in lines[0] and "not a folder" in lines[0], lines
    assert blocker.read_text() == "not a folder"


@pytest.mark.parametrize("code_name", ["EROFS", "EACCES"])
def test_read_only_output_folder(tiny_registry, image, tmp_path, capfd, monkeypatch, code_name) -> None:
    """A read-only mount (EROFS) or a folder without write permission (EACCES; root ignores the mode bits, so both
    are injected): every file creation in the output folder fails."""
    out = tmp_path / "out"
    out.mkdir()
    number = getattr(errno, code_name)
    real_open = os.open

    def refusing_open(path, flags, *args, **kwargs):
        if Path(os.fsdecode(path)).parent == out and flags & os.O_CREAT:
            raise OSError(number, os.strerror(number), os.fsdecode(path))
        return real_open(path, flags, *args, **kwargs)

    monkeypatch.setattr(os, "open", refusing_open)
    code, lines = run_cli(
        ["-i", image, "-site", "montreal", "-registry", tiny_registry, "-o", out / "mask.nii.gz", "-v", "0"], capfd
    )
    assert code == OutputError.exit_code
    assert len(lines) == 1 and os.strerror(number) in lines[0] and "writable" in lines[0], lines
    assert list(out.iterdir()) == []


def test_output_folder_that_cannot_be_created(tiny_registry, image, tmp_path, capfd, monkeypatch) -> None:
    real_mkdir = Path.mkdir

    def refusing_mkdir(self, *args, **kwargs):
        if self.is_relative_to(tmp_path / "locked"):
            raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), str(self))
        return real_mkdir(self, *args, **kwargs)

    monkeypatch.setattr(Path, "mkdir", refusing_mkdir)
    code, lines = run_cli(
        [
            "-i",
            image,
            "-site",
            "montreal",
            "-registry",
            tiny_registry,
            "-ofolder",
            tmp_path / "locked" / "deep",
            "-v",
            "0",
        ],
        capfd,
    )
    assert code == OutputError.exit_code
    assert len(lines) == 1 and "cannot create the output folder" in lines[0] and "Permission denied" in lines[0]


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into folders whatever their mode")
def test_output_folder_without_write_permission(tiny_registry, image, tmp_path, capfd) -> None:
    out = tmp_path / "out"
    out.mkdir()
    out.chmod(0o500)
    try:
        code, lines = run_cli(
            ["-i", image, "-site", "montreal", "-registry", tiny_registry, "-o", out / "mask.nii.gz", "-v", "0"], capfd
        )
    finally:
        out.chmod(0o700)
    assert code == OutputError.exit_code and len(lines) == 1 and "Permission denied" in lines[0]


# --- a read-only, pre-filled cache -------------------------------------------------------------------------------
def snapshot(root: Path) -> dict[str, tuple[int, int, float]]:
    return {str(p): (p.stat().st_mode, p.stat().st_size, p.stat().st_mtime) for p in [root, *root.rglob("*")]}


def test_read_only_prefilled_cache_injected(tiny_registry, image, tmp_path, capfd, monkeypatch) -> None:
    cache = Path(os.environ["SCT_SITEHEAD_CACHE"])
    argv = ["-i", image, "-site", "montreal", "-registry", tiny_registry, "-v", "0"]
    code, lines = run_cli([*argv, "-o", tmp_path / "first.nii.gz"], capfd)  # fills the cache
    assert code == 0, lines
    shutil.rmtree(cache / "tmp", ignore_errors=True)
    before = snapshot(cache)
    inject_read_only(monkeypatch, cache)  # every write under the cache fails with EROFS
    code, lines = run_cli([*argv, "-o", tmp_path / "second.nii.gz"], capfd)
    monkeypatch.undo()
    assert code == 0, lines
    assert snapshot(cache) == before
    assert np.array_equal(mask_data(tmp_path / "second.nii.gz"), mask_data(tmp_path / "first.nii.gz"))


@pytest.mark.skipif(shutil.which("setpriv") is None, reason="setpriv is not installed")
def test_read_only_prefilled_cache_real_process(tiny_registry, image, tmp_path) -> None:
    """A real process without root's power to ignore permission bits, on a cache whose files and folders are all
    read-only: it runs from the cache and writes nothing there."""
    cache = tmp_path / "cache"
    environment = child_environment(cache)
    command = [
        sys.executable,
        "-m",
        "sct_sitehead.cli.deepseg_lesion",
        "-i",
        str(image),
        "-site",
        "montreal",
        "-registry",
        str(tiny_registry),
        "-v",
        "0",
    ]
    filled = subprocess.run(
        [*command, "-o", str(tmp_path / "first.nii.gz")], capture_output=True, text=True, env=environment, timeout=300
    )
    assert filled.returncode == 0, filled.stderr
    shutil.rmtree(cache / "tmp", ignore_errors=True)
    for path in [cache, *cache.rglob("*")]:
        path.chmod(0o555 if path.is_dir() else 0o444)
    before = snapshot(cache)
    try:
        done = subprocess.run(
            [
                "setpriv",
                "--inh-caps=-all",
                "--bounding-set=-all",
                "--",
                *command,
                "-o",
                str(tmp_path / "second.nii.gz"),
            ],
            capture_output=True,
            text=True,
            env=environment,
            timeout=300,
        )
        after = snapshot(cache)
    finally:
        for path in [cache, *cache.rglob("*")]:
            path.chmod(0o755 if path.is_dir() else 0o644)
    if done.returncode != 0 and "Operation not permitted" in done.stderr and "setpriv" in done.stderr:
        pytest.skip(f"setpriv cannot drop capabilities here: {done.stderr.strip()}")
    assert done.returncode == 0, done.stderr
    assert done.stderr == ""
    assert after == before
    assert np.array_equal(mask_data(tmp_path / "second.nii.gz"), mask_data(tmp_path / "first.nii.gz"))
